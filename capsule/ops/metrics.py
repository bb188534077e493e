"""
C{/metrics}: what capsule does, in the Prometheus text format.

The metrics live in a L{prometheus_client.CollectorRegistry} of capsule's
own (L{Metrics}), never the process-wide default one, so that one process
(a test run) may hold several servers.  Labels take values from small fixed
sets only (end reasons, quota codes, WebSocket close codes, names of Docker
API calls): never a session id, a user, terminal content or a secret.

Who may read them: a peer on loopback that came straight to capsule (no
proxy's C{X-Forwarded-For}, C{Forwarded} or C{X-Real-IP}:
L{capsule.core.addresses.straight_from_loopback}, the admin API's rule), or
anyone presenting
C{Authorization: Bearer <token>} when capsule runs with C{--metrics-token}.
Everyone else gets 403.
"""

from __future__ import annotations

import hmac
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client import exposition
from prometheus_client.exposition import generate_latest
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from capsule.sessions.observers import SessionObserver
from capsule.core.addresses import straight_from_loopback

# The classic text format (version 0.0.4), which every Prometheus reads.
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

# No *_created series beside each counter and histogram: they double what a
# scrape carries and say only when the process started.
disable_created_metrics()

# Why sessions end: the label values of capsule_sessions_ended_total.
END_REASONS = ("exited", "expired", "killed", "engine", "limit", "malformed", "shutdown",
               "other")

# Close codes counted by their number (the standard ones, and those
# capsule sends); any other a client sends is "other".
_CLOSE_CODES = frozenset(range(1000, 1016)) | frozenset(range(4000, 4010)) | frozenset(
    (4400, 4401, 4403, 4404, 4409, 4429, 4503))

# Seconds from a session's creation to its running shell.
_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# Seconds of one Docker API call.
_DOCKER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def end_reason(exit_code: int | None, message: str | None) -> str:
    """
    The reason label of a session that ended with C{exit_code} and
    C{message} (the sentence its client was told): one of L{END_REASONS}.
    """
    text = (message or "").lower()
    if text == "the session expired":
        return "expired"
    if text == "the session's relay sent malformed data":
        return "malformed"
    if "shut down" in text or "restarting" in text:
        return "shutdown"
    # (A pod the cluster evicted was killed for the node's sake.)
    if exit_code == 137 or "killed" in text or "out of memory" in text or "evicted" in text:
        return "killed"
    if "limit" in text or "maximum lifetime" in text or "was idle" in text:
        return "limit"
    if exit_code is not None:
        return "exited"
    if "engine" in text or "kubernetes api server" in text:
        return "engine"
    return "other"


class _Live:
    """
    The gauges read from the manager at each scrape.
    """

    def __init__(self) -> None:
        self.manager = None

    def describe(self):
        return []

    def collect(self):
        manager = self.manager
        live = GaugeMetricFamily("capsule_sessions_live", "Sessions that exist now.")
        size = GaugeMetricFamily("capsule_pool_size", "Warm sessions wanted in the pools.")
        ready = GaugeMetricFamily("capsule_pool_ready", "Warm sessions ready to be taken.")
        found = [live, size, ready]
        if manager is not None:
            live.add_metric([], len(manager.sessions))
            size.add_metric([], manager.pool.size)
            ready.add_metric([], len(manager.pool.ready))
            found += _memory(getattr(manager, "memory", None), manager)
        return found


def _memory(memory, manager) -> list:
    """
    The memory accounting's gauges (capsule.core.memory), those known.
    """
    if memory is None:
        return []
    gauges = []

    def gauge(name, text, value):
        if value is not None:
            family = GaugeMetricFamily(name, text)
            family.add_metric([], value)
            gauges.append(family)
    gauge("capsule_memory_counted_bytes", "Memory the live sessions are counted at (each its"
          " request, or its measured use where more) and the warm ones (their requests).",
          memory.live(manager.sessions.values()) + memory.warm(manager.pool.held))
    gauge("capsule_memory_budget_bytes", "What the counted memory may reach (--memory-budget).",
          memory.budget)
    gauge("capsule_memory_reserve_bytes", "Memory the host keeps available (--memory-reserve).",
          memory.reserve)
    reading = memory.reading
    gauge("capsule_host_memory_available_bytes", "The engine host's available memory"
          " (MemAvailable), as last read.", getattr(reading, "available", None))
    return gauges


