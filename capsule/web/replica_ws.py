"""
A WebSocket for a session another capsule replica served
(L{capsule.sessions.replicas}): C{/ws?session_id=ID} for a session this
replica does not know has it looked for in the cluster, taken over, and
attached with exact replay from the client's offset, before it is told
that the session is kept or does not exist.
"""

from __future__ import annotations

from twisted.logger import Logger

from capsule.core import protocol as wire
from capsule.core.errors import CapsuleError, SessionNotFound
from capsule.web.watch import _Phase

_log = Logger()


class ReplicaSessions:
    """
    The part of L{capsule.web.websocket.CapsuleServerProtocol} that looks
    for a session among the other replicas' (before
    L{capsule.web.keep_ws.KeptSessions}, which it falls back to).
    """

    def _not_live(self, session_id: str, size, not_found: SessionNotFound) -> None:
        replicas = self._manager.replicas
        if replicas is None:
            super()._not_live(session_id, size, not_found)
            return
        # Input waits (refused) while the session is looked for, as while a
        # kept one is: a size is kept for it.
        self._resuming, self._resume_size = True, size
        d = replicas.adopt(session_id, self._user)
        d.addCallback(self._adopted, session_id, not_found)
        d.addErrback(self._adopt_failed)
        d.addErrback(lambda f: _log.failure("a replica's session's connection failed", f))

    def _adopted(self, found: bool, session_id: str, not_found: SessionNotFound) -> None:
        if self._phase is _Phase.DONE:
            return
        size, self._resume_size = self._resume_size, None
        self._resuming = False
        if not found:
            super()._not_live(session_id, size, not_found)
            return
        self._reconnect(session_id, size)

    def _adopt_failed(self, failure) -> None:
        failure.trap(CapsuleError, wire.ProtocolError)
        self._resuming = False
        if self._phase is _Phase.DONE:
            return
        error = failure.value
        self._refuse(error.message, error.code,
                     self.CLOSE_SESSION_NOT_FOUND if isinstance(error, SessionNotFound)
                     else self.CLOSE_UNAVAILABLE if isinstance(error, CapsuleError)
                     else self.CLOSE_INVALID_SESSION)
