"""
Kept sessions on the WebSocket (docs/keeping.md): C{/ws?session_id=ID} for a
session that is kept, not live, gets an error frame C{session_kept} (its
message says when it was put away and until when it is kept; C{kept_at}
and C{kept_until} say the same as Unix times), then the close code of a
session not found (4404).  With C{&resume=1} the session is resumed
(through L{capsule.sessions.service.SessionService.resume}: drain and
admission as for a new session) and the connection attached to it; its
C{connected} frame then carries C{resumed_from} (when it was put away), and
a notice C{resumed} follows.  Every C{connected} frame carries C{on_close}:
what closing the session's last tab does to its work.
"""

from __future__ import annotations

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

from capsule.core import protocol as wire
from capsule.core.admission import QUOTA_EXCEEDED, AdmissionRefused
from capsule.core.errors import CapsuleError, ContainerGone, SessionNotFound
from capsule.core.kept import SESSION_KEPT
from capsule.ops.logformat import short_ids
from capsule.sessions.service import OpenRequest
from capsule.web.keep_api import kept_message, when
from capsule.web.watch import CLOSE_QUOTA_EXCEEDED, _Phase

_log = Logger()

RESUMED = "resumed"
RESUMING = "resuming"


class KeptSessions:
    """
    The part of L{capsule.web.websocket.CapsuleServerProtocol} that knows
    kept sessions.  Its closes are the protocol's own codes, given by it.
    """

    # Whether the URL asks to resume a kept session (C{resume=1}).
    _resume_wanted = False
    # Whether a kept session is being looked for or resumed for this
    # connection: its input waits (refused), its size is kept for later.
    _resuming = False
    _resume_size: tuple[int, int] | None = None
    # When the session this connection resumed had been put away, and
    # whether its notice went out.
    _resumed_from: float | None = None
    _resumed_told = False

    def _wants_resume(self, request) -> None:
        self._resume_wanted = request.params.get("resume", [""])[0] == "1"

    @property
    def _keeping(self):
        return self.factory.sessions.keeping

    def _not_live(self, session_id: str, size, not_found: SessionNotFound) -> None:
        """
        C{session_id} names no live session of this connection's user: if it
        is a kept one, say so, or (C{resume=1}) resume it; else it was not
        found.
        """
        keeping = self._keeping
        if keeping is None:
            self._refuse(not_found.message, not_found.code, self.CLOSE_SESSION_NOT_FOUND)
            return
        self._resuming, self._resume_size = True, size
        d = maybeDeferred(keeping.find, session_id, self._user)
        d.addCallback(self._kept_found, not_found)
        d.addErrback(self._resume_failed)
        d.addErrback(lambda f: _log.failure("a kept session's connection failed", f))

    def _kept_found(self, kept, not_found: SessionNotFound) -> None:
        if self._phase is _Phase.DONE:
            return
        if kept is None:
            self._resuming = False
            self._refuse(not_found.message, not_found.code, self.CLOSE_SESSION_NOT_FOUND)
            return
        if not self._resume_wanted:
            self._resuming = False
            message = kept_message(kept)
            _log.info("refused {peer}: {message}", peer=self.peer, message=short_ids(message))
            self._manager.metrics.error_sent(SESSION_KEPT)
            self._send(wire.encode_error(message, SESSION_KEPT, kept_at=kept.kept_at,
                                         kept_until=kept.expires_at))
            self._close(self.CLOSE_SESSION_NOT_FOUND, message)
            return
        try:
            d = self.factory.sessions.resume(OpenRequest(
                user=self._user, address=self._client_address, profile=kept.profile,
                door="websocket"), kept)
        except AdmissionRefused as e:
            self._resuming = False
            self._refuse(e.message, e.code, CLOSE_QUOTA_EXCEEDED
                         if e.code == QUOTA_EXCEEDED else self.CLOSE_UNAVAILABLE)
            return
        d.addCallback(self._resumed, kept.kept_at)
        return d

    def _resumed(self, session, kept_at: float) -> None:
        self._resuming = False
        if self._phase is _Phase.DONE:
            # Its client left meanwhile: the session waits, live, as one
            # whose client left does.
            return
        self._resumed_from = kept_at
        try:
            self._session = self._manager.reconnect(session.id, self, None, user=self._user)
        except SessionNotFound as e:
            self._refuse(e.message, e.code, self.CLOSE_SESSION_NOT_FOUND)
            return
        if (self._resume_size is not None and self._session is not None
                and self._phase is _Phase.SESSION):
            self._manager.resize(self._session, *self._resume_size)

    def _resume_failed(self, failure) -> None:
        self._resuming = False
        if self._phase is _Phase.DONE:
            return
        if failure.check(SessionNotFound, ContainerGone):
            self._refuse(failure.value.message, "session_not_found",
                         self.CLOSE_SESSION_NOT_FOUND)
            return
        if not failure.check(CapsuleError):
            _log.failure("resuming a kept session for {peer} failed", failure, peer=self.peer)
        message = (failure.value.message if failure.check(CapsuleError)
                   else "internal error")
        self._refuse(f"the session could not be resumed: {message}", "resume_failed",
                     self.CLOSE_UNAVAILABLE)

    def _while_resuming(self, message) -> None:
        """
        A frame while the session is looked for or resumed: a size is kept
        for it, input refused.
        """
        if isinstance(message, wire.Resize):
            self._resume_size = (message.cols, message.rows)
        elif isinstance(message, wire.Input):
            raise wire.ProtocolError("the session is being resumed: type once it is connected",
                                     RESUMING)

    def _keep_fields(self, session) -> dict:
        """
        What a C{connected} frame says of keeping: C{on_close}, and
        C{resumed_from} after a resume.
        """
        fields = {}
        keeping = self._keeping
        if keeping is not None:
            fields["on_close"] = keeping.on_close(session)
        resumed_from = self._resumed_from
        if resumed_from is None:
            resumed_from = getattr(session, "resumed_from", None)
        if resumed_from is not None:
            fields["resumed_from"] = resumed_from
        return fields

    def _tell_resumed(self) -> None:
        """
        After C{connected}, on the connection that resumed its session.
        """
        if self._resumed_from is not None and not self._resumed_told:
            self._resumed_told = True
            self._send(wire.encode_notice(RESUMED, (
                f"resumed: this session was put away on {when(self._resumed_from)}; its shell"
                " is new, and the screen above is from before")))
