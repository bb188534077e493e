"""
The session namespace's NetworkPolicies ensured when capsule starts on
Kubernetes (L{capsule.engine.kube_policies}), until the API server says
they are there.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from capsule.core.errors import CapsuleError

_log = Logger()

RETRY = 30.0


class NetworkPoliciesAtStart(Service):
    """
    At start, the engine's
    L{ensure_network_policies<capsule.engine.kubernetes.KubernetesAPI.ensure_network_policies>},
    asked again every C{retry} seconds while the API server does not answer
    or refuses (said once, as a warning: sessions are then not fenced by
    capsule's policies, only by those applied with the deploy files).

    @ivar done: fires with the engine's answer once it came (C{None} if
        stopped before).
    """

    name = "kube-network-policies"

    def __init__(self, engine, clock, capsule_namespace: str | None = None,
                 retry: float = RETRY) -> None:
        self._engine, self._clock = engine, clock
        self._namespace = capsule_namespace
        self._retry = retry
        self._running: Deferred | None = None
        self.done: Deferred = Deferred()

    def startService(self) -> None:
        super().startService()
        self._running = Deferred.fromCoroutine(self._ensure())
        self._running.addErrback(lambda f: None if f.check(CancelledError) else _log.failure(
            "ensuring the session namespace's network policies failed", f))

    def stopService(self):
        super().stopService()
        if self._running is not None:
            self._running.cancel()
        if not self.done.called:
            self.done.callback(None)

    async def _ensure(self) -> None:
        warned = False
        while True:
            try:
                answers = await self._engine.ensure_network_policies(self._namespace)
            except CapsuleError as e:
                if not warned:
                    _log.warn("could not ensure the session namespace's network policies"
                              " (retrying every {delay:g} s): {message}", delay=self._retry,
                              message=e.message)
                    warned = True
                await deferLater(self._clock, self._retry, lambda: None)
                continue
            break
        made = [p["metadata"]["name"] for p, created in answers if created]
        _log.info("network policies of the session namespace: {made} made, {found} there",
                  made=", ".join(made) or "none",
                  found=len(answers) - len(made))
        if not self.done.called:
            self.done.callback(answers)
