"""
The browsers' logins, kept on the server: the session cookie's value names
one, until it expires or its user logs out.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

COOKIE_NAME = "capsule_session"
# Seconds a browser's login lasts.
LOGIN_TTL = 12 * 3600.0


@dataclass
class LoginSession:
    user: str
    expires: float
    # What names the credential the login was made with (a keyed hash of
    # the user's password hash): when it changes, the login ends.  None:
    # not tied to one.
    credential: bytes | None = None


class LoginSessions:
    """
    The browsers' logins, server-side: a cookie value names one, until it
    expires or its user logs out.  The value is random (256 bits) and is
    only ever compared, never logged.
    """

    def __init__(self, clock, ttl: float = LOGIN_TTL) -> None:
        self._clock = clock
        self.ttl = ttl
        self._sessions: dict[str, LoginSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def new(self, user: str, credential: bytes | None = None) -> str:
        """
        A new login of C{user}, made with the credential C{credential}
        names: the cookie's value.
        """
        now = self._clock.seconds()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]
        value = secrets.token_urlsafe(32)
        self._sessions[value] = LoginSession(user, now + self.ttl, credential)
        return value

    def get(self, value: str) -> LoginSession | None:
        """
        The live login C{value} names, if any.
        """
        session = self._sessions.get(value)
        if session is None:
            return None
        if session.expires <= self._clock.seconds():
            del self._sessions[value]
            return None
        return session

    def user(self, value: str) -> str | None:
        session = self.get(value)
        return None if session is None else session.user

    def end(self, value: str) -> None:
        self._sessions.pop(value, None)
