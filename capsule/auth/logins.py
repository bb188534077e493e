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

    def new(self, user: str) -> str:
        now = self._clock.seconds()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]
        value = secrets.token_urlsafe(32)
        self._sessions[value] = LoginSession(user, now + self.ttl)
        return value

    def user(self, value: str) -> str | None:
        session = self._sessions.get(value)
        if session is None:
            return None
        if session.expires <= self._clock.seconds():
            del self._sessions[value]
            return None
        return session.user

    def end(self, value: str) -> None:
        self._sessions.pop(value, None)
