"""
The disk watcher: warns a session nearing --disk and ends one past it.
"""

import os
from dataclasses import replace

import docker.errors
import pytest
import requests
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from capsule.core.diskuse import HELD_SCAN, DiskUsage, Held, parse_held
from capsule.sessions.disk import DiskWatchService, disk_verdicts, scan_held
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

    def read(volumes):
        calls.append(1)
        d = sizes() if callable(sizes) else succeed(sizes)
        return d.addCallback(lambda layers: DiskUsage(layers=layers))
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


def test_the_watcher_runs_after_the_cleanup_only_with_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSULE_TUNING", "disk-check-interval=5")
    service = makeService(_options("--disk", "2g"), MemoryReactorClock())
    types = [type(c) for c in service]
    assert types[types.index(CleanupService) + 1:] == [DiskWatchService, ListenerService]
    (watcher,) = [c for c in service if isinstance(c, DiskWatchService)]
    assert (watcher.step, watcher._limit) == (5.0, 2 * 1024 ** 3)
    # The built-in claude profile's volume is weighed; without it, nothing is.
    assert any(isinstance(c, DiskWatchService)
               for c in makeService(_options(), MemoryReactorClock()))
    path = tmp_path / "profiles.toml"
    path.write_text('[profiles.claude]\nagent_volume_limit = "off"\n')
    assert not any(isinstance(c, DiskWatchService)
                   for c in makeService(_options("--profiles", str(path)), MemoryReactorClock()))


def test_nothing_is_read_for_sessions_with_nothing_to_weigh(manager, clock):
    """
    Sessions with no disk limit and no agent volume (shells beside the
    claude profile's volumes, which start the watcher) cost the engine no
    call.
    """
    manager.create(RecordingClient(), 80, 24)
    calls = []
    service = DiskWatchService(manager, clock, None, 30.0,
                               lambda volumes: calls.append(volumes) or succeed(DiskUsage()),
                               enforced=lambda: False)
    service.startService()
    clock.advance(60)
    service.stopService()
    assert calls == []


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


# -- what a session holds beyond its writable layer ------------------------------

def test_held_files_are_read_from_the_scan():
    overlay, volume = os.makedev(0, 40), os.makedev(254, 0)
    output = "\n".join([
        f"f {overlay} 7 204800",             # 100 MiB on the layer, open twice
        f"f {overlay} 7 204800",
        f"f {volume} 9 2048",                # 1 MiB on a volume
        f"f {os.makedev(0, 49)} 3 409600",   # /tmp on tmpfs: memory, not disk
        f"f {os.makedev(0, 1)} 5 409600",    # a memfd: no mount names its device
        # 2 MiB mapped of a deleted file whose descriptor was closed, and a
        # mapping of the 100 MiB file above (counted once).
        "m 7f0000000000 7f0000200000 00:28 11",
        "m 7f1000000000 7f1000001000 00:28 7",
        "d 0:40 overlay", "d 254:0 ext4", "d 0:49 tmpfs",
        "x 13", "not a line", "f 1 2", "m zz",
    ]).encode()
    held = parse_held(output)
    assert (held.bytes, held.files, held.hidden) == (103 * MIB, 3, 1)
    assert parse_held(b"") == Held()


def _usage_watcher(manager, clock, docker, scans=2, limit=100 * MIB, grace=60.0,
                   enforced=lambda: False):
    return DiskWatchService(
        manager, clock, limit, 30.0,
        lambda volumes: docker.disk_usage(manager.labels, volumes), enforced=enforced,
        scan=lambda container_id, user: scan_held(docker, container_id, user),
        scans=scans, volume_grace=grace)


def _scan_answers(docker, held_by_container):
    """
    The scan's answer in each container: C{held_by_container[id]} bytes in
    one deleted file on the layer.
    """
    def scan(stdin):
        (run,) = docker.commands_run[-1:]
        blocks = held_by_container.get(run["container_id"], 0) // 512
        lines = [f"d 0:40 overlay"] + ([f"f {os.makedev(0, 40)} 7 {blocks}"] if blocks else [])
        return "\n".join(lines).encode(), b"", 0
    docker.commands[HELD_SCAN] = scan


