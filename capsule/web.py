"""
The HTTP side: the terminal page, C{/ws}, C{/health} and the export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.pages import forbidden, notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import File

from . import __version__
from .errors import CapsuleError
from .export import ExportResource, json_error
from .session import SessionManager
from .websocket import CapsuleServerFactory

_log = Logger()

HEALTH_TIMEOUT = 5.0


def default_www() -> str:
    """
    The web page's directory: the source tree's C{www/} when capsule runs
    from a checkout, else the one installed under C{sys.prefix}.
    """
    here = Path(__file__).resolve().parent.parent / "www"
    if (here / "index.html").exists():
        return str(here)
    import sys
    return os.path.join(sys.prefix, "share", "capsule", "www")


# The longest file name capsule serves (Linux's NAME_MAX).
_MAX_NAME = 255


class StaticFiles(File):
    """
    The static page, without directory listings.  A path segment that cannot
    name a file in the directory (not UTF-8, a NUL or a slash in it, too
    long, C{..}) is a 404, like a missing file: never an error.
    """

    childNotFound = notFound("Not Found", "No such file.")

    def directoryListing(self):
        return forbidden("Forbidden", "Directory listings are off.")

    def getChild(self, path: bytes, request):
        try:
            name = path.decode("utf-8")
        except UnicodeDecodeError:
            return self.childNotFound
        if len(path) > _MAX_NAME or "\0" in name or "/" in name:
            return self.childNotFound
        try:
            return super().getChild(path, request)
        except (OSError, ValueError):
            # What the file system says about a name no file can have.
            return self.childNotFound


class HealthResource(Resource):
    """
    C{GET /health}: JSON with C{status}, C{docker}, C{image}, C{sessions}
    and C{version}; 503 when Docker does not answer.

    One probe of the engine runs at a time: requests that arrive while it
    runs share its answer, each waiting at most L{HEALTH_TIMEOUT}, so that
    frequent checks of a hung engine cannot pile up work behind it.
    """

    isLeaf = True

    def __init__(self, manager: SessionManager, docker, reactor) -> None:
        super().__init__()
        self._manager, self._docker, self._reactor = manager, docker, reactor
        self._waiting: list[Deferred] = []

    def render_GET(self, request):
        d = Deferred.fromCoroutine(self._check())
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def respond(result):
            status, body = result
            if gone:
                return
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            request.write(json.dumps(body).encode("utf-8"))
            request.finish()

        d.addCallback(respond)
        d.addErrback(lambda f: _log.failure("health check failed", f))
        return NOT_DONE_YET

    def _probe(self, image: str) -> Deferred:
        """
        Fire with C{(version, image_present, image_error)}, or fail when
        the engine does not answer its ping.
        """
        waiter: Deferred = Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            d = Deferred.fromCoroutine(self._run_probe(image))
            d.addBoth(self._probe_done)
        return waiter

    async def _run_probe(self, image: str):
        version = await self._docker.ping()
        try:
            return version, await self._docker.image_exists(image), None
        except Exception as e:
            return version, False, e.message if isinstance(e, CapsuleError) else str(e)

    def _probe_done(self, result) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if waiter.called:
                # It timed out.
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _check(self):
        image = self._manager.config.spec.image
        body = {
            "status": "ok",
            "version": __version__,
            "docker": False,
            "docker_host": self._docker.host,
            "docker_version": None,
            "image": False,
            "image_name": image,
            "sessions": len(self._manager.sessions),
            "pool": {"size": self._manager.pool.size, "ready": len(self._manager.pool.ready)},
            "instance": self._manager.config.instance,
        }
        d = self._probe(image)
        d.addTimeout(HEALTH_TIMEOUT, self._reactor)
        try:
            version, present, image_error = await d
        except Exception as e:
            body["status"] = "unavailable"
            if isinstance(e, CapsuleError):
                body["error"] = e.message
            elif isinstance(e, DeferredTimeout):
                body["error"] = f"Docker did not answer within {HEALTH_TIMEOUT:g} s"
            else:
                body["error"] = f"could not ask Docker: {e}"
            return 503, body
        body["docker"] = True
        body["docker_version"] = version.get("Version")
        body["image"] = present
        if image_error is not None:
            body["status"] = "degraded"
            body["error"] = f"could not check the image: {image_error}"
        elif not present:
            body["status"] = "degraded"
            body["error"] = (f"the session image {image} is missing: build it with"
                             " `make image`")
        return 200, body


def make_site(manager: SessionManager, docker, reactor, www: str, **websocket_options) -> Site:
    """
    @param websocket_options: passed on to L{CapsuleServerFactory}.
    """
    root = StaticFiles(www)
    root.indexNames = ["index.html"]
    factory = CapsuleServerFactory(manager, reactor, **websocket_options)
    root.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"health", HealthResource(manager, docker, reactor))
    api = Resource()
    api.putChild(b"export", ExportResource(manager, docker, reactor))
    root.putChild(b"api", api)
    site = Site(root)
    site.displayTracebacks = False
    site.websocket_factory = factory
    return site
