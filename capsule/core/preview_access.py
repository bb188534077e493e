"""
Who may open a session's previews: its owner, anyone for a port made
public, and whoever holds a link its owner made (a token that expires).

A browser proves it once and then holds a cookie: a I{grant}, a random
token kept here only as its SHA-256, naming one port of one session, for
whom (the owner, or a link), until when.  Under a preview domain, the
browser's login cookie is capsule's origin's only: capsule's origin checks
it and mints a I{ticket} (single use, short-lived) that the preview's host
trades for its own cookie.

Everything here is forgotten when its session ends (L{PreviewAccess.drop_session}).

Pure logic: time is an injected clock's, nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from capsule.core.shares import MAX_TOKEN_LENGTH, Share, ShareRefused, ShareStore

# Seconds a ticket from capsule's origin to a preview host lives.
TICKET_TTL = 60.0
# Seconds an owner's grant (a preview's cookie) lives.
GRANT_TTL = 12 * 3600.0
# Grants and tickets kept at once, in all: past it, the oldest go first.
MAX_GRANTS = 10_000
MAX_TICKETS = 1_000


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def share_key(session_id: str, port: int) -> str:
    """
    What a port's links are kept under in the L{ShareStore}.
    """
    return f"{session_id}/{port}"


@dataclass(eq=False)
class Grant:
    """
    A browser's right to one preview: the session's owner's (C{user}), or a
    link's (C{share_id}), until C{expires_at}.
    """

    session_id: str
    port: int
    user: str | None
    share_id: str | None
    expires_at: float


class PreviewAccess:
    """
    The public ports, links, tickets and grants of every live session.

    @param clock: has C{seconds()}.
    @param shares: where the links are kept (one L{ShareStore} per site).
    """

    def __init__(self, clock, shares: ShareStore | None = None,
                 grant_ttl: float = GRANT_TTL) -> None:
        self.clock = clock
        self.shares = shares if shares is not None else ShareStore(clock)
        self.grant_ttl = grant_ttl
        self._public: set[tuple[str, int]] = set()
        self._grants: dict[bytes, Grant] = {}
        self._tickets: dict[bytes, tuple[str, int, str | None, float]] = {}
        # The ports of each session that links were made for.
        self._ports: dict[str, set[int]] = {}

    # -- public ports ---------------------------------------------------------

    def set_public(self, session_id: str, port: int, public: bool) -> None:
        if public:
            self._public.add((session_id, port))
        else:
            self._public.discard((session_id, port))

    def is_public(self, session_id: str, port: int) -> bool:
        return (session_id, port) in self._public

    # -- links -------------------------------------------------------------------

    def share(self, session_id: str, port: int, ttl: float | None = None) -> tuple[Share, str]:
        """
        A new link to C{port} of C{session_id}, and its token (told once).

        @raise ShareRefused: see L{ShareStore.create}.
        """
        key = share_key(session_id, port)
        made = self.shares.create(key, ttl)
        self._ports.setdefault(session_id, set()).add(port)
        return made

    def links(self, session_id: str, port: int) -> list[Share]:
        return self.shares.of_session(share_key(session_id, port))

    def revoke(self, session_id: str, port: int, share_id: str) -> bool:
        """
        Revoke a link: the grants made from it go with it.  Whether it was
        live.
        """
        share = self.shares.get(share_key(session_id, port), share_id)
        if share is None:
            return False
        self.shares.revoke(share)
        for key, grant in list(self._grants.items()):
            if grant.share_id == share_id:
                del self._grants[key]
        return True

    def link(self, session_id: str, port: int, token: str) -> Share | None:
        """
        The live link to C{port} of C{session_id} whose token is C{token}.
        """
        share = self.shares.find(token)
        if share is None or share.session_id != share_key(session_id, port):
            return None
        return share

    # -- tickets (capsule's origin -> a preview host) ---------------------------

    def ticket(self, session_id: str, port: int, user: str | None) -> str:
        """
        A single-use token that a preview host trades for a grant, for
        L{TICKET_TTL} seconds.
        """
        self._prune()
        while len(self._tickets) >= MAX_TICKETS:
            del self._tickets[next(iter(self._tickets))]
        token = secrets.token_urlsafe(32)
        self._tickets[_digest(token)] = (session_id, port, user,
                                         self.clock.seconds() + TICKET_TTL)
        return token

    def redeem(self, session_id: str, port: int, token: str) -> str | None:
        """
        Trade a ticket for a grant to C{port} of C{session_id}: the grant's
        token, or C{None} (unknown, used, expired, or for another port).
        """
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            return None
        self._prune()
        found = self._tickets.pop(_digest(token), None)
        if found is None or found[:2] != (session_id, port):
            return None
        return self.grant(session_id, port, user=found[2])

    # -- grants (a preview's cookie) -------------------------------------------

    def grant(self, session_id: str, port: int, *, user: str | None = None,
              share: Share | None = None) -> str:
        """
        A new grant, for the owner C{user} or through C{share} (which it
        does not outlive); its token, the cookie's value.
        """
        self._prune()
        while len(self._grants) >= MAX_GRANTS:
            del self._grants[next(iter(self._grants))]
        expires = self.clock.seconds() + self.grant_ttl
        if share is not None:
            expires = min(expires, share.expires_at)
        token = secrets.token_urlsafe(32)
        self._grants[_digest(token)] = Grant(session_id, port, user,
                                             share.id if share is not None else None, expires)
        return token

    def granted(self, session_id: str, port: int, token: str | None) -> Grant | None:
        """
        The live grant C{token} names, if it is for C{port} of C{session_id}.
        """
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            return None
        wanted = _digest(token)
        grant = self._grants.get(wanted)
        if grant is None or grant.expires_at <= self.clock.seconds():
            self._grants.pop(wanted, None)
            return None
        if (grant.session_id, grant.port) != (session_id, port):
            return None
        if grant.share_id is not None and self.shares.get(
                share_key(session_id, port), grant.share_id) is None:
            # Its link expired or was revoked.
            self._grants.pop(wanted, None)
            return None
        return grant

    def _prune(self) -> None:
        now = self.clock.seconds()
        for key in [k for k, g in self._grants.items() if g.expires_at <= now]:
            del self._grants[key]
        for key in [k for k, t in self._tickets.items() if t[3] <= now]:
            del self._tickets[key]

    # -- the end of a session ----------------------------------------------------

    def drop_session(self, session_id: str) -> None:
        """
        Forget everything of C{session_id} (it ended).
        """
        self._public = {p for p in self._public if p[0] != session_id}
        for key in [k for k, g in self._grants.items() if g.session_id == session_id]:
            del self._grants[key]
        for key in [k for k, t in self._tickets.items() if t[0] == session_id]:
            del self._tickets[key]
        for port in self._ports.pop(session_id, ()):
            self.shares.drop_session(share_key(session_id, port))


__all__ = ["PreviewAccess", "Grant", "ShareRefused", "share_key"]
