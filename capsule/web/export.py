"""
C{/api/export/{session_id}}: a session's C{/workspace}, streamed as .tar.gz.

Docker sends the tar; a worker of the export pool compresses it chunk by
chunk and hands each piece to the reactor, waiting while the client's
connection is full, so memory use does not depend on the workspace's size.
An error after the first byte aborts the connection: a truncated archive is
never passed off as a complete one.

Exports share a few workers (C{--export-threads}).  L{ExportQueue} hands them
out round-robin between client addresses, so that one client's many exports
cannot make another's wait behind all of them, and refuses a client more
than C{--exports-per-client} exports at a time (429).  One export's cost is
bounded: fast compression (level 1), at most C{--export-max-bytes} of
archive and C{--export-timeout} seconds of work, after which it is cut off.
"""

from __future__ import annotations

import datetime
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from capsule.core.errors import CapsuleError, ContainerGone, DockerUnavailable
from capsule.core.protocol import ProtocolError, parse_session_id
from capsule.sessions.manager import SessionManager
from capsule.web.http import Refusal, json_error, peer_address
from capsule.web.streams import ThreadFedProducer

_log = Logger()

# zlib's fastest level: exports are bound by CPU, and a workspace's archive
# is downloaded once.
COMPRESSION_LEVEL = 1
EXPORTS_PER_CLIENT = 2
EXPORT_MAX_BYTES = 2 * 1024 ** 3
EXPORT_TIMEOUT = 600.0
# What a client refused for having too many exports is told to wait.
RETRY_AFTER = 10


class TooManyExports(Exception):
    pass


class ExportTicket:
    """
    One export's place in an L{ExportQueue}: C{ready} fires when a worker
    is free for it; C{done} gives the place up, whether it ran or waited.
    """

    def __init__(self, queue: "ExportQueue", client: str) -> None:
        self._queue, self.client = queue, client
        self.ready: Deferred = Deferred(lambda d: self.done())
        self.running = self.finished = False

    def done(self) -> None:
        if not self.finished:
            self.finished = True
            self._queue._leave(self)


class ExportQueue:
    """
    At most C{workers} exports run at once; the others wait, one queue per
    client address.  A freed worker goes to the waiting client with the
    fewest exports running, and among those to the one served longest ago
    (round-robin), not to the export that asked first.  A client may have
    at most C{per_client} exports running or waiting.
    """

    def __init__(self, workers: int, per_client: int) -> None:
        self.workers, self.per_client = workers, per_client
        self.running = 0
        self._waiting: OrderedDict[str, deque[ExportTicket]] = OrderedDict()
        self._counts: dict[str, int] = {}
        self._running_of: dict[str, int] = {}
        # When each client with exports was last given a worker.
        self._served: dict[str, int] = {}
        self._turn = 0

    def of(self, client: str) -> int:
        """
        The exports of C{client}, running or waiting.
        """
        return self._counts.get(client, 0)

    def waiting(self) -> int:
        return sum(map(len, self._waiting.values()))

    def join(self, client: str) -> ExportTicket:
        """
        @raise TooManyExports: C{client} has C{per_client} exports already.
        """
        if self.of(client) >= self.per_client:
            raise TooManyExports(client)
        self._counts[client] = self.of(client) + 1
        ticket = ExportTicket(self, client)
        self._waiting.setdefault(client, deque()).append(ticket)
        self._next()
        return ticket

    def _leave(self, ticket: ExportTicket) -> None:
        left = self._counts[ticket.client] - 1
        if left:
            self._counts[ticket.client] = left
        else:
            del self._counts[ticket.client]
            self._served.pop(ticket.client, None)
        if ticket.running:
            self.running -= 1
            left = self._running_of[ticket.client] - 1
            if left:
                self._running_of[ticket.client] = left
            else:
                del self._running_of[ticket.client]
        else:
            queue = self._waiting.get(ticket.client)
            if queue is not None and ticket in queue:
                queue.remove(ticket)
                if not queue:
                    del self._waiting[ticket.client]
        self._next()

    def _next(self) -> None:
        while self.running < self.workers and self._waiting:
            client = min(self._waiting, key=lambda c: (self._running_of.get(c, 0),
                                                       self._served.get(c, -1)))
            queue = self._waiting[client]
            ticket = queue.popleft()
            if not queue:
                del self._waiting[client]
            self._served[client] = self._turn
            self._turn += 1
            ticket.running = True
            self.running += 1
            self._running_of[client] = self._running_of.get(client, 0) + 1
            ticket.ready.callback(None)


