"""
What the session API's resources share: its JSON requests (bounded, checked
field by field), its errors (L{ApiError}, answered as
C{{"error": sentence, "code": word}}), answers that come later
(L{answer_when}), answers too large to hold whole, written piece by piece
at the pace of their client (L{StreamedAnswer}), and the base of a
session's POST resources with their per-session counts.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from capsule.core.errors import CapsuleError, ContainerGone, DockerUnavailable
from capsule.ops.logformat import short_ids
from capsule.web.http import json_body, json_error



_log = Logger()

# Bytes of body read on a route that takes none (GET, DELETE): enough that
# a method it does not have, sent with a small body, gets its 405.
NO_BODY = 4096
RETRY_AFTER = 5


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def error_body(request, e: ApiError) -> bytes:
    _log.info("API: {method} {path} refused with {status} {code}: {message!r}",
              method=request.method.decode("latin-1")[:10],
              path=short_ids(request.path.decode("utf-8", "replace")[:120]), status=e.status,
              code=e.code, message=short_ids(e.message[:300]))
    return json_error(request, e.status, e.message, e.code,
                      RETRY_AFTER if e.status in (429, 503) else None, **e.extra)


def user_of(request):
    return getattr(request, "capsule_user", None)


def json_request(request, what: str, empty_ok: bool = False) -> dict:
    """
    The JSON object a request's body holds (with C{empty_ok}, none is C{{}}).

    @raise ApiError: for another content type, or a body that is not one.
    """
    data = request.content.read()
    if empty_ok and not data:
        return {}
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if kind != b"application/json":
        raise ApiError(415, f"{what} takes a JSON body (Content-Type: application/json)",
                       "unsupported_media_type")
    try:
        body = json.loads(data)
    except ValueError as e:
        raise ApiError(400, f"the body is not JSON: {e}", "bad_request") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON nests too deeply", "bad_request") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "bad_request")
    return body


def only_keys(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(map(str, unknown))[:200]}; known:"
                            f" {', '.join(sorted(allowed))}", "bad_request")


def integer_field(body: dict, name: str, default, low: int, high: int):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}",
                       "bad_request")
    return value


def text_field(body: dict, name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or "\0" in value:
        raise ApiError(400, f"{name} must be a string of at most {limit} characters"
                            " without NUL", "bad_request")
    return value


class JsonResource(Resource):
    """
    A resource whose every answer, errors included, is JSON; a method it
    does not have is a 405 that says which it has.
    """

    methods: tuple[bytes, ...] = ()

    def render(self, request):
        # HEAD is GET without the body, which twisted.web leaves out.
        method = b"GET" if request.method == b"HEAD" else request.method
        if method not in self.methods:
            allowed = b", ".join(self.methods)
            request.setHeader(b"allow", allowed)
            return json_error(request, 405, f"{request.method.decode('latin-1')[:20]} is not"
                              f" allowed here; use {allowed.decode()}", "method_not_allowed")
        try:
            return getattr(self, "render_" + method.decode("ascii"))(request)
        except ApiError as e:
            return error_body(request, e)

    def getChild(self, name, request):
        return NotFound()


class NotFound(Resource):
    isLeaf = True

    def render(self, request):
        path = request.path.decode("utf-8", "replace")[:200]
        return json_error(request, 404, f"no such API route: {path} (see /api/openapi.json)",
                          "not_found")


def answer_when(request, d: Deferred, what: str):
    """
    Answer with the C{(status, body)} C{d} fires with, or the L{ApiError}
    it fails with, unless the client left meanwhile.
    """
    gone = []
    request.notifyFinish().addErrback(gone.append)

    def answer(result):
        if isinstance(result, ApiError):
            data = error_body(request, result)
        else:
            status, body = result
            if isinstance(body, StreamedAnswer):
                if gone:
                    body.drop()
                else:
                    body.write_to(request, status)
                return
            data = json_body(request, status, body)
        if not gone:
            request.write(data)
            request.finish()

    def failed(failure):
        if failure.check(ApiError):
            return failure.value
        if failure.check(ContainerGone):
            return ApiError(404, failure.value.message, "session_not_found")
        if failure.check(DockerUnavailable):
            return ApiError(503, failure.value.message, "docker_unavailable")
        _log.failure("{what} failed", failure, what=what)
        message = failure.value.message if failure.check(CapsuleError) else "internal error"
        return ApiError(500, f"{what} failed: {message}", "internal_error")

    d.addErrback(failed)
    d.addCallback(answer)
    d.addErrback(lambda f: _log.failure("answering {what} failed", f, what=what))
    return NOT_DONE_YET


class StreamedAnswer:
    """
    A JSON answer of C{length} bytes, too large to hold whole: its C{pieces}
    (an iterable of bytes) are made one at a time, as the client's
    connection takes them in, so that what capsule holds of it is what the
    pieces are made from, plus one piece and the transport's buffer.  A
    client that takes nothing in for C{stall_timeout} seconds loses it: the
    answer is dropped, its connection closed, and one line logged.
    C{on_end(written)} is called once, when it was written whole
    (C{True}) or dropped (C{False}).
    """

    def __init__(self, length: int, pieces: Iterable[bytes], reactor, stall_timeout: float,
                 what: str, on_end: Callable[[bool], None] = lambda written: None) -> None:
        self.length, self.what = length, what
        self._pieces = iter(pieces)
        self._reactor, self._stall_timeout = reactor, stall_timeout
        self._on_end = on_end
        self.ended = False

    def write_to(self, request, status: int) -> None:
        """
        Answer C{request} with C{status} and this answer's pieces.
        """
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % self.length)
        _AnswerWriter(request, self).start()

    def next_piece(self) -> bytes | None:
        return next(self._pieces, None)

    def end(self, written: bool) -> None:
        """
        Let go of what the answer is made from; tell C{on_end}, once.
        """
        if not self.ended:
            self.ended = True
            self._pieces = iter(())
            self._on_end(written)

    def drop(self) -> None:
        self.end(False)


@implementer(IPushProducer)
class _AnswerWriter:
    """
    Writes a L{StreamedAnswer} as its request's connection takes it in (a
    push producer of the request): paused, it writes nothing, and drops
    the answer once paused for the answer's C{stall_timeout}.
    """

    def __init__(self, request, answer: StreamedAnswer) -> None:
        self._request, self._answer = request, answer
        self._paused = self._writing = False
        self._written = 0
        self._stall = None

    def start(self) -> None:
        # A client that leaves: its answer is let go at once.
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._request.registerProducer(self, True)
        if getattr(self._request.channel, "_waitingForTransport", False):
            # The connection was full already: it tells a new producer nothing.
            self.pauseProducing()
        self._write()

    def _write(self) -> None:
        if self._writing:
            return
        self._writing = True
        try:
            while not self._paused and not self._answer.ended:
                piece = self._answer.next_piece()
                if piece is None:
                    self._finish()
                    return
                self._written += len(piece)
                self._request.write(piece)
        except Exception:
            _log.failure("writing {what} failed", what=self._answer.what)
            self._answer.drop()
            self._cancel_stall()
            self._close()
        finally:
            self._writing = False

    def _finish(self) -> None:
        self._answer.end(True)
        self._cancel_stall()
        self._request.unregisterProducer()
        self._request.finish()

    def _cancel_stall(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        if self._answer.ended:
            return
        answer = self._answer
        _log.warn("API: the client of {what} read none of it for {seconds:g} s: dropped, with"
                  " {written} of {length} bytes written, and its connection closed",
                  what=answer.what, seconds=answer._stall_timeout, written=self._written,
                  length=answer.length)
        answer.drop()
        self._close()

    def _close(self) -> None:
        """
        Close the connection at once: what the answer left unwritten is
        let go.
        """
        channel = self._request.channel
        if channel is None:
            return
        self._request.unregisterProducer()
        transport = channel.transport
        if transport is not None:
            abort = getattr(transport, "abortConnection", None) or transport.loseConnection
            abort()

    # -- IPushProducer ---------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        if self._stall is None and not self._answer.ended:
            answer = self._answer
            self._stall = answer._reactor.callLater(answer._stall_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self._paused = False
        self._cancel_stall()
        self._write()

    def stopProducing(self) -> None:
        # The connection is lost: nothing more is written.
        self._cancel_stall()
        self._answer.drop()


class SessionPost(JsonResource):
    """
    A session's POST resource (C{/api/sessions/{id}/...}): a leaf, of the
    session C{session_id}, sharing the API's state (L{capsule.web.api.SessionApi}).
    """

    isLeaf = True
    methods = (b"POST",)

    def __init__(self, api, session_id: str) -> None:
        super().__init__()
        self.api, self.session_id = api, session_id


def count_down(counts: dict[str, int], session_id: str) -> None:
    """
    One fewer of a session's running requests in C{counts}; none is no key.
    """
    left = counts.get(session_id, 1) - 1
    if left:
        counts[session_id] = left
    else:
        counts.pop(session_id, None)


class Slot:
    """
    One of a session's running requests in C{counts} (its execs, its
    uploads), taken when its headers came, released once.
    """

    def __init__(self, counts: dict[str, int], session_id: str) -> None:
        self.counts, self.session_id = counts, session_id
        counts[session_id] = counts.get(session_id, 0) + 1
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            count_down(self.counts, self.session_id)
