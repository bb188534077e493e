"""
C{/api/export/{session_id}}: a session's C{/workspace}, streamed as .tar.gz.

Docker sends the tar; a worker of the export pool compresses it chunk by
chunk into the export's spool (L{capsule.web.streams.Spool}: memory, then a
temporary file), at Docker's pace, and the reactor sends the spool to the
client at the client's.  Docker holds the container's lock while its stream
is open, so that stream must not wait on a client: a spool holds at most
C{spool} bytes, all spools together C{spool_budget}, and a client that takes
nothing while its spool is full is cut off after C{stall} seconds (so is an
export that finds the shared budget full that long), which closes Docker's
stream.  While it is open, the session's execs and uploads are refused
(409 C{export_in_progress}, L{ExportResource.exporting}) rather than left
waiting on the container.  Memory use does not depend on the workspace's
size.  An error after the first byte aborts the connection: a truncated
archive is never passed off as a complete one.

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

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from capsule.core.errors import CapsuleError, ContainerGone, DockerUnavailable
from capsule.core.protocol import ProtocolError, parse_session_id
from capsule.sessions.manager import SessionManager
from capsule.web.http import Refusal, json_error, peer_address
from capsule.web.streams import Spool, SpoolBudget, SpoolClosed, SpoolStalled

_log = Logger()

# zlib's fastest level: exports are bound by CPU, and a workspace's archive
# is downloaded once.
COMPRESSION_LEVEL = 1
EXPORTS_PER_CLIENT = 2
EXPORT_MAX_BYTES = 2 * 1024 ** 3
EXPORT_TIMEOUT = 600.0
# Bytes of archive one export may hold for its client, and all together
# (memory, then temporary files: capsule.web.streams.Spool).
EXPORT_SPOOL = 256 * 1024 * 1024
EXPORT_SPOOL_BUDGET = 1024 ** 3
# Seconds Docker's stream may wait for room in a spool whose client takes
# nothing; the container is locked meanwhile.
EXPORT_STALL = 20.0
# Bytes handed to the client's connection at a time.
SEND_CHUNK = 64 * 1024
# What a client refused for having too many exports is told to wait.
RETRY_AFTER = 10


class TooManyExports(Exception):
    pass


class ExportTicket:
    """
    One export's place in an L{ExportQueue}: C{ready} fires when a worker
    is free for it; C{release} gives the worker back once the export no
    longer needs it (Docker's stream is read: what is left is the client's
    download, from the spool); C{done} gives the place up, whether it ran or
    waited.
    """

    def __init__(self, queue: "ExportQueue", client: str) -> None:
        self._queue, self.client = queue, client
        self.ready: Deferred = Deferred(lambda d: self.done())
        self.running = self.finished = False

    def release(self) -> None:
        if self.running:
            self.running = False
            self._queue._free(self)

    def done(self) -> None:
        if not self.finished:
            self.finished = True
            self._queue._leave(self)


class ExportQueue:
    """
    At most C{workers} exports read from Docker at once; the others wait,
    one queue per client address.  A freed worker goes to the waiting client
    with the fewest exports reading, and among those to the one served
    longest ago (round-robin), not to the export that asked first.  A client
    may have at most C{per_client} exports reading, waiting, or still being
    downloaded.
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

    def _free(self, ticket: ExportTicket) -> None:
        self.running -= 1
        left = self._running_of[ticket.client] - 1
        if left:
            self._running_of[ticket.client] = left
        else:
            del self._running_of[ticket.client]
        self._next()

    def _leave(self, ticket: ExportTicket) -> None:
        left = self._counts[ticket.client] - 1
        if left:
            self._counts[ticket.client] = left
        else:
            del self._counts[ticket.client]
            self._served.pop(ticket.client, None)
        if ticket.running:
            ticket.release()
            return
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
    @ivar workers: exports that read from Docker at once (the export pool's
        threads).
    @ivar per_client: exports one client address may have running or waiting.
    @ivar max_bytes: bytes of archive after which an export is cut off.
    @ivar timeout: seconds of work after which an export is cut off.
    @ivar spool: bytes of archive one export may hold that its client has
        not taken yet.
    @ivar spool_budget: bytes all exports together may hold so.
    @ivar stall: seconds an export's reading of Docker's stream may wait for
        room in its spool (its client taking nothing meanwhile) before the
        export is cut off.
    """

    workers: int = 4
    per_client: int = EXPORTS_PER_CLIENT
    max_bytes: int = EXPORT_MAX_BYTES
    timeout: float = EXPORT_TIMEOUT
    spool: int = EXPORT_SPOOL
    spool_budget: int = EXPORT_SPOOL_BUDGET
    stall: float = EXPORT_STALL


class ExportResource(Resource):
    """
    C{/api/export}: its children are sessions.

    @param client_address: the address a request counts against (by
        default the socket's peer).
    @param spool_directory: where spools' temporary files are made (by
        default C{$TMPDIR}).
    """

    def __init__(self, manager: SessionManager, docker, reactor, path: str = "/workspace",
                 limits: ExportLimits = ExportLimits(), client_address=peer_address,
                 spool_directory: str | None = None, keeping=None) -> None:
        super().__init__()
        # The kept sessions (capsule.sessions.keeping), whose workspaces
        # export as a live session's do: Docker reads a stopped container's
        # files.  None: only live sessions.
        self._keeping = keeping
        self._manager, self._docker, self._reactor, self._path = manager, docker, reactor, path
        self.limits = limits
        self.queue = ExportQueue(limits.workers, limits.per_client)
        self.budget = SpoolBudget(limits.spool_budget)
        self.spool_directory = spool_directory
        self.client_address = client_address
        self.streams: set[_SpooledExport] = set()
        # The sessions whose archive Docker streams now, by id: Docker holds
        # their container's lock meanwhile.
        self._reading: dict[str, int] = {}
        # An export thread waiting for room in its spool would block the
        # export pool's stop, and with it the reactor's.
        reactor.addSystemEventTrigger("before", "shutdown", self._stop_exports)

    def exporting(self, session_id: str) -> bool:
        """
        Whether Docker streams the workspace of session C{session_id} for an
        export now (and so holds its container: a Docker call into it would
        wait until the stream ends).
        """
        return session_id in self._reading

    def _stop_exports(self) -> None:
        for stream in list(self.streams):
            stream.cut_off("capsule is stopping")

    def getChild(self, name: bytes, request):
        try:
            session_id = parse_session_id(name.decode("utf-8", "replace"))
        except ProtocolError as e:
            return Refusal(404, e.message, e.code)
        # Another user's session is, to this one, a session that does not exist.
        user = getattr(request, "capsule_user", None)
        session = self._manager.find(session_id, user)
        if session is None or session.over:
            if self._keeping is not None:
                return KeptExportResource(session_id, user, self)
            return Refusal(404, f"no live session {session_id}", "session_not_found")
        if session.container_id is None:
            return Refusal(409, f"session {session_id} is still starting", "starting")
        return WorkspaceExportResource(session.id, session.container_id, self)

    def kept(self, session_id: str, user) -> Deferred:
        """
        Fire with C{user}'s kept session C{session_id}, or C{None}.
        """
        return maybeDeferred(self._keeping.find, session_id, user)

    def render(self, request):
        return json_error(request, 404, "GET /api/export/{session_id}", "not_found")


class ExportAborted(Exception):
    pass


class ExportCutOff(ExportAborted):
    """
    The export passed one of its limits.
    """


@implementer(IPushProducer)
class _SpooledExport:
    """
    One export: a worker thread reads Docker's stream, compresses it and puts
    it into a L{Spool} (L{thd_write}), at Docker's pace while the spool has
    room; the reactor sends the spool to the client at the client's pace
    (L{pump}).  A client that takes nothing while the spool is full gets
    L{ExportLimits.stall} seconds, then the export is cut off: Docker's
    stream, and with it the container's lock, is never held longer on a
    client's account.

    @ivar cut: why the export was cut off, once it has been.
    @ivar ended: fires once the export is over, however it ended.
    """

    def __init__(self, reactor, request, filename: str, session_id: str,
                 limits: ExportLimits, spool: Spool, metrics) -> None:
        self._reactor = reactor
        self._request = request
        self._filename = filename
        self._session_id = session_id
        self._max_bytes, self._stall = limits.max_bytes, limits.stall
        self._spool = spool
        self._metrics = metrics
        self._gzip = zlib.compressobj(COMPRESSION_LEVEL, zlib.DEFLATED, 31)
        self._paused = self._pumping = False
        self._tail: bytes | None = None
        self.gone = False
        self.started = False
        self.produced = 0
        self.sent = 0
        self.cut: str | None = None
        self.ended: Deferred = Deferred()
        request.notifyFinish().addErrback(lambda _: self._client_gone())

    # -- the export thread -------------------------------------------------

    def thd_write(self, chunk: bytes) -> None:
        if self.gone:
            raise ExportAborted(self.cut or "the client went away")
        data = self._gzip.compress(chunk)
        if not data:
            return
        if self.produced + len(data) > self._max_bytes:
            why = f"the archive passed {self._max_bytes} bytes"
            self._reactor.callFromThread(self.cut_off, why)
            raise ExportCutOff(why)
        try:
            self._spool.thd_put(data, self._stall)
        except SpoolStalled as e:
            self._reactor.callFromThread(self._stalled, e)
            raise ExportCutOff(e.message) from None
        except SpoolClosed:
            raise ExportAborted(self.cut or "the client went away") from None
        self.produced += len(data)
        self._reactor.callFromThread(self.pump)

    # -- the reactor -------------------------------------------------------

    def _start(self) -> None:
        if not self.started:
            self.started = True
            request = self._request
            request.setHeader(b"content-type", b"application/gzip")
            request.setHeader(b"content-disposition",
                              f'attachment; filename="{self._filename}"'.encode("ascii"))
            request.setHeader(b"cache-control", b"no-store")
            request.registerProducer(self, True)

    def pump(self) -> None:
        """
        Send what the spool holds while the client's connection takes it;
        once Docker's stream is read and the spool sent, the archive's end.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._paused and not self.gone and not self.ended.called:
                data = self._spool.take(SEND_CHUNK)
                if not data:
                    if self._tail is not None:
                        self._finish()
                    return
                self._start()
                self.sent += len(data)
                self._request.write(data)
        finally:
            self._pumping = False

    def reading_done(self) -> None:
        """
        Docker's stream is read: the archive's end follows what the spool
        holds, unless that would pass the size cap.
        """
        if self.gone or self.ended.called:
            return
        tail = self._gzip.flush()
        if self.produced + len(tail) > self._max_bytes:
            self.cut_off(f"the archive passed {self._max_bytes} bytes")
            return
        self.produced += len(tail)
        self._tail = tail
        self.pump()

    def _finish(self) -> None:
        self._start()
        self.sent += len(self._tail)
        self._request.write(self._tail)
        self._request.unregisterProducer()
        self._request.finish()
        _log.info("exported the workspace of session {session_id} ({sent} bytes)",
                  session_id=self._session_id[:8], sent=self.sent)
        self._end(None)

    def _stalled(self, stalled: SpoolStalled) -> None:
        if not (self.gone or self.ended.called):
            self._metrics.export_stalled()
        self.cut_off(stalled.message)

    def cut_off(self, why: str) -> None:
        """
        End the export for passing a limit: abort the connection if part of
        the archive is out (the download then fails rather than looking
        complete), else answer with an error.
        """
        if self.gone or self.ended.called:
            return
        self.cut = why
        _log.warn("export of session {session_id} cut off after {sent} bytes: {why}",
                  session_id=self._session_id[:8], sent=self.sent, why=why)
        self._break(503, f"export cut off: {why}", "export_limit")

    def failed(self, status: int, message: str) -> None:
        """
        Reading Docker's stream failed: answer with an error, or, if part of
        the archive is out, break the connection so that the download fails
        instead of ending as if complete.
        """
        if self.gone or self.ended.called:
            return
        # A container gone (404) is a session gone, for whoever asked.
        self._break(status, f"export failed: {message}",
                    "session_not_found" if status == 404 else "export_failed")

    def _break(self, status: int, message: str, code: str) -> None:
        """
        End the export unfinished: a JSON error if nothing of the archive
        went out yet, else a broken connection, so that the download fails
        instead of ending as if complete.
        """
        self.gone = True
        self._spool.close()
        request = self._request
        if self.started:
            request.unregisterProducer()
            request.channel.transport.abortConnection()
        else:
            request.write(json_error(request, status, message, code))
            request.finish()
        self._end(None)

    def _client_gone(self) -> None:
        if self.gone or self.ended.called:
            return
        self.gone = True
        self._spool.close()
        _log.info("export of session {session_id} abandoned by the client",
                  session_id=self._session_id[:8])
        self._end(None)

    def _end(self, result) -> None:
        if not self.ended.called:
            self.ended.callback(result)

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.pump()

    def stopProducing(self) -> None:
        self._client_gone()


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
        metrics = exports._manager.metrics
        if exports.budget.full():
            # What the spools hold already is their clients' to take first.
            ticket.done()
            metrics.refused("exports_busy")
            _log.warn("refused an export of session {session_id}: the exports' spool is full"
                      " ({budget} bytes)", session_id=self._session_id[:8],
                      budget=exports.budget.total)
            request.setHeader(b"retry-after", b"%d" % RETRY_AFTER)
            request.write(json_error(request, 503, "capsule holds as much of other exports as"
                                     " it may: try again shortly", "exports_busy"))
            request.finish()
            return
        stamp = datetime.datetime.fromtimestamp(reactor.seconds(), datetime.timezone.utc)
        filename = f"capsule-{self._session_id[:8]}-workspace-{stamp:%Y%m%d-%H%M%S}.tar.gz"
        spool = Spool(exports.budget, exports.limits.spool, directory=exports.spool_directory)
        stream = _SpooledExport(reactor, request, filename, self._session_id, exports.limits,
                                spool, metrics)
        exports.streams.add(stream)
        metrics.export_started()
        timeout = exports.limits.timeout
        timer = reactor.callLater(
            timeout, lambda: stream.cut_off(f"it took longer than {timeout:g} s"))
        session_id = self._session_id
        exports._reading[session_id] = exports._reading.get(session_id, 0) + 1

        d = exports._docker.export_workspace(self._container_id, exports._path,
                                             stream.thd_write)

        def read(result):
            # Docker's stream is closed: the container is free again, and
            # the worker too; the client may still be taking the spool.
            left = exports._reading.get(session_id, 1) - 1
            if left:
                exports._reading[session_id] = left
            else:
                exports._reading.pop(session_id, None)
            ticket.release()
            return result

        def failed(failure):
            if failure.check(ExportAborted) or stream.gone:
                return
            message = (failure.value.message if failure.check(CapsuleError)
                       else failure.getErrorMessage())
            _log.error("export of session {session_id} failed: {message}",
                       session_id=session_id[:8], message=message)
            status = (404 if failure.check(ContainerGone)
                      else 503 if failure.check(DockerUnavailable) else 500)
            stream.failed(status, message)

        def ended(_):
            exports.streams.discard(stream)
            ticket.done()
            spool.close()
            if timer.active():
                timer.cancel()
            metrics.export_ended(None, stream)

        d.addBoth(read)
        d.addCallbacks(lambda _: stream.reading_done(), failed)
        d.addErrback(lambda f: _log.failure("export bookkeeping failed", f))
        stream.ended.addCallback(ended)
        stream.ended.addErrback(lambda f: _log.failure("export bookkeeping failed", f))


class KeptExportResource(Resource):
    """
    C{/api/export/{id}} of a session that is not live: its workspace if it
    is one of the caller's kept sessions (its container is stopped, and
    Docker reads its files all the same), else a 404.
    """

    isLeaf = True

    def __init__(self, session_id: str, user, exports: ExportResource) -> None:
        super().__init__()
        self._session_id, self._user, self._exports = session_id, user, exports

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return json_error(request, 405, f"{request.method.decode('latin-1')[:20]} is not"
                              " allowed here; use GET", "method_not_allowed")
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def found(kept):
            if gone:
                return
            if kept is None:
                request.write(json_error(request, 404, f"no live or kept session"
                                         f" {self._session_id}", "session_not_found"))
                request.finish()
                return
            body = WorkspaceExportResource(kept.id, kept.container_id,
                                           self._exports).render_GET(request)
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()

        def failed(failure):
            _log.failure("finding kept session {session_id} failed", failure,
                         session_id=self._session_id[:8])
            if not gone:
                request.write(json_error(request, 503, "capsule could not look for the kept"
                                         " session: try again shortly", "docker_unavailable"))
                request.finish()
        self._exports.kept(self._session_id, self._user).addCallbacks(found, failed)
        return NOT_DONE_YET