@dataclass(frozen=True)
class ExportLimits:
    """
    @ivar workers: exports that run at once (the export pool's threads).
    @ivar per_client: exports one client address may have running or waiting.
    @ivar max_bytes: bytes of archive after which an export is cut off.
    @ivar timeout: seconds of work after which an export is cut off.
    """

    workers: int = 4
    per_client: int = EXPORTS_PER_CLIENT
    max_bytes: int = EXPORT_MAX_BYTES
    timeout: float = EXPORT_TIMEOUT


class ExportResource(Resource):
    """
    C{/api/export}: its children are sessions.

    @param client_address: the address a request counts against (by
        default the socket's peer).
    """

    def __init__(self, manager: SessionManager, docker, reactor, path: str = "/workspace",
                 limits: ExportLimits = ExportLimits(), client_address=peer_address) -> None:
        super().__init__()
        self._manager, self._docker, self._reactor, self._path = manager, docker, reactor, path
        self.limits = limits
        self.queue = ExportQueue(limits.workers, limits.per_client)
        self.client_address = client_address
        self.streams: set[_GzipStream] = set()
        # An export thread waiting on its client would block the export
        # pool's stop, and with it the reactor's.
        reactor.addSystemEventTrigger("before", "shutdown", self._stop_exports)

    def _stop_exports(self) -> None:
        for stream in list(self.streams):
            stream.cut_off("capsule is stopping")

    def getChild(self, name: bytes, request):
        try:
            session_id = parse_session_id(name.decode("utf-8", "replace"))
        except ProtocolError as e:
            return Refusal(404, e.message, e.code)
        # Another user's session is, to this one, a session that does not exist.
        session = self._manager.find(session_id, getattr(request, "capsule_user", None))
        if session is None or session.over:
            return Refusal(404, f"no live session {session_id}", "session_not_found")
        if session.container_id is None:
            return Refusal(409, f"session {session_id} is still starting", "starting")
        return WorkspaceExportResource(session.id, session.container_id, self)

    def render(self, request):
        return json_error(request, 404, "GET /api/export/{session_id}", "not_found")


class ExportAborted(Exception):
    pass


class ExportCutOff(ExportAborted):
    """
    The export passed one of its limits.
    """


class _GzipStream(ThreadFedProducer):
    """
    Compresses on the export thread; writes and waits on the reactor.

    @ivar cut: why the export was cut off, once it has been.
    """

    def __init__(self, reactor, request, filename: str, session_id: str,
                 max_bytes: int) -> None:
        super().__init__()
        self._reactor = reactor
        self._request = request
        self._filename = filename
        self._session_id = session_id
        self._max_bytes = max_bytes
        self._gzip = zlib.compressobj(COMPRESSION_LEVEL, zlib.DEFLATED, 31)
        self.gone = False
        self.started = False
        self.sent = 0
        self.cut: str | None = None
        request.notifyFinish().addErrback(lambda _: self.stopProducing())

    # thread side
    def thd_write(self, chunk: bytes) -> None:
        if self.gone:
            raise ExportAborted(self.cut or "the client went away")
        data = self._gzip.compress(chunk)
        if data:
            blockingCallFromThread(self._reactor, self._write, data)

    def flush(self) -> bytes:
        return self._gzip.flush()

    # reactor side
    def _start(self) -> None:
        if not self.started:
            self.started = True
            request = self._request
            request.setHeader(b"content-type", b"application/gzip")
            request.setHeader(b"content-disposition",
                              f'attachment; filename="{self._filename}"'.encode("ascii"))
            request.setHeader(b"cache-control", b"no-store")
            request.registerProducer(self, True)

    def _write(self, data: bytes):
        if self.gone:
            raise ExportAborted(self.cut or "the client went away")
        if self.sent + len(data) > self._max_bytes:
            self.cut_off(f"the archive passed {self._max_bytes} bytes")
            raise ExportCutOff(self.cut)
        self._start()
        self.sent += len(data)
        self._request.write(data)
        return self._written()

    def finish(self) -> None:
        """
        Send the end of the archive, unless that would pass the size cap.
        """
        tail = self.flush()
        if self.sent + len(tail) > self._max_bytes:
            self.cut_off(f"the archive passed {self._max_bytes} bytes")
            return
        self._start()
        self.sent += len(tail)
        self._request.write(tail)
        self._request.unregisterProducer()
        self._request.finish()

    def cut_off(self, why: str) -> None:
        """
        End the export for passing a limit: abort the connection if part of
        the archive is out (the download then fails rather than looking
        complete), else answer with an error.
        """
        if self.gone:
            return
        self.cut = why
        _log.warn("export of session {session_id} cut off after {sent} bytes: {why}",
                  session_id=self._session_id[:8], sent=self.sent, why=why)
        request = self._request
        if self.started:
            request.unregisterProducer()
            self.stopProducing()
            request.channel.transport.abortConnection()
            return
        self.stopProducing()
        request.write(json_error(request, 503, f"export cut off: {why}", "export_limit"))
        request.finish()

    def stopProducing(self) -> None:
        self.gone = True
        self._release(ExportAborted(self.cut or "the client went away"))


