"""
/metrics: the counters against the in-memory engine and a Clock, the text
format through prometheus_client's own parser, and who may read it.
"""


import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from capsule.auth.gate import Authenticator
from capsule.web.http import ClientAddresses
from capsule.core.spec import ContainerSpec
from capsule.core.errors import DockerUnavailable
from capsule.ops.metrics import END_REASONS, Metrics, end_reason
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from tests.support.fakes import FakeDockerAPI, RecordingClient
from tests.support.httpclient import ask, parse, send
from capsule.web.site import make_site

IMAGE = "capsule-runtime:latest"
TOKEN = "m" * 40


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """
    Every sample of C{metrics}, read back through the text format.
    """
    found = {}
    for family in text_string_to_metric_families(metrics.text().decode("utf-8")):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels) -> float:
    return samples(metrics)[name, frozenset(labels.items())]


def make_manager(pool_size: int = 0, docker=None, clock=None):
    docker = docker or FakeDockerAPI()
    clock = clock or Clock()
    metrics = Metrics()
    manager = SessionManager(docker, clock, SessionConfig(
        spec=ContainerSpec(image=IMAGE), instance="metrics-test", grace=60,
        pool_size=pool_size), metrics=metrics)
    metrics.watch(manager)
    return manager, docker, clock, metrics


def test_text_format_parses_with_every_family():
    manager, _, _, metrics = make_manager()
    names = {f.name for f in text_string_to_metric_families(metrics.text().decode("utf-8"))}
    assert names == {
        "capsule_sessions_live", "capsule_pool_size", "capsule_pool_ready",
        "capsule_sessions_started", "capsule_sessions_ended",
        "capsule_session_start_seconds", "capsule_websocket_sent_bytes",
        "capsule_websocket_received_bytes", "capsule_reconnects", "capsule_replayed_bytes",
        "capsule_websocket_errors", "capsule_websocket_closes", "capsule_refusals",
        "capsule_docker_call_seconds", "capsule_docker_call_failures", "capsule_pool_misses",
        "capsule_exports_started", "capsule_exports_finished", "capsule_exports_failed",
        "capsule_exports_stalled", "capsule_egress_refusals"}
    # Every reason shows from the start, at 0.
    for reason in END_REASONS:
        assert value(metrics, "capsule_sessions_ended_total", reason=reason) == 0


def test_registries_are_separate():
    one, _, _, first = make_manager()
    two, _, _, second = make_manager()
    one.create(RecordingClient(), 80, 24)
    assert value(first, "capsule_sessions_started_total", how="cold") == 1
    assert value(second, "capsule_sessions_started_total", how="cold") == 0
    assert value(first, "capsule_sessions_live") == 1
    assert value(second, "capsule_sessions_live") == 0


def test_session_started_and_exited():
    manager, docker, clock, metrics = make_manager()
    session = manager.create(RecordingClient(), 80, 24)
    assert value(metrics, "capsule_sessions_started_total", how="cold") == 1
    assert value(metrics, "capsule_sessions_started_total", how="warm") == 0
    assert value(metrics, "capsule_session_start_seconds_count", how="cold") == 1
    assert value(metrics, "capsule_sessions_live") == 1
    docker.processes[0].exit(3)
    assert value(metrics, "capsule_sessions_ended_total", reason="exited") == 1
    assert value(metrics, "capsule_sessions_live") == 0
    # No session id in any label.
    assert session.id not in metrics.text().decode("utf-8")


def test_session_killed_and_expired():
    manager, docker, clock, metrics = make_manager()
    killed = manager.create(RecordingClient(), 80, 24)
    docker.kill_container(killed.container_id, oom=True)
    client = RecordingClient()
    left = manager.create(client, 80, 24)
    manager.detach(left, client)
    clock.advance(61)
    assert manager.expire(left)
    assert value(metrics, "capsule_sessions_ended_total", reason="killed") == 1
    assert value(metrics, "capsule_sessions_ended_total", reason="expired") == 1
    assert value(metrics, "capsule_sessions_ended_total", reason="exited") == 0
    assert value(metrics, "capsule_sessions_live") == 0


def test_reconnect_counted():
    manager, docker, clock, metrics = make_manager()
    first = RecordingClient()
    session = manager.create(first, 80, 24)
    manager.detach(session, first)
    manager.reconnect(session.id, RecordingClient())
    assert value(metrics, "capsule_reconnects_total") == 1


