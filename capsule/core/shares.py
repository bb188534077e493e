"""
Read-only share links: who may watch a live session without typing.

A share is made by a session's owner for a while (L{ShareStore.create}):
it is a random token (C{secrets.token_urlsafe}, 32 bytes), given once to
its maker and kept here only as its SHA-256 digest.  Whoever presents the
token (L{ShareStore.find}) may watch the session until the share expires,
is revoked, or its session ends; the token is the whole credential.

Pure logic: time is an injected clock's, nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

# Random bytes in a token (43 characters of URL-safe base64), and in a
# share's id (the handle its owner revokes it by; not a credential).
TOKEN_BYTES = 32
ID_BYTES = 9
# A presented token longer than this is not one (never hashed).
MAX_TOKEN_LENGTH = 128
# Shares one session may have at once (live ones; expired ones are
# forgotten).
MAX_SHARES_PER_SESSION = 16


class ShareRefused(Exception):
    """
    A share cannot be made or used.

    @ivar code: the wire error code.
    @ivar message: what the client is told.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(eq=False)
class Share:
    """
    One read-only link to session C{session_id}, live from C{created_at}
    until C{expires_at} (clock seconds).  Its token is not kept: C{digest}
    is its SHA-256.
    """

    id: str
    session_id: str
    digest: bytes
    created_at: float
    expires_at: float

    def describe(self, now: float) -> dict:
        return {"id": self.id, "created_at": self.created_at, "expires_at": self.expires_at,
                "expires_in": max(0, round(self.expires_at - now))}


class ShareStore:
    """
    The live shares, by the digest of their token and by session.

    @param clock: has C{seconds()}.
    @param default_ttl: seconds a share lives when its maker names none.
    @param max_ttl: the most seconds a share may be asked to live.
    """

    def __init__(self, clock, default_ttl: float = 3600.0, max_ttl: float = 86400.0,
                 per_session: int = MAX_SHARES_PER_SESSION) -> None:
        if not 0 < default_ttl <= max_ttl:
            raise ValueError("the default lifetime of a share must be more than 0 and at"
                             " most its maximum")
        self.clock = clock
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.per_session = per_session
        self._by_digest: dict[bytes, Share] = {}

    def __len__(self) -> int:
        self._prune()
        return len(self._by_digest)

    def _prune(self) -> list[Share]:
        now = self.clock.seconds()
        gone = [s for s in self._by_digest.values() if s.expires_at <= now]
        for share in gone:
            del self._by_digest[share.digest]
        return gone

    def expired(self) -> list[Share]:
        """
        Forget the shares whose time is over, and say which they were.
        """
        return self._prune()

    def create(self, session_id: str, ttl: float | None = None) -> tuple[Share, str]:
        """
        A new share of C{session_id} living C{ttl} seconds (C{None}: the
        default), and its token: the only time the token is known.

        @raise ShareRefused: C{bad_request} for a lifetime out of bounds,
            C{too_many_shares} past L{per_session}.
        """
        if ttl is None:
            ttl = self.default_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not (
                0 < ttl <= self.max_ttl):
            raise ShareRefused("bad_request", f"a share lives more than 0 and at most"
                                              f" {self.max_ttl:g} seconds")
        if len(self.of_session(session_id)) >= self.per_session:
            raise ShareRefused("too_many_shares", f"session {session_id} has"
                                                  f" {self.per_session} live share links, the"
                                                  " most it may: revoke one first")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = self.clock.seconds()
        share = Share(id=secrets.token_urlsafe(ID_BYTES), session_id=session_id,
                      digest=digest(token), created_at=now, expires_at=now + ttl)
        self._by_digest[share.digest] = share
        return share, token

    def find(self, token: str) -> Share | None:
        """
        The live share whose token is C{token}, or C{None}.  The token is
        looked up by its digest (what an attacker sends says nothing of the
        stored digests' bytes) and the match compared in constant time.
        """
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            return None
        self._prune()
        wanted = digest(token)
        share = self._by_digest.get(wanted)
        if share is None or not hmac.compare_digest(share.digest, wanted):
            return None
        return share

    def of_session(self, session_id: str) -> list[Share]:
        """
        The live shares of C{session_id}, oldest first.
        """
        self._prune()
        return sorted((s for s in self._by_digest.values() if s.session_id == session_id),
                      key=lambda s: s.created_at)

    def get(self, session_id: str, share_id: str) -> Share | None:
        for share in self.of_session(session_id):
            if hmac.compare_digest(share.id.encode(), share_id.encode()):
                return share
        return None

    def revoke(self, share: Share) -> None:
        self._by_digest.pop(share.digest, None)

    def drop_session(self, session_id: str) -> list[Share]:
        """
        Forget every share of C{session_id} (it ended), and say which.
        """
        gone = [s for s in self._by_digest.values() if s.session_id == session_id]
        for share in gone:
            del self._by_digest[share.digest]
        return gone
