"""
C{GET /api/sessions/{id}/recording?since=UNIX_TIME}: what a session printed
since then, as asciicast v2 (C{application/x-asciicast}), for the page's
"while you were away" player (L{capsule.ops.playback} says what it holds:
the screen that was left, a marker, then every event since, its times
rebased to begin at 0, cut with a marker past L{PLAYBACK_MAX_BYTES}).

The session's owner's only, as every session route: another user's session
is a 404 like a missing one; so is a session that is neither live nor kept
(its recording is the operator's, in C{--record DIR}).  A session without a
recording (C{--record} off, or nothing recorded of it) is a 404 with code
C{not_recorded}.  The files are read on the recorder's thread, never the
reactor's; at most L{capsule.ops.recording.PLAYBACKS_AT_ONCE} at once (429
past that).
"""

from __future__ import annotations

import math

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from capsule.ops.playback import NotRecorded
from capsule.ops.recording import RecorderBusy
from capsule.web.api_base import ApiError, JsonResource, error_body, user_of

_log = Logger()

# Bytes of asciicast one answer holds (the lead-in and the header aside).
PLAYBACK_MAX_BYTES = 8 * 1024 * 1024
CONTENT_TYPE = b"application/x-asciicast"
# How far in the future `since` may be (clocks differ a little).
_FUTURE = 300.0


def parse_since(request, now: float) -> float:
    """
    The query's C{since}: a Unix time, in seconds (a fraction allowed); 0
    when it is not given (the whole recording).

    @raise ApiError: 400 for anything else.
    """
    values = request.args.get(b"since")
    if not values:
        return 0.0
    raw = values[-1][:40].decode("ascii", "replace")
    try:
        since = float(raw)
    except ValueError:
        since = math.nan
    if not math.isfinite(since) or since < 0 or since > now + _FUTURE:
        raise ApiError(400, f"since must be a Unix time in seconds, not after now; got"
                            f" {raw[:20]!r}", "bad_request")
    return since


class RecordingResource(JsonResource):
    """
    C{/api/sessions/{id}/recording}: GET, for the session's owner.
    """

    methods = (b"GET",)

    def __init__(self, api, session_id: str) -> None:
        super().__init__()
        self.api, self.session_id = api, session_id

    def _owned(self, request) -> None:
        """
        @raise ApiError: 404 unless the session is the caller's, live or
            kept.
        """
        user = user_of(request)
        manager = self.api.manager
        if manager.find(self.session_id, user) is not None:
            return
        keeping = getattr(manager, "keeping", None)
        if keeping is not None and keeping.find(self.session_id, user) is not None:
            return
        raise ApiError(404, f"no session {self.session_id}", "session_not_found")

    def getChild(self, name: bytes, request):
        return self if name == b"" else super().getChild(name, request)

    def render_GET(self, request):
        api = self.api
        self._owned(request)
        since = parse_since(request, api.reactor.seconds())
        recorder = api.recorder
        if recorder is None:
            raise ApiError(404, "capsule does not record sessions (its operator did not"
                                " give --record)", "not_recorded")
        try:
            d = recorder.playback(self.session_id, since, PLAYBACK_MAX_BYTES)
        except RecorderBusy as e:
            raise ApiError(429, str(e), "recording_busy") from None
        return self._answer(request, d)

    def _answer(self, request, d: Deferred):
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def read(playback):
            if playback.cut:
                _log.info("the playback of session {short} was cut at {limit} bytes (events"
                          " kept: {events})", short=self.session_id[:8],
                          limit=PLAYBACK_MAX_BYTES, events=playback.events)
            if gone:
                return
            request.setResponseCode(200)
            request.setHeader(b"content-type", CONTENT_TYPE)
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"content-length", b"%d" % len(playback.data))
            if request.method != b"HEAD":
                request.write(playback.data)
            request.finish()

        def failed(failure):
            if failure.check(NotRecorded):
                error = ApiError(404, f"session {self.session_id} has no recording: nothing"
                                      " of it was recorded", "not_recorded")
            else:
                _log.failure("reading the recording of session {short} failed", failure,
                             short=self.session_id[:8])
                error = ApiError(500, "reading the recording failed: internal error",
                                 "internal_error")
            if not gone:
                request.write(error_body(request, error))
                request.finish()

        d.addCallbacks(read, failed)
        d.addErrback(lambda f: _log.failure("answering a recording failed", f))
        return NOT_DONE_YET