def test_pool_size_misses_and_warm_starts():
    manager, docker, clock, metrics = make_manager(pool_size=1)
    assert value(metrics, "capsule_pool_size") == 1
    assert value(metrics, "capsule_pool_ready") == 0
    manager.create(RecordingClient(), 80, 24)
    assert value(metrics, "capsule_pool_misses_total") == 1
    manager.pool.start()
    assert value(metrics, "capsule_pool_ready") == 1
    manager.create(RecordingClient(), 80, 24)
    assert value(metrics, "capsule_pool_misses_total") == 1
    assert value(metrics, "capsule_sessions_started_total", how="warm") == 1
    assert value(metrics, "capsule_sessions_started_total", how="cold") == 1


def test_no_misses_without_a_pool():
    manager, _, _, metrics = make_manager(pool_size=0)
    manager.create(RecordingClient(), 80, 24)
    assert value(metrics, "capsule_pool_misses_total") == 0


@pytest.mark.parametrize("exit_code, message, reason", [
    (0, "the shell exited with code 0", "exited"),
    (137, "the shell was killed (signal 9; most often it ran out of memory under the 4g"
          " limit)", "killed"),
    (None, "the session's container ran out of memory (limit 4g) and was stopped", "killed"),
    (None, "the session expired", "expired"),
    (None, "the session reached its maximum lifetime (3600 s, --max-lifetime)", "limit"),
    (None, "the session was idle (no input and no output) for 60 s (--idle-timeout)", "limit"),
    (None, "the session wrote 11 MiB, more than its disk limit of 10 MiB", "limit"),
    (None, "the session's relay sent malformed data", "malformed"),
    (None, "the capsule server shut down", "shutdown"),
    (None, "the Docker engine did not come back within 60 s", "engine"),
    (None, "the client left before the session started", "other"),
    (None, None, "other"),
])
def test_end_reasons(exit_code, message, reason):
    assert end_reason(exit_code, message) == reason


def _call(metrics, d):
    return metrics.docker_call(d)


def info(metrics, d):
    """
    Stands for a DockerAPI method calling C{_call}: the call is named
    after it.
    """
    return _call(metrics, d)


def test_docker_call_latency_and_failures():
    metrics = Metrics()
    answered = Deferred()
    results = []
    info(metrics, answered).addCallback(results.append)
    answered.callback({"Version": "27"})
    refused = Deferred()
    errors = []
    info(metrics, refused).addErrback(errors.append)
    refused.errback(DockerUnavailable("the engine is away"))
    assert results == [{"Version": "27"}]
    assert [e.type for e in errors] == [DockerUnavailable]
    assert value(metrics, "capsule_docker_call_seconds_count", call="info") == 2
    assert value(metrics, "capsule_docker_call_failures_total", call="info") == 1


# -- who may read /metrics ---------------------------------------------------


def _site(tmp_path, token=None, authenticator=None):
    (tmp_path / "index.html").write_text("page")
    (tmp_path / "login.html").write_text("login")
    docker = FakeDockerAPI()
    reactor = MemoryReactorClock()
    metrics = Metrics()
    manager = SessionManager(docker, reactor, SessionConfig(
        spec=ContainerSpec(image=IMAGE), instance="metrics-test"), metrics=metrics)
    return make_site(manager, docker, reactor, str(tmp_path), metrics_token=token,
                     authenticator=authenticator, metrics=metrics)


def _get(site, peer, headers=b""):
    return ask(site, "GET", "/metrics", [line for line in headers.split(b"\r\n") if line],
               peer=peer)


LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
LOOPBACK6 = IPv6Address("TCP", "::1", 40000)
REMOTE = IPv4Address("TCP", "192.0.2.7", 40000)


@pytest.mark.parametrize("peer", [LOOPBACK, LOOPBACK6])
def test_loopback_reads_metrics(tmp_path, peer):
    status, headers, body = _get(_site(tmp_path), peer)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(body.decode("utf-8"))}
    assert "capsule_sessions_live" in names


def test_remote_without_token_is_refused(tmp_path):
    status, _, body = _get(_site(tmp_path), REMOTE)
    assert status == 403
    assert b"capsule_" not in body
    status, _, _ = _get(_site(tmp_path, token=TOKEN), REMOTE)
    assert status == 403


def test_remote_with_token_reads_metrics(tmp_path):
    site = _site(tmp_path, token=TOKEN)
    status, _, body = _get(site, REMOTE, b"Authorization: Bearer " + TOKEN.encode() + b"\r\n")
    assert status == 200 and b"capsule_sessions_live" in body
    status, _, _ = _get(site, REMOTE, b"Authorization: Bearer " + b"x" * 40 + b"\r\n")
    assert status == 403
    status, _, _ = _get(site, REMOTE, b"Authorization: Basic " + TOKEN.encode() + b"\r\n")
    assert status == 403