class Metrics(SessionObserver):
    """
    capsule's metrics, in a registry of their own (C{registry}).  The
    methods are what the rest of capsule calls when something happens.
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._live = _Live()
        registry.register(self._live)
        self.started = Counter(
            "capsule_sessions_started", "Sessions whose shell started.", ["how"],
            registry=registry)
        self.ended = Counter(
            "capsule_sessions_ended", "Sessions that ended, by reason.", ["reason"],
            registry=registry)
        self.start_seconds = Histogram(
            "capsule_session_start_seconds",
            "Seconds from a session's creation to its running shell.", ["how"],
            buckets=_START_BUCKETS, registry=registry)
        self.bytes_to_clients = Counter(
            "capsule_websocket_sent_bytes", "Bytes of WebSocket messages sent to clients.",
            registry=registry)
        self.bytes_from_clients = Counter(
            "capsule_websocket_received_bytes",
            "Bytes of WebSocket messages received from clients.", registry=registry)
        self.reconnects = Counter(
            "capsule_reconnects", "Clients that attached to an existing session.",
            registry=registry)
        self.replayed = Counter(
            "capsule_replayed_bytes", "Bytes of output replayed to clients that reconnected.",
            registry=registry)
        self.ws_errors = Counter(
            "capsule_websocket_errors", "Error messages sent to clients, by error code.",
            ["code"], registry=registry)
        self.ws_closes = Counter(
            "capsule_websocket_closes", "WebSocket connections closed, by close code.",
            ["code"], registry=registry)
        self.refusals = Counter(
            "capsule_refusals",
            "New sessions (admission control) and exports refused by a quota, by code.",
            ["code"], registry=registry)
        self.docker_seconds = Histogram(
            "capsule_docker_call_seconds", "Seconds of Docker API calls, by call.", ["call"],
            buckets=_DOCKER_BUCKETS, registry=registry)
        self.docker_failures = Counter(
            "capsule_docker_call_failures", "Docker API calls that failed, by call.",
            ["call"], registry=registry)
        self.pool_misses = Counter(
            "capsule_pool_misses", "New sessions that found no warm session ready.",
            registry=registry)
        self.exports_started = Counter(
            "capsule_exports_started", "Workspace exports started.", registry=registry)
        self.exports_finished = Counter(
            "capsule_exports_finished", "Workspace exports sent in full.", registry=registry)
        self.exports_failed = Counter(
            "capsule_exports_failed",
            "Workspace exports that failed, were cut off or abandoned.", registry=registry)
        self.exports_stalled = Counter(
            "capsule_exports_stalled",
            "Workspace exports cut off because Docker's stream waited too long for room in"
            " their spool (their client took nothing while it was full).", registry=registry)
        self.egress_refusals = Counter(
            "capsule_egress_refusals",
            "Connections the egress proxy refused, by reason (policy: the host is not in"
            " the profile's egress; address: a private, link-local, loopback or host"
            " address; port; unresolved).", ["reason"], registry=registry)
        # Every reason and kind shows from the start, at 0.
        for reason in END_REASONS:
            self.ended.labels(reason)
        for how in ("warm", "cold"):
            self.started.labels(how)
            self.start_seconds.labels(how)

    def watch(self, manager) -> None:
        """
        Gauge C{manager}'s live sessions and warm pools.  What happens to its
        sessions it is told as their observer (the manager's C{metrics}), and
        the engine's calls as the engine's (C{DockerAPI(metrics=...)}).
        """
        self._live.manager = manager

    def text(self) -> bytes:
        """
        The metrics in the Prometheus text format.
        """
        return generate_latest(self.registry)

    # -- what happens --------------------------------------------------

    # (ISessionObserver)

    def session_started(self, session, warm: bool, seconds: float) -> None:
        how = "warm" if warm else "cold"
        self.started.labels(how).inc()
        self.start_seconds.labels(how).observe(max(0.0, seconds))

    def session_ended(self, session) -> None:
        self.ended.labels(end_reason(session.core.exit_code, session.core.message)).inc()

    def session_reconnected(self, session) -> None:
        self.reconnects.inc()

    def sent(self, count: int) -> None:
        self.bytes_to_clients.inc(count)

    def received(self, count: int) -> None:
        self.bytes_from_clients.inc(count)

    def resumed(self, replayed: int) -> None:
        self.replayed.inc(replayed)

    def error_sent(self, code: str) -> None:
        # Codes are capsule's own constants, never what a client sent.
        self.ws_errors.labels(str(code)[:40]).inc()

    def closed(self, code: int | None) -> None:
        self.ws_closes.labels(
            "none" if code is None else str(code) if code in _CLOSE_CODES else "other").inc()

    def refused(self, code: str) -> None:
        self.refusals.labels(str(code)[:40]).inc()

    def egress_refused(self, reason: str) -> None:
        self.egress_refusals.labels(str(reason)[:40]).inc()

    def pool_taken(self, pool, found) -> None:
        if found is None and pool.size > 0:
            self.pool_misses.inc()

    def export_started(self) -> None:
        self.exports_started.inc()

    def export_stalled(self) -> None:
        self.exports_stalled.inc()

    def export_ended(self, result, stream) -> None:
        if isinstance(result, Failure) or stream.cut is not None or stream.gone:
            self.exports_failed.inc()
        else:
            self.exports_finished.inc()

    def docker_call(self, d, depth: int = 2):
        """
        Time the Docker API call whose result C{d} is, named after the
        function C{depth} frames up (the L{DockerAPI} method that called
        C{_call}); return C{d}.
        """
        name = sys._getframe(depth).f_code.co_name
        began = time.monotonic()

        def done(result):
            self.docker_seconds.labels(name).observe(time.monotonic() - began)
            if isinstance(result, Failure):
                self.docker_failures.labels(name).inc()
            return result
        return d.addBoth(done)


class MetricsResource(Resource):
    """
    C{GET /metrics}: L{Metrics.text} to loopback peers that came straight
    here, and to anyone with the bearer token C{token}; 403 to others.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, token: str | None = None) -> None:
        super().__init__()
        self._metrics = metrics
        self._token = token.encode("utf-8") if token else None

    def allowed(self, request) -> bool:
        if self._token is not None:
            given = request.getHeader(b"authorization") or b""
            scheme, _, value = given.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(),
                                                                   self._token):
                return True
        # Through a proxy (any forwarding header): the socket's peer is the
        # proxy, not the client.  The admin API's rule.
        return straight_from_loopback(request)

    def render_GET(self, request):
        request.setHeader(b"cache-control", b"no-store")
        if not self.allowed(request):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return (b"metrics are served to loopback, or with the token of"
                    b" --metrics-token\n")
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
        return self._metrics.text()
