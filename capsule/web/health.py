"""
C{/health}: whether capsule can serve sessions now (the engine answers, the
session image is there, capsule is not draining), and what it holds.
"""

from __future__ import annotations


from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from capsule import __version__
from capsule.core.errors import CapsuleError
from capsule.web.http import answer_json
from capsule.sessions.manager import SessionManager

_log = Logger()

HEALTH_TIMEOUT = 5.0


class HealthResource(Resource):
    """
    C{GET /health}: JSON with C{status}, C{docker}, C{image}, C{sessions}
    and C{version}; 503 when Docker does not answer, and while capsule drains
    (C{status} C{draining}, and C{draining} says how: a load balancer then
    sends no new users).  With a firewall, C{firewall} says whether the
    session networks are fenced (L{capsule.engine.firewall.Firewall.health}):
    a C{problem} there is a warning, not a reason to send users elsewhere.

    One probe of the engine runs at a time: requests that arrive while it
    runs share its answer, each waiting at most L{HEALTH_TIMEOUT}, so that
    frequent checks of a hung engine cannot pile up work behind it.
    """

    isLeaf = True

    def __init__(self, manager: SessionManager, docker, reactor, drain=None,
                 firewall=None) -> None:
        super().__init__()
        self._manager, self._docker, self._reactor = manager, docker, reactor
        self._drain = drain
        self._firewall = firewall
        self._waiting: list[Deferred] = []

    def render_GET(self, request):
        return answer_json(request, Deferred.fromCoroutine(self._check()), "a health check")

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
            "pool": {"size": self._manager.pool.size, "target": self._manager.pool.target,
                     "ready": len(self._manager.pool.ready)},
            "instance": self._manager.config.instance,
        }
        if self._firewall is not None:
            body["firewall"] = self._firewall.health()
        if self._drain is not None and self._drain.active:
            body["draining"] = self._drain.state()
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
        if "draining" in body:
            body["status"] = "draining"
            return 503, body
        return 200, body
