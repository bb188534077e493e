"""
Request bodies of the git gateway (L{capsule.gateway.git}) passed on as
they come: a push's pack goes from the session's connection to the
upstream's without being held whole, the session read no faster than the
upstream takes it.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.http import Request as HTTPRequest
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from capsule.gateway.git_rules import SERVICES, GitRefused
from capsule.web.site import LimitedRequest

_log = Logger()


# -- request bodies, passed on as they come --------------------------------------------

# Bytes of a body held while the upstream takes none (before it is
# connected, or while it is slow): past the first, the session's connection
# is read no more until they are passed on; past the second (the connection
# was read anyway), the request is given up.
BODY_HIGH_WATER = 256 * 1024
BODY_MOST_HELD = 16 * 1024 * 1024


def _streamed_path(method: bytes, path: bytes) -> bool:
    return method == b"POST" and path.startswith(b"/git/") and b"?" not in path and \
        path.endswith(tuple(b"/" + s.encode() for s in SERVICES))


@implementer(IBodyProducer)
class GitBodyStream:
    """
    The body of a git request (a push's pack), from the session's
    connection to the upstream's as it comes: the request's C{content}
    (written to) and the forwarded request's body producer.  The session's
    connection is paused while the upstream takes nothing.

    @ivar limit: the most it may be (set by the gateway); past it,
        L{refusal} says why, and the rest is dropped.
    @ivar done: all of it came.
    """

    def __init__(self, request, length: int | None) -> None:
        self._request = request
        self.length = UNKNOWN_LENGTH if length is None else length
        self.limit: int | None = None
        self.received = 0
        self.done = False
        self.refusal: GitRefused | None = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._consumer = None
        self._paused = False
        self._stopped = False
        self._finished: Deferred | None = None
        self._paused_reading = False
        # Told of each piece that comes (the gateway's stall timer).
        self.on_progress: Callable[[], None] = lambda: None

    # -- the request's side (a file, for twisted.web)

    def write(self, data: bytes) -> None:
        self.received += len(data)
        self.on_progress()
        if self._stopped or self.refusal is not None:
            return
        if self.limit is not None and self.received > self.limit:
            self._refuse(GitRefused(413, "too_large", f"capsule: this request is larger than"
                                    f" the git gateway takes ({self.limit} bytes)"))
            return
        if self._consumer is not None and not self._paused and not self._held:
            self._consumer.write(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > BODY_MOST_HELD:
            self._refuse(GitRefused(502, "upstream_slow", "capsule: GitHub takes this push"
                                    " slower than it comes: given up"))
        elif self._held_bytes > BODY_HIGH_WATER:
            self._pause_reading()

    def finish(self) -> None:
        """
        All of the body came.
        """
        self.done = True
        self._resume_reading()
        self._flush()

    def seek(self, *args) -> None:
        pass

    def tell(self) -> int:
        # Nothing for twisted.web to parse as a form.
        return 0

    def read(self, *args) -> bytes:
        return b""

    def close(self) -> None:
        pass

    # -- the upstream's side (IBodyProducer)

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        self._finished = Deferred()
        self._flush()
        return self._finished

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        """
        The upstream wants no more: the rest is dropped (and read, so that
        the connection's next bytes are understood).
        """
        self._stopped = True
        self._held, self._held_bytes = [], 0
        self._resume_reading()

    # --

    def _flush(self) -> None:
        while self._held and self._consumer is not None and not self._paused \
                and not self._stopped:
            data = self._held.pop(0)
            self._held_bytes -= len(data)
            self._consumer.write(data)
        if not self._held:
            self._resume_reading()
            if self.done and self._finished is not None and not self._stopped \
                    and self.refusal is None:
                finished, self._finished = self._finished, None
                finished.callback(None)

    def _refuse(self, refusal: GitRefused) -> None:
        self.refusal = refusal
        self._held, self._held_bytes = [], 0
        self._resume_reading()
        if self._finished is not None:
            finished, self._finished = self._finished, None
            finished.errback(refusal)

    def _pause_reading(self) -> None:
        channel = getattr(self._request, "channel", None)
        if not self._paused_reading and channel is not None:
            self._paused_reading = True
            channel.transport.pauseProducing()

    def _resume_reading(self) -> None:
        channel = getattr(self._request, "channel", None)
        if self._paused_reading:
            self._paused_reading = False
            if channel is not None and not getattr(channel, "_waitingForTransport", False):
                channel.transport.resumeProducing()


class GitStreamingRequest(LimitedRequest):
    """
    The gateway site's request (L{capsule.gateway.site.GatewaySite}): for
    git's C{POST}s under C{/git/}, the body is not read whole first: the
    request reaches the gateway as soon as its headers are in, its body
    passed on as it comes (L{GitBodyStream}; the gateway bounds it).  Any
    other request is a L{LimitedRequest}: its body limited by its path
    before any of it is read.
    """

    _streamed = False

    def gotLength(self, length):
        channel = self.channel
        method = getattr(channel, "_command", b"")
        path = getattr(channel, "_path", b"")
        if not _streamed_path(method, path):
            super().gotLength(length)
            return
        self._streamed = True
        self.content = GitBodyStream(self, length)
        # "100 Continue" only once the gateway took the request: never after
        # a refusal it already began to write.
        expect = self.requestHeaders.getRawHeaders(b"expect")
        self.requestHeaders.removeHeader(b"expect")
        version = getattr(channel, "_version", b"HTTP/1.1")
        HTTPRequest.requestReceived(self, method, path, version)
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1" \
                and not self.startedWriting and not self.finished:
            channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def handleContentChunk(self, data):
        if self._streamed:
            self.content.write(data)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self._streamed:
            self._received()
            self.content.finish()
            return
        super().requestReceived(command, path, version)


def close_after(request, reactor) -> None:
    """
    Finish a request whose body is still coming: the connection then closes
    (whatever of the body follows is never read as a next request).
    """
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.persistent = False
    body = getattr(request, "content", None)
    if isinstance(body, GitBodyStream):
        body.stopProducing()

    def finish():
        if not request.finished and getattr(request, "channel", None) is not None:
            request.finish()
    reactor.callLater(0, finish)


def finish_request(request, reactor) -> None:
    """
    Finish a request: at once if its body is in, else closing its
    connection (L{close_after}).
    """
    body = getattr(request, "content", None)
    if isinstance(body, GitBodyStream) and not body.done:
        close_after(request, reactor)
    elif not request.finished and getattr(request, "channel", None) is not None:
        request.finish()
