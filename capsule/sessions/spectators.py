"""
Spectators: people who watch a live session through a read-only share link
(L{capsule.core.shares}) and never type.

A spectator is given the session's output and nothing else: first the
replay (what the owner gets when it attaches), then every byte the shell
prints, as the session's observer hears it (L{SessionObserver.session_output}).
It is never the session's client: it does not take the owner's attachment
over, cannot write or resize, and does not hold the shell back (what it
cannot take in is its own connection's business: see
L{capsule.web.websocket}).  Its share's revocation or expiry, and its
session's end, close it with a reason.

The owner hears how many watch (C{session_watchers(count)} on the session's
client, when it has that method) whenever the number changes, and when it
attaches.
"""

from __future__ import annotations

from twisted.logger import Logger

from capsule.core.shares import Share, ShareRefused, ShareStore
from capsule.sessions.observers import SessionObserver

_log = Logger()

# Spectators of one session at once.
WATCHERS_PER_SESSION = 10

SHARE_NOT_FOUND = "share_not_found"
TOO_MANY_WATCHERS = "too_many_watchers"
NOT_FOUND_MESSAGE = ("this watch link does not work (any more): it expired, was revoked, or"
                     " its session ended; ask its owner for a new one")


class Spectators(SessionObserver):
    """
    The share links of a server's sessions and their spectators.

    A spectator client has C{watch_started(offset, replay, share, size)},
    C{watch_output(data)}, C{watch_resized(cols, rows)} and
    C{watch_ended(code, message)}.

    @param store: the shares (L{ShareStore}).
    @param per_session: spectators of one session at once.
    """

    def __init__(self, clock, store: ShareStore,
                 per_session: int = WATCHERS_PER_SESSION) -> None:
        self.clock = clock
        self.store = store
        self.per_session = per_session
        # The sessions that were shared, by id, until they end.
        self._sessions: dict[str, object] = {}
        # By session id: each spectator and the share it came by.
        self._watching: dict[str, dict[object, Share]] = {}
        # When each share expires: its spectators are closed then.
        self._timers: dict[Share, object] = {}

    # -- what owners ask --------------------------------------------------

    def share(self, session, ttl: float | None = None) -> tuple[Share, str]:
        """
        A new share of C{session} (its owner asks): the share and its token.

        @raise ShareRefused: see L{ShareStore.create}.
        """
        if session.over:
            raise ShareRefused(SHARE_NOT_FOUND, f"session {session.id} is over")
        share, token = self.store.create(session.id, ttl)
        self._sessions[session.id] = session
        self._timers[share] = self.clock.callLater(
            max(0.0, share.expires_at - self.clock.seconds()), self._expired, share)
        _log.info("session {short}{who}: share {share} made, for {ttl:g} s",
                  short=session.id[:8], share=share.id,
                  ttl=share.expires_at - share.created_at,
                  who=f" of {session.core.user}" if session.core.user else "")
        return share, token

    def shares(self, session) -> list[dict]:
        """
        The live shares of C{session}, each with how many watch through it.
        """
        now = self.clock.seconds()
        watching = self._watching.get(session.id, {})
        return [{**s.describe(now), "watchers": sum(1 for v in watching.values() if v is s)}
                for s in self.store.of_session(session.id)]

    def revoke(self, session, share_id: str) -> bool:
        """
        Revoke share C{share_id} of C{session}: its spectators are closed.
        Return whether there was such a share.
        """
        share = self.store.get(session.id, share_id)
        if share is None:
            return False
        self.store.revoke(share)
        self._cancel(share)
        closed = self._close(share, SHARE_NOT_FOUND,
                             "the owner revoked this watch link: you no longer see the session")
        _log.info("session {short}: share {share} revoked ({count} watching closed)",
                  short=session.id[:8], share=share.id, count=closed)
        return True

    def count(self, session_id: str) -> int:
        return len(self._watching.get(session_id, ()))

    # -- what spectators do -----------------------------------------------

    def watch(self, token: str, client):
        """
        C{client} watches the session whose share C{token} is: it gets the
        replay at once, then the output as it comes.  Return the session.

        @raise ShareRefused: C{share_not_found} (no such live share, or its
            session is over), C{too_many_watchers} (past L{per_session}).
        """
        share = self.store.find(token)
        session = None
        if share is not None:
            session = self._sessions.get(share.session_id)
        if session is None or session.over:
            raise ShareRefused(SHARE_NOT_FOUND, NOT_FOUND_MESSAGE)
        watching = self._watching.setdefault(session.id, {})
        if len(watching) >= self.per_session:
            if not watching:
                del self._watching[session.id]
            raise ShareRefused(TOO_MANY_WATCHERS,
                               f"{len(watching)} people watch this session already, the most"
                               " there may be: try again later")
        watching[client] = share
        replay = session.replay
        data, _ = replay.since(replay.start)
        client.watch_started(replay.end - len(data), len(data), share, session.core.size)
        if data and watching.get(client) is share:
            client.watch_output(data)
        self._tell_owner(session)
        return session

    def leave(self, session, client) -> None:
        """
        C{client} stopped watching C{session} (its connection closed).
        """
        watching = self._watching.get(session.id)
        if watching is None or watching.pop(client, None) is None:
            return
        if not watching:
            del self._watching[session.id]
        self._tell_owner(session)

    # -- ISessionObserver ------------------------------------------------------

    def session_output(self, session, data: bytes) -> None:
        watching = self._watching.get(session.id)
        if not watching:
            return
        for client in list(watching):
            if client in watching:
                client.watch_output(data)

    def session_resized(self, session, cols: int, rows: int) -> None:
        for client in list(self._watching.get(session.id, ())):
            client.watch_resized(cols, rows)

    def session_reconnected(self, session) -> None:
        # The owner's new connection is attached once this returns.
        if self.count(session.id):
            self.clock.callLater(0, self._tell_owner, session)

    def session_ended(self, session) -> None:
        self._sessions.pop(session.id, None)
        for share in self.store.drop_session(session.id):
            self._cancel(share)
        watching = self._watching.pop(session.id, {})
        for client in list(watching):
            client.watch_ended(SHARE_NOT_FOUND,
                               f"the session ended: {session.core.message or 'it is gone'}")

    # -- inside ------------------------------------------------------------

    def _expired(self, share: Share) -> None:
        self._timers.pop(share, None)
        self.store.expired()
        closed = self._close(share, SHARE_NOT_FOUND,
                             "this watch link expired: you no longer see the session")
        if closed:
            _log.info("share {share} expired ({count} watching closed)", share=share.id,
                      count=closed)

    def _cancel(self, share: Share) -> None:
        call = self._timers.pop(share, None)
        if call is not None and call.active():
            call.cancel()

    def _close(self, share: Share, code: str, message: str) -> int:
        watching = self._watching.get(share.session_id, {})
        gone = [c for c, s in watching.items() if s is share]
        for client in gone:
            watching.pop(client, None)
            client.watch_ended(code, message)
        if not watching:
            self._watching.pop(share.session_id, None)
        if gone:
            session = self._sessions.get(share.session_id)
            if session is not None:
                self._tell_owner(session)
        return len(gone)

    def _tell_owner(self, session) -> None:
        tell = getattr(session.client, "session_watchers", None)
        if tell is not None:
            tell(self.count(session.id))