class WorkspaceExportResource(Resource):
    isLeaf = True

    def __init__(self, session_id, container_id, exports: ExportResource) -> None:
        super().__init__()
        self._session_id, self._container_id = session_id, container_id
        self._exports = exports

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return json_error(request, 405, f"{request.method.decode('latin-1')[:20]} is not"
                              " allowed here; use GET", "method_not_allowed")
        return super().render(request)

    def render_GET(self, request):
        exports = self._exports
        client = exports.client_address(request)
        try:
            ticket = exports.queue.join(client)
        except TooManyExports:
            exports._manager.metrics.refused("too_many_exports")
            limit = exports.limits.per_client
            _log.info("refused an export of session {session_id} to {client}: it has"
                      " {limit} exports already", session_id=self._session_id[:8],
                      client=client, limit=limit)
            request.setHeader(b"retry-after", b"%d" % RETRY_AFTER)
            return json_error(request, 429,
                              f"too many exports at once from {client} (at most {limit})",
                              "too_many_exports")
        request.notifyFinish().addErrback(lambda _: ticket.ready.cancel())
        ticket.ready.addCallback(lambda _: self._export(request, ticket))
        ticket.ready.addErrback(lambda f: f.trap(CancelledError))
        ticket.ready.addErrback(lambda f: _log.failure("export bookkeeping failed", f))
        return NOT_DONE_YET

    def _export(self, request, ticket: ExportTicket) -> None:
        exports = self._exports
        reactor = exports._reactor
        stamp = datetime.datetime.fromtimestamp(reactor.seconds(), datetime.timezone.utc)
        filename = f"capsule-{self._session_id[:8]}-workspace-{stamp:%Y%m%d-%H%M%S}.tar.gz"
        stream = _GzipStream(reactor, request, filename, self._session_id,
                             exports.limits.max_bytes)
        exports.streams.add(stream)
        exports._manager.metrics.export_started()
        timeout = exports.limits.timeout
        timer = reactor.callLater(
            timeout, lambda: stream.cut_off(f"it took longer than {timeout:g} s"))

        def _thd_write(chunk: bytes) -> None:
            stream.thd_write(chunk)

        d = exports._docker.export_workspace(self._container_id, exports._path, _thd_write)

        def ended(result):
            exports._manager.metrics.export_ended(result, stream)
            exports.streams.discard(stream)
            ticket.done()
            if timer.active():
                timer.cancel()
            return result

        def done(_):
            if stream.gone:
                return
            stream.finish()
            if stream.cut is None:
                _log.info("exported the workspace of session {session_id} ({sent} bytes)",
                          session_id=self._session_id[:8], sent=stream.sent)

        def failed(failure):
            if stream.cut is not None:
                return
            if failure.check(ExportAborted) or stream.gone:
                _log.info("export of session {session_id} abandoned by the client",
                          session_id=self._session_id[:8])
                return
            message = failure.value.message if failure.check(CapsuleError) else failure.getErrorMessage()
            _log.error("export of session {session_id} failed: {message}",
                       session_id=self._session_id[:8], message=message)
            if stream.started:
                # Part of the archive is out: break the connection so the
                # download fails instead of ending as if complete.
                request.unregisterProducer()
                request.channel.transport.abortConnection()
                return
            status = 404 if failure.check(ContainerGone) else 503 if failure.check(DockerUnavailable) else 500
            request.write(json_error(request, status, f"export failed: {message}", "export_failed"))
            request.finish()

        d.addBoth(ended)
        d.addCallbacks(done, failed)
        d.addErrback(lambda f: _log.failure("export bookkeeping failed", f))
