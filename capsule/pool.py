"""
A warm pool: containers created and started ahead of need, so that a new
session only costs an exec.

Each warm container is made exactly like a session container (same image,
limits, labels, name C{capsule-{uuid}}); the session that takes it gets that
uuid as its id.  Containers older than C{max_age} are replaced rather than
handed out, and one that turns out to be dead when its shell is started is
removed by the session manager, which falls back to a cold start.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from .errors import CapsuleError
from .metrics import UNCOUNTED

_log = Logger()


@dataclass(frozen=True)
class WarmContainer:
    session_id: str
    container_id: str
    created_at: float


class WarmPool:
    """
    @param make_spec: the L{ContainerSpec} for a given session id.
    """

    # What it counts into (capsule.metrics): a server's metrics watch it.
    metrics = UNCOUNTED

    def __init__(self, docker, clock, size: int, make_spec: Callable, max_age: float = 3600.0,
                 retry_delay: float = 5.0) -> None:
        self._docker = docker
        self._clock = clock
        self.size = size
        self._make_spec = make_spec
        self.max_age = max_age
        self.retry_delay = retry_delay
        self.ready: deque[WarmContainer] = deque()
        # Session ids of warm containers being made.
        self.pending: set[str] = set()
        self._running = False
        self._retry = None
        self._failing = False

    @property
    def container_ids(self) -> set[str]:
        return {w.container_id for w in self.ready}

    def start(self) -> None:
        self._running = True
        self.refill()

    def take(self) -> WarmContainer | None:
        """
        A started container for a new session, or C{None} if none is ready.
        The caller calls L{refill} once the session's shell runs, so that
        making the replacement does not compete with starting that shell.
        """
        now = self._clock.seconds()
        found = None
        while self.ready and found is None:
            warm = self.ready.popleft()
            if now - warm.created_at > self.max_age:
                self.discard(warm, "it is too old")
            else:
                found = warm
        self.metrics.pool_taken(self, found)
        return found

    def discard(self, warm: WarmContainer, why: str) -> Deferred:
        _log.info("removing warm container {container}: {why}",
                  container=warm.container_id[:12], why=why)
        d = self._docker.remove_container(warm.container_id)
        d.addErrback(lambda f: _log.warn("could not remove warm container {container}: {error}",
                                         container=warm.container_id[:12],
                                         error=f.getErrorMessage()))
        return d

    def refill(self) -> None:
        while self._running and self._retry is None and len(self.ready) + self.filling < self.size:
            session_id = str(uuid.uuid4())
            self.pending.add(session_id)
            started = self._clock.seconds()
            d = self._docker.create_session_container(session_id, self._make_spec(session_id))
            d.addCallbacks(self._made, self._failed, callbackArgs=(session_id, started),
                           errbackArgs=(session_id,))

    @property
    def filling(self) -> int:
        return len(self.pending)

    def _made(self, container_id: str, session_id: str, started: float) -> None:
        self.pending.discard(session_id)
        warm = WarmContainer(session_id, container_id, self._clock.seconds())
        if not self._running:
            self.discard(warm, "the pool is stopped")
            return
        if self._failing:
            _log.info("warm pool refills again")
            self._failing = False
        self.ready.append(warm)
        _log.debug("warm container {container} ready in {ms:.0f} ms",
                   container=container_id[:12], ms=(self._clock.seconds() - started) * 1000)
        self.refill()

    def _failed(self, failure, session_id: str) -> None:
        self.pending.discard(session_id)
        if not self._running:
            return
        if not self._failing:
            # Say it once per outage, not once per retry.
            message = failure.value.message if failure.check(CapsuleError) else failure.getErrorMessage()
            _log.warn("could not refill the warm pool (retrying every {delay:g} s): {message}",
                      delay=self.retry_delay, message=message)
            self._failing = True
        if self._retry is None:
            self._retry = self._clock.callLater(self.retry_delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self.refill()

    def stop(self) -> Deferred:
        """
        Stop refilling and remove the warm containers.
        """
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        ready, self.ready = list(self.ready), deque()
        return DeferredList([self.discard(w, "capsule is stopping") for w in ready],
                            consumeErrors=True)
