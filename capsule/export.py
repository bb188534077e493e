"""
C{/api/export/{session_id}}: a session's C{/workspace}, streamed as .tar.gz.

Docker sends the tar; a worker of the export pool compresses it chunk by
chunk and hands each piece to the reactor, waiting while the client's
connection is full, so memory use does not depend on the workspace's size.
An error after the first byte aborts the connection: a truncated archive is
never passed off as a complete one.
"""

from __future__ import annotations

import datetime
import json
import zlib

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from .errors import CapsuleError, ContainerGone, DockerUnavailable
from .protocol import ProtocolError, parse_session_id
from .session import SessionManager

_log = Logger()


def json_error(request, status: int, message: str, code: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps({"error": message, "code": code}).encode("utf-8")


class ErrorResource(Resource):
    isLeaf = True

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__()
        self._error = (status, message, code)

    def render(self, request):
        return json_error(request, *self._error)


class ExportResource(Resource):
    """
    C{/api/export}: its children are sessions.
    """

    def __init__(self, manager: SessionManager, docker, reactor, path: str = "/workspace") -> None:
        super().__init__()
        self._manager, self._docker, self._reactor, self._path = manager, docker, reactor, path

    def getChild(self, name: bytes, request):
        try:
            session_id = parse_session_id(name.decode("utf-8", "replace"))
        except ProtocolError as e:
            return ErrorResource(404, e.message, e.code)
        session = self._manager.sessions.get(session_id)
        if session is None or session.status() in ("ending", "ended"):
            return ErrorResource(404, f"no live session {session_id}", "session_not_found")
        if session.container_id is None:
            return ErrorResource(409, f"session {session_id} is still starting", "starting")
        return WorkspaceExportResource(session.id, session.container_id, self._docker,
                                       self._reactor, self._path)

    def render(self, request):
        return json_error(request, 404, "GET /api/export/{session_id}", "not_found")


class ExportAborted(Exception):
    pass


@implementer(IPushProducer)
class _GzipStream:
    """
    Compresses on the export thread; writes and waits on the reactor.
    """

    def __init__(self, reactor, request, filename: str) -> None:
        self._reactor = reactor
        self._request = request
        self._filename = filename
        self._gzip = zlib.compressobj(6, zlib.DEFLATED, 31)
        self._resumed: Deferred | None = None
        self._paused = False
        self.gone = False
        self.started = False
        request.notifyFinish().addErrback(lambda _: self.stopProducing())

    # thread side
    def thd_write(self, chunk: bytes) -> None:
        data = self._gzip.compress(chunk)
        if data:
            blockingCallFromThread(self._reactor, self._write, data)

    def flush(self) -> bytes:
        return self._gzip.flush()

    # reactor side
    def _write(self, data: bytes):
        if self.gone:
            raise ExportAborted("the client went away")
        if not self.started:
            self.started = True
            request = self._request
            request.setHeader(b"content-type", b"application/gzip")
            request.setHeader(b"content-disposition",
                              f'attachment; filename="{self._filename}"'.encode("ascii"))
            request.setHeader(b"cache-control", b"no-store")
            request.registerProducer(self, True)
        self._request.write(data)
        if self._paused:
            self._resumed = Deferred()
            return self._resumed
        return None

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        self.gone = True
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.errback(ExportAborted("the client went away"))


class WorkspaceExportResource(Resource):
    isLeaf = True

    def __init__(self, session_id, container_id, docker, reactor, path) -> None:
        super().__init__()
        self._session_id, self._container_id = session_id, container_id
        self._docker, self._reactor, self._path = docker, reactor, path

    def render_GET(self, request):
        stamp = datetime.datetime.fromtimestamp(self._reactor.seconds(), datetime.timezone.utc)
        filename = f"capsule-{self._session_id[:8]}-workspace-{stamp:%Y%m%d-%H%M%S}.tar.gz"
        stream = _GzipStream(self._reactor, request, filename)

        def _thd_write(chunk: bytes) -> None:
            stream.thd_write(chunk)

        d = self._docker.export_workspace(self._container_id, self._path, _thd_write)

        def done(_):
            if stream.gone:
                return
            tail = stream.flush()
            if not stream.started:
                stream._write(b"")
            request.write(tail)
            request.unregisterProducer()
            request.finish()
            _log.info("exported the workspace of session {session_id}", session_id=self._session_id)

        def failed(failure):
            if failure.check(ExportAborted) or stream.gone:
                _log.info("export of session {session_id} abandoned by the client",
                          session_id=self._session_id)
                return
            message = failure.value.message if failure.check(CapsuleError) else failure.getErrorMessage()
            _log.error("export of session {session_id} failed: {message}",
                       session_id=self._session_id, message=message)
            if stream.started:
                # Part of the archive is out: break the connection so the
                # download fails instead of ending as if complete.
                request.unregisterProducer()
                request.channel.transport.abortConnection()
                return
            status = 404 if failure.check(ContainerGone) else 503 if failure.check(DockerUnavailable) else 500
            request.write(json_error(request, status, f"export failed: {message}", "export_failed"))
            request.finish()

        d.addCallbacks(done, failed)
        d.addErrback(lambda f: _log.failure("export bookkeeping failed", f))
        return NOT_DONE_YET