def test_a_deleted_file_held_open_counts_towards_the_limit(clock):
    docker = FakeDockerAPI()
    manager = SessionManager(docker, clock, SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest"), instance="t"))
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    docker.containers[session.container_id]["size_rw"] = 1 * MIB
    held = {session.container_id: 150 * MIB}
    _scan_answers(docker, held)
    service = _usage_watcher(manager, clock, docker)
    service.startService()
    (run,) = docker.commands_run
    assert (run["argv"], run["user"]) == (HELD_SCAN, "developer")
    (ended,) = [e for e in client.events if e[0] == "ended"]
    assert ended[2] == ("the session wrote 151.0 MiB (150.0 MiB of it in deleted files still"
                        " open), more than its disk limit of 100.0 MiB")
    # Volumes were not asked for: no session has any.
    assert docker.disk_usage_calls == [False]
    service.stopService()


def test_scans_are_a_few_per_check_taken_in_turn(clock):
    docker = FakeDockerAPI()
    manager = SessionManager(docker, clock, SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest"), instance="t"))
    sessions = [manager.create(RecordingClient(), 80, 24) for _ in range(5)]
    held = {}
    _scan_answers(docker, held)
    service = _usage_watcher(manager, clock, docker, scans=2)
    service.startService()
    clock.advance(30)
    clock.advance(30)
    scanned = [run["container_id"] for run in docker.commands_run]
    # Two per check; every session once before any twice.
    assert len(scanned) == 6
    assert sorted(scanned[:5]) == sorted(s.container_id for s in sessions)
    assert docker.disk_usage_calls == [False] * 3
    # One that held some (within its limit: warned) is scanned at every
    # check, before the others.
    held[sessions[4].container_id] = 90 * MIB
    clock.advance(30)
    clock.advance(30)
    clock.advance(30)
    assert docker.commands_run[-2]["container_id"] == sessions[4].container_id
    assert notices(sessions[4].client) == [("notice", "disk_limit")]
    before = len(docker.commands_run)
    clock.advance(30)
    assert docker.commands_run[before]["container_id"] == sessions[4].container_id
    service.stopService()


def test_a_failed_scan_keeps_what_was_known(clock):
    docker = FakeDockerAPI()
    manager = SessionManager(docker, clock, SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest"), instance="t"))
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    _scan_answers(docker, {session.container_id: 90 * MIB})
    service = _usage_watcher(manager, clock, docker)
    service.startService()
    assert notices(client) == [("notice", "disk_limit")]
    docker.commands[HELD_SCAN] = lambda stdin: fail(DockerUnavailable("away"))
    docker.containers[session.container_id]["size_rw"] = 20 * MIB
    clock.advance(30)
    # 90 MiB held (as last seen) and 20 MiB written.
    assert session.over
    service.stopService()


def test_a_read_only_root_sessions_volumes_count_even_where_the_driver_limits_the_layer(clock):
    docker = FakeDockerAPI()
    manager = SessionManager(docker, clock, SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest", read_only_root=True),
        instance="t"))
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    docker.containers[session.container_id]["size_rw"] = 500 * MIB
    _scan_answers(docker, {session.container_id: 500 * MIB})
    service = _usage_watcher(manager, clock, docker, enforced=lambda: True)
    service.startService()
    # The layer and what is held in it are the driver's to limit: nothing
    # scanned, nothing said.
    assert docker.commands_run == [] and notices(client) == []
    assert docker.disk_usage_calls == [True]
    docker.volume_sizes[f"{session.container_id}-workspace"] = 101 * MIB
    clock.advance(30)
    (ended,) = [e for e in client.events if e[0] == "ended"]
    assert ended[2] == ("the session wrote 101.0 MiB (101.0 MiB in its volumes), more than its"
                        " disk limit of 100.0 MiB")
    service.stopService()


class NoticeClient(RecordingClient):
    """
    A client that keeps its notices' messages too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.notices: list[str] = []

    def session_notice(self, code, message):
        self.notices.append(message)
        super().session_notice(code, message)


def _agent_manager(docker, clock, tmp_path, limit='"200m"'):
    from capsule.core.profiles import builtin_profiles, load_profiles
    from capsule.sessions.session import shell_profile
    config = SessionConfig(spec=ContainerSpec(image="capsule-runtime:latest"), instance="t")
    path = tmp_path / "profiles.toml"
    path.write_text(f'[profiles.agent]\nagent_volume = "/home/developer/.claude"\n'
                    f'agent_volume_limit = {limit}\n')
    profiles = load_profiles(str(path), builtin_profiles(shell_profile(config)))
    return SessionManager(docker, clock, replace(config, profiles=profiles))


def test_an_agent_volume_past_its_limit_is_warned_then_ends(clock, tmp_path):
    docker = FakeDockerAPI()
    manager = _agent_manager(docker, clock, tmp_path)
    client = NoticeClient()
    session = manager.create(client, 80, 24, user="ann", profile="agent")
    (volume, _), = docker.containers[session.container_id]["spec"].volumes
    service = _usage_watcher(manager, clock, docker, limit=None, grace=60.0)
    service.startService()
    assert docker.disk_usage_calls == [True] and notices(client) == []
    # No --disk: nothing scanned.
    assert docker.commands_run == []
    docker.volume_sizes[volume] = 170 * MIB
    clock.advance(30)
    assert client.notices == [
        "its agent volume (/home/developer/.claude, kept between sessions) holds 170.0 MiB"
        " of its 200.0 MiB limit"]
    docker.volume_sizes[volume] = 300 * MIB
    clock.advance(30)
    assert notices(client)[-1] == ("notice", "disk_limit")
    assert client.notices[-1].endswith("more than its limit of 200.0 MiB: remove files from"
                                         " it within 60 s, or this session ends")
    assert not session.over
    clock.advance(30)
    assert not session.over
    clock.advance(30)
    (ended,) = [e for e in client.events if e[0] == "ended"]
    assert ended[2] == ("its agent volume (/home/developer/.claude, kept between sessions) holds"
                        " 300.0 MiB, more than its limit of 200.0 MiB; remove files from it in a"
                        " new session, or ask the operator to remove it")
    # The user's next session may bring it back under the limit.
    client = RecordingClient()
    session = manager.create(client, 80, 24, user="ann", profile="agent")
    clock.advance(30)
    assert len(notices(client)) == 1 and not session.over
    docker.volume_sizes[volume] = 10 * MIB
    clock.advance(30)
    clock.advance(30)
    clock.advance(30)
    assert not session.over
    service.stopService()


def test_an_agent_volume_growing_past_its_limit_ends_at_once(clock, tmp_path):
    docker = FakeDockerAPI()
    manager = _agent_manager(docker, clock, tmp_path)
    client = RecordingClient()
    session = manager.create(client, 80, 24, user="ann", profile="agent")
    (volume, _), = docker.containers[session.container_id]["spec"].volumes
    docker.volume_sizes[volume] = 250 * MIB
    service = _usage_watcher(manager, clock, docker, limit=None, grace=600.0)
    service.startService()
    assert not session.over
    docker.volume_sizes[volume] = 260 * MIB
    clock.advance(30)
    assert session.over
    service.stopService()


def test_an_agent_volume_limit_may_be_off(clock, tmp_path):
    docker = FakeDockerAPI()
    manager = _agent_manager(docker, clock, tmp_path, limit='"off"')
    assert manager.profiles["agent"].agent_volume_limit is None
    assert manager.profiles["shell"].agent_volume_limit == 1024 ** 3
    client = RecordingClient()
    session = manager.create(client, 80, 24, user="ann", profile="agent")
    (volume, _), = docker.containers[session.container_id]["spec"].volumes
    docker.volume_sizes[volume] = 5000 * MIB
    service = _usage_watcher(manager, clock, docker, limit=None)
    service.startService()
    clock.advance(30)
    assert not session.over and notices(client) == []
    service.stopService()


@pytest.mark.parametrize("value", ['"lots"', "0", '"-5m"', "5"])
def test_a_bad_agent_volume_limit_is_refused(tmp_path, value):
    from capsule.core.profiles import ProfileError
    with pytest.raises(ProfileError, match="agent_volume_limit"):
        _agent_manager(FakeDockerAPI(), Clock(), tmp_path, limit=value)


def test_the_watcher_runs_for_agent_volumes_without_disk(tmp_path):
    path = tmp_path / "profiles.toml"
    path.write_text('[profiles.agent]\nagent_volume = "/home/developer/.claude"\n')
    service = makeService(_options("--profiles", str(path)), MemoryReactorClock())
    (watcher,) = [c for c in service if isinstance(c, DiskWatchService)]
    assert watcher._limit is None