def test_a_proxied_loopback_peer_needs_the_token(tmp_path):
    site = _site(tmp_path, token=TOKEN)
    status, _, _ = _get(site, LOOPBACK, b"X-Forwarded-For: 192.0.2.7\r\n")
    assert status == 403
    status, _, _ = _get(site, LOOPBACK, b"Forwarded: for=192.0.2.7\r\n")
    assert status == 403
    # Issue 19: a proxy that sets X-Real-IP only is a proxy too (the admin
    # API's rule).
    status, _, _ = _get(site, LOOPBACK, b"X-Real-IP: 192.0.2.7\r\n")
    assert status == 403
    status, _, _ = _get(site, LOOPBACK, b"X-Forwarded-For: 192.0.2.7\r\n"
                        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n")
    assert status == 200


def test_no_login_needed_when_capsule_has_users(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:" + "a" * 32 + "\n")
    auth = Authenticator(Clock(), addresses=ClientAddresses(), tokens=str(tokens))
    site = _site(tmp_path, token=TOKEN, authenticator=auth)
    assert _get(site, LOOPBACK)[0] == 200
    assert _get(site, REMOTE, b"Authorization: Bearer " + TOKEN.encode() + b"\r\n")[0] == 200
    assert _get(site, REMOTE)[0] == 403
    # A user's API token is not the metrics token.
    assert _get(site, REMOTE, b"Authorization: Bearer " + b"a" * 32 + b"\r\n")[0] == 403


@pytest.mark.parametrize("code, label", [
    (1000, "1000"), (1009, "1009"), (4429, "4429"), (4503, "4503"), (4777, "other"),
    (3000, "other"), (None, "none")])
def test_close_codes_are_a_small_set(code, label):
    metrics = Metrics()
    metrics.closed(code)
    assert value(metrics, "capsule_websocket_closes_total", code=label) == 1


# -- --metrics-token ------------------------------------------------------------


def _options(*args):
    from capsule.tap import Options
    options = Options()
    options.parseOptions(list(args))
    return options


def test_metrics_token_option():
    assert _options()["metrics-token"] is None
    assert _options("--metrics-token", TOKEN)["metrics-token"] == TOKEN


def test_metrics_token_from_a_file(tmp_path):
    path = tmp_path / "metrics-token"
    path.write_text(TOKEN + "\n")
    assert _options("--metrics-token-file", str(path))["metrics-token"] == TOKEN


@pytest.mark.parametrize("token", ["short", "has a space in it 0123456789"])
def test_weak_metrics_tokens_are_refused(token):
    from twisted.python import usage
    with pytest.raises(usage.UsageError, match="--metrics-token"):
        _options("--metrics-token", token)


def test_missing_metrics_token_file_is_a_usage_error(tmp_path):
    from twisted.python import usage
    with pytest.raises(usage.UsageError, match="--metrics-token-file"):
        _options("--metrics-token-file", str(tmp_path / "absent"))


def test_an_export_over_the_client_limit_is_a_counted_refusal(tmp_path):
    site = _site(tmp_path)
    manager = site.exports._manager
    session = manager.create(RecordingClient(), 80, 24)
    for _ in range(site.exports.limits.per_client):
        site.exports.queue.join("127.0.0.1")
    transport = send(site, "GET", "/api/export/" + session.id, peer=LOOPBACK)
    assert parse(transport.value()).status == 429
    assert value(site.metrics, "capsule_refusals_total", code="too_many_exports") == 1
    assert value(site.metrics, "capsule_exports_started_total") == 0


def test_the_memory_accounting_is_gauged():
    from types import SimpleNamespace

    from capsule.core.memory import MemoryBudget
    host = SimpleNamespace(available=5 * 1024 ** 3, used=lambda container_id: None)
    memory = MemoryBudget(64 * 1024 ** 2, budget=10 * 1024 ** 3, reserve=1024 ** 3,
                          reading=host)
    metrics, clock = Metrics(), Clock()
    manager = SessionManager(FakeDockerAPI(), clock, SessionConfig(
        spec=ContainerSpec(image=IMAGE), instance="metrics-test", grace=60, pool_size=1),
        metrics=metrics, memory=memory)
    metrics.watch(manager)
    manager.pool.start()
    manager.create(RecordingClient(), 80, 24)
    manager.create(RecordingClient(), 80, 24)
    clock.advance(1)
    # Two live sessions and the warm one refilled, at 64 MiB each.
    assert value(metrics, "capsule_memory_counted_bytes") == 3 * 64 * 1024 ** 2
    assert value(metrics, "capsule_memory_budget_bytes") == 10 * 1024 ** 3
    assert value(metrics, "capsule_memory_reserve_bytes") == 1024 ** 3
    assert value(metrics, "capsule_host_memory_available_bytes") == 5 * 1024 ** 3
    # Not known: not shown.
    memory.budget = host.available = None
    assert ("capsule_memory_budget_bytes", frozenset()) not in samples(metrics)
