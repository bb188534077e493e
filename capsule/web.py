"""
The HTTP side: the terminal page, C{/ws}, C{/health} and the export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.pages import forbidden
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


class StaticFiles(File):
    """
    The static page, without directory listings.
    """

    def directoryListing(self):
        return forbidden("Forbidden", "Directory listings are off.")


class HealthResource(Resource):
    """
    C{GET /health}: JSON with C{status}, C{docker}, C{image}, C{sessions}
    and C{version}; 503 when Docker does not answer.
    """

    isLeaf = True

    def __init__(self, manager: SessionManager, docker, reactor) -> None:
        super().__init__()
        self._manager, self._docker, self._reactor = manager, docker, reactor

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
        try:
            d = self._docker.ping()
            d.addTimeout(HEALTH_TIMEOUT, self._reactor)
            version = await d
            body["docker"] = True
            body["docker_version"] = version.get("Version")
            d = self._docker.image_exists(image)
            d.addTimeout(HEALTH_TIMEOUT, self._reactor)
            body["image"] = await d
        except Exception as e:
            if not body["docker"]:
                body["status"] = "unavailable"
                body["error"] = e.message if isinstance(e, CapsuleError) else (
                    f"Docker did not answer within {HEALTH_TIMEOUT:g} s")
                return 503, body
            body["error"] = f"could not check the image: {e}"
        if not body["image"]:
            body["status"] = "degraded"
            body.setdefault("error", f"the session image {image} is missing: build it with"
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
