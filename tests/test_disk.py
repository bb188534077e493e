"""
The disk watcher: warns a session nearing --disk and ends one past it.
"""

import docker.errors
import pytest
import requests
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from capsule.sessions.disk import DiskWatchService, disk_verdicts
from capsule.sessions.cleanup import CleanupService
from capsule.core.spec import ContainerSpec
from capsule.engine.docker import DockerAPI
from capsule.core.errors import DockerUnavailable
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.tap import Options, makeService
from capsule.services import ListenerService
from tests.support.fakes import FakeDockerAPI, RecordingClient

MIB = 1024 * 1024


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def manager(clock):
    spec = ContainerSpec(image="capsule-runtime:latest")
    return SessionManager(FakeDockerAPI(), clock, SessionConfig(spec=spec, instance="t"))


def _watcher(manager, clock, sizes, enforced=lambda: False):
    calls = []

    def read():
        calls.append(1)
        return sizes() if callable(sizes) else succeed(sizes)
    service = DiskWatchService(manager, clock, 100 * MIB, 30.0, read, enforced=enforced)
    return service, calls


def notices(client):
    return [e for e in client.events if e[0] == "notice"]


def test_verdicts(manager):
    a, b, c = (manager.create(RecordingClient(), 80, 24) for _ in range(3))
    sizes = {a.container_id: 79 * MIB, b.container_id: 80 * MIB, c.container_id: 100 * MIB + 1}
    warn, end = disk_verdicts([a, b, c], sizes, 100 * MIB, 80 * MIB)
    assert warn == [(b, 80 * MIB)] and end == [(c, 100 * MIB + 1)]
    # A session without a size (its container is not running) is neither.
    assert disk_verdicts([a], {}, 100 * MIB, 80 * MIB) == ([], [])


def test_warns_once_then_ends(manager, clock):
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    sizes = {session.container_id: 90 * MIB}
    service, calls = _watcher(manager, clock, lambda: succeed(dict(sizes)))
    service.startService()
    assert notices(client) == [("notice", "disk_limit")]
    clock.advance(30)
    assert notices(client) == [("notice", "disk_limit")]
    assert session.status() == "running"
    sizes[session.container_id] = 100 * MIB + 1
    clock.advance(30)
    assert notices(client) == [("notice", "disk_limit"), ("notice", "disk_limit")]
    (ended,) = [e for e in client.events if e[0] == "ended"]
    assert ended[2] == "the session wrote 100.0 MiB, more than its disk limit of 100.0 MiB"
    assert session.status() in ("ending", "ended")
    assert len(calls) == 3
    service.stopService()


def test_a_detached_session_past_the_limit_ends(manager, clock):
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    manager.detach(session, client)
    service, _ = _watcher(manager, clock, lambda: succeed({session.container_id: 200 * MIB}))
    service.startService()
    assert session.status() in ("ending", "ended")
    service.stopService()


def test_nothing_is_read_where_the_driver_enforces_it_or_without_sessions(manager, clock):
    service, calls = _watcher(manager, clock, {}, enforced=lambda: True)
    manager.create(RecordingClient(), 80, 24)
    service.startService()
    clock.advance(60)
    assert calls == []
    service.stopService()
    idle = SessionManager(FakeDockerAPI(), clock, manager.config)
    service, calls = _watcher(idle, clock, {})
    service.startService()
    clock.advance(60)
    assert calls == []
    service.stopService()


def test_a_failed_or_slow_read_keeps_the_timer(manager, clock):
    session = manager.create(RecordingClient(), 80, 24)
    answers = [fail(DockerUnavailable("away")), Deferred()]
    service, calls = _watcher(manager, clock, lambda: answers.pop(0))
    service.startService()          # fails: logged
    clock.advance(30)               # hangs
    clock.advance(30)               # still under way: not asked again
    assert len(calls) == 2 and service.running
    service.stopService()


def _options(*args):
    options = Options()
    options.parseOptions(["-l", "tcp:0:interface=127.0.0.1", *args])
    return options


def test_the_watcher_runs_after_the_cleanup_only_with_disk(monkeypatch):
    monkeypatch.setenv("CAPSULE_TUNING", "disk-check-interval=5")
    service = makeService(_options("--disk", "2g"), MemoryReactorClock())
    types = [type(c) for c in service]
    assert types[types.index(CleanupService) + 1:] == [DiskWatchService, ListenerService]
    (watcher,) = [c for c in service if isinstance(c, DiskWatchService)]
    assert (watcher.step, watcher._limit) == (5.0, 2 * 1024 ** 3)
    assert not any(isinstance(c, DiskWatchService)
                   for c in makeService(_options(), MemoryReactorClock()))


@pytest.mark.parametrize("value", ["lots", "0", "-5m"])
def test_a_bad_disk_size_is_refused(value):
    with pytest.raises(usage.UsageError, match="--disk: not a size"):
        _options("--disk", value)


class _Engine:
    """
    docker-py's APIClient as far as creating a container goes, with a
    storage driver that can or cannot limit sizes.
    """

    def __init__(self, quota: bool) -> None:
        self.quota = quota
        self.creates = []

    def create_host_config(self, **kwargs):
        return kwargs

    def create_container(self, image, host_config, **kwargs):
        self.creates.append(host_config)
        if host_config["storage_opt"] and not self.quota:
            response = requests.Response()
            response.status_code = 500
            raise docker.errors.APIError(
                "500 Server Error", response,
                explanation="--storage-opt is supported only for overlay over xfs with"
                            " 'pquota' mount option")
        return {"Id": f"c{len(self.creates)}"}

    def start(self, container_id):
        pass


@pytest.mark.parametrize("quota", [True, False])
def test_the_size_is_asked_of_the_driver_until_it_refuses(quota):
    api = DockerAPI(MemoryReactorClock())
    engine = _Engine(quota)
    spec = ContainerSpec(image="i", disk="50m", cpu_shares=128)
    for _ in range(2):
        api._thd_create_session_container(engine, "s", spec)
    assert api.storage_quota is quota
    asked = [c["storage_opt"] for c in engine.creates]
    assert asked == ([{"size": "50m"}] * 2 if quota else [{"size": "50m"}, None, None])
    assert {c["cpu_shares"] for c in engine.creates} == {128}
    # Without --disk, no size is asked.
    api._thd_create_session_container(engine, "s", ContainerSpec(image="i"))
    assert engine.creates[-1]["storage_opt"] is None
