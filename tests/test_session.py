"""
The session state machine, against the in-memory Docker engine and a Clock.
"""

import re

import pytest
from twisted.logger import globalLogPublisher

from twisted.internet.task import Clock

from capsule.sessions.cleanup import CleanupService, expire_due, expired_sessions
from capsule.core.spec import ContainerSpec
from capsule.core.errors import SessionNotFound
from capsule.core.keeper import keeper_argv
from capsule.core.protocol import ProtocolError
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import LABEL_INSTANCE, LABEL_SESSION, SessionConfig
from tests.support.fakes import FakeDockerAPI, RecordingClient


@pytest.fixture
def docker():
    return FakeDockerAPI()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def manager(docker, clock):
    spec = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64)
    return SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", grace=60,
                                                       replay_bytes=16))


def test_create_starts_container_and_shell(manager, docker):
    client = RecordingClient()
    session = manager.create(client, 100, 30)
    assert session.status() == "running"
    assert client.events == [("started", session.id, False)]
    container = docker.containers[session.container_id]
    # The name is random: Docker's DNS tells it to the other sessions.
    assert re.fullmatch(r"capsule-[0-9a-f]{32}", container["name"])
    assert session.id[:8] not in container["name"]
    assert container["labels"][LABEL_SESSION] == session.id
    assert container["labels"][LABEL_INSTANCE] == "t"
    assert container["spec"].memory == "1g" and container["spec"].pids == 64
    process = docker.processes[0]
    assert process.argv == tuple(keeper_argv(("bash", "-l"), 0, 16))
    assert process.resizes == [(100, 30)]
    

def test_output_input_resize(manager, docker):
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    process = docker.processes[0]
    process.emit(b"$ ")
    manager.write(session, b"ls\r")
    manager.resize(session, 120, 40)
    assert client.output == b"$ "
    assert process.written == [b"ls\r"]
    assert process.resizes == [(80, 24), (120, 40)]


def test_input_while_starting_is_delivered_once_running(manager, docker):
    docker.hold_create = True
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    manager.write(session, b"echo hi\r")
    manager.resize(session, 90, 30)
    assert session.status() == "starting" and client.events == []
    docker.release_create()
    assert docker.processes[0].written == [b"echo hi\r"]
    assert docker.processes[0].resizes == [(90, 30)]
    assert client.kinds() == ["started"]


def test_input_while_starting_is_bounded(manager, docker):
    docker.hold_create = True
    session = manager.create(RecordingClient(), 80, 24)
    with pytest.raises(ProtocolError):
        manager.write(session, b"x" * (manager.config.max_pending_input + 1))


def test_client_leaving_while_starting_leaks_nothing(manager, docker):
    docker.hold_create = True
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    manager.detach(session, client)
    docker.release_create()
    assert docker.containers == {}
    assert session.id not in manager.sessions
    assert client.events == []


def test_detach_keeps_output_and_reconnect_replays_what_was_missed(manager, docker, clock):
    first = RecordingClient()
    session = manager.create(first, 80, 24)
    process = docker.processes[0]
    process.emit(b"one ")
    process.pauseProducing()
    manager.detach(session, first)
    assert not process.paused, "a detached session must keep reading"
    process.emit(b"two ")
    second = RecordingClient()
    assert manager.reconnect(session.id, second) is session
    assert second.events[0] == ("started", session.id, True)
    assert second.output == b"two "
    assert first.output == b"one "


def test_reconnect_after_too_much_output_says_what_was_dropped(manager, docker):
    first = RecordingClient()
    session = manager.create(first, 80, 24)
    manager.detach(session, first)
    docker.processes[0].emit(b"0123456789" * 3)
    second = RecordingClient()
    manager.reconnect(session.id, second)
    assert ("dropped", 14, 14) in second.events
    assert second.output.endswith(b"4567890123456789")


def test_second_client_takes_over(manager, docker):
    first, second = RecordingClient(), RecordingClient()
    session = manager.create(first, 80, 24)
    manager.reconnect(session.id, second)
    assert first.kinds()[-1] == "taken_over"
    assert session.client is second
    manager.detach(session, first)  # the old connection closing changes nothing
    assert session.client is second and session.core.left_at is None
    docker.processes[0].emit(b"x")
    assert second.output == b"x" and first.output == b""


def test_unknown_session(manager):
    with pytest.raises(SessionNotFound):
        manager.reconnect("00000000-0000-0000-0000-000000000000", RecordingClient())


def test_exit_ends_session_and_removes_container(manager, docker):
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    docker.processes[0].exit(3)
    assert client.events[-1] == ("ended", 3, "the shell exited with code 3")
    assert session.status() in ("ending", "ended") and session.id not in manager.sessions
    assert session.container_id in docker.removed
    with pytest.raises(SessionNotFound):
        manager.reconnect(session.id, RecordingClient())


def test_oom_is_explained(manager, docker):
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    docker.containers[session.container_id].update(state="exited", oom=True, exit_code=137)
    docker.processes[0].exit(None)
    assert client.events[-1][0] == "ended"
    assert "ran out of memory" in client.events[-1][2]


def test_start_failure_tells_client(manager, docker):
    docker.reachable = False
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    assert client.events[0][0] == "failed"
    assert "cannot reach the Docker engine" in client.events[0][1]
    assert client.events[0][2] == "docker_unavailable"
    assert session.id not in manager.sessions


def test_missing_image_tells_client(manager, docker):
    docker.images.clear()
    client = RecordingClient()
    manager.create(client, 80, 24)
    assert client.events[0][2] == "image_missing"


def test_expiry_after_grace(manager, docker, clock):
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    manager.detach(session, client)
    clock.advance(59)
    expire_due(manager, clock)
    assert session.id in manager.sessions
    clock.advance(1)
    expire_due(manager, clock)
    assert session.id not in manager.sessions
    assert session.container_id in docker.removed


def test_expired_sessions_is_pure(manager, clock):
    attached = manager.create(RecordingClient(), 80, 24)
    left = manager.create(client := RecordingClient(), 80, 24)
    manager.detach(left, client)
    sessions = list(manager.sessions.values())
    assert expired_sessions(sessions, clock.seconds() + 61, 60) == [left]
    assert expired_sessions(sessions, clock.seconds() + 1, 60) == []
    assert attached.status() == "running"


def test_cleanup_service_survives_errors(manager, docker, clock):
    service = CleanupService(manager, clock, 5)
    service.startService()
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    manager.detach(session, client)
    broken = []

    def expire(s):
        broken.append(s)
        raise RuntimeError("boom")

    manager.expire, original = expire, manager.expire
    clock.advance(61)
    assert broken == [session]
    manager.expire = original
    clock.advance(5)
    assert session.id not in manager.sessions
    service.stopService()


def test_shutdown_keeps_sessions_for_a_restart(manager, docker):
    clients = [RecordingClient() for _ in range(3)]
    sessions = [manager.create(c, 80, 24) for c in clients]
    manager.shutdown()
    assert {s.container_id for s in sessions} <= set(docker.containers)
    assert all(c.kinds()[-1] == "interrupted" for c in clients)
    assert not any(p.connected for p in docker.processes)
    # The shells' connections closing during shutdown ends nothing.
    docker.processes[0].exit(None)
    assert sessions[0].container_id in docker.containers


def test_shutdown_without_keeper_removes_every_container(docker, clock):
    spec = ContainerSpec(image="capsule-runtime:latest")
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, keeper=False))
    clients = [RecordingClient() for _ in range(3)]
    for c in clients:
        manager.create(c, 80, 24)
    assert docker.processes[0].argv == ("bash", "-l")
    manager.shutdown()
    assert docker.containers == {} and manager.sessions == {}
    assert all(c.kinds()[-1] == "ended" for c in clients)


def recovered_manager(docker, clock):
    spec = ContainerSpec(image="capsule-runtime:latest")
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", grace=60))
    from twisted.internet.defer import Deferred
    Deferred.fromCoroutine(manager.recovery.recover())
    return manager


SID = "6f9619ff-8b86-4011-b42d-00c04fc964ff"


def test_recover_finds_running_sessions_and_removes_the_rest(docker, clock):
    labels = {"io.capsule.managed": "true", LABEL_INSTANCE: "t"}
    docker.add_container("alive", {**labels, LABEL_SESSION: SID})
    docker.add_container("stopped", {**labels, LABEL_SESSION: "7f9619ff-8b86-4011-b42d-00c04fc964ff"})
    docker.containers["stopped"]["state"] = "exited"
    docker.add_container("other", {"io.capsule.managed": "true", LABEL_INSTANCE: "x"})
    manager = recovered_manager(docker, clock)
    assert manager.sessions[SID].status() == "recovered"
    assert "stopped" in docker.removed and "alive" in docker.containers
    assert "other" in docker.containers


def test_recover_thaws_a_container_an_earlier_run_left_paused(docker, clock):
    """
    A fork's copy on the host pauses its source: a capsule that stopped
    meanwhile left it paused.  It is thawed and found again, not removed
    as a leftover.
    """
    labels = {"io.capsule.managed": "true", LABEL_INSTANCE: "t"}
    docker.add_container("paused", {**labels, LABEL_SESSION: SID})
    docker.containers["paused"]["state"] = "paused"
    manager = recovered_manager(docker, clock)
    assert "paused" not in docker.removed
    assert docker.containers["paused"]["state"] == "running"
    assert manager.sessions[SID].status() == "recovered"


def test_reconnect_to_a_recovered_session_resumes_at_the_offset(docker, clock):
    docker.add_container("alive", {"io.capsule.managed": "true", LABEL_INSTANCE: "t",
                                   LABEL_SESSION: SID})
    docker.keeper_output["alive"] = (100, 500)
    manager = recovered_manager(docker, clock)
    client = RecordingClient()
    manager.reconnect(SID, client, offset=300)
    assert client.events == [("started", SID, True)]
    assert client.offset == 300
    process = docker.processes[0]
    assert process.argv[:6] == ("capsule-keeper", "-r", "-b", str(1024 * 1024), "-o", "300")
    process.emit(b"missed bytes")
    assert client.output == b"missed bytes" and manager.sessions[SID].replay.end == 312


def test_recovered_session_reports_what_was_dropped(docker, clock):
    docker.add_container("alive", {"io.capsule.managed": "true", LABEL_INSTANCE: "t",
                                   LABEL_SESSION: SID})
    docker.keeper_output["alive"] = (100, 500)
    manager = recovered_manager(docker, clock)
    client = RecordingClient()
    manager.reconnect(SID, client, offset=40)
    assert client.events == [("started", SID, True), ("dropped", 60, 100)]


def test_recovered_session_expires_without_its_client(docker, clock):
    docker.add_container("alive", {"io.capsule.managed": "true", LABEL_INSTANCE: "t",
                                   LABEL_SESSION: SID})
    manager = recovered_manager(docker, clock)
    clock.advance(61)
    expire_due(manager, clock)
    assert SID not in manager.sessions and "alive" in docker.removed


def test_recovered_session_whose_container_vanished_ends(docker, clock):
    docker.add_container("alive", {"io.capsule.managed": "true", LABEL_INSTANCE: "t",
                                   LABEL_SESSION: SID})
    manager = recovered_manager(docker, clock)
    del docker.containers["alive"]
    client = RecordingClient()
    manager.reconnect(SID, client)
    assert client.kinds() == ["ended"]
    assert "gone" in client.events[0][2]
    assert SID not in manager.sessions


def test_leftovers_of_this_instance_only(manager, docker):
    from twisted.internet.defer import Deferred
    live = manager.create(RecordingClient(), 80, 24)
    docker.add_container("old", {**manager.labels, LABEL_SESSION: "gone"})
    docker.add_container("other", {"io.capsule.managed": "true", LABEL_INSTANCE: "other"})
    docker.add_container("stranger", {})
    results = []
    Deferred.fromCoroutine(manager.recovery.remove_leftovers()).addCallback(results.append)
    assert results == [1]
    assert "old" in docker.removed
    assert {"other", "stranger", live.container_id} <= set(docker.containers)


def test_orphan_sweep_removes_unowned_containers_only(manager, docker, clock):
    from capsule.sessions.session import LABEL_SESSION
    service = CleanupService(manager, clock, 1, orphan_interval=10)
    service.startService()
    live = manager.create(RecordingClient(), 80, 24)
    docker.add_container("orphan", {**manager.labels, LABEL_SESSION: "ended-long-ago"})
    clock.advance(5)
    assert "orphan" in docker.containers
    clock.advance(6)
    assert "orphan" not in docker.containers
    assert live.container_id in docker.containers
    service.stopService()


def test_a_failing_client_does_not_kill_the_shell(manager, docker):
    class Broken(RecordingClient):
        def session_output(self, data):
            raise RuntimeError("client blew up")

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        client = Broken()
        session = manager.create(client, 80, 24)
        process = docker.processes[0]
        process.emit(b"still here")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert process.connected and session.status() == "running"
    assert session.replay.since(0) == (b"still here", 0)
    assert [e["log_failure"].value.args for e in events if "log_failure" in e] == [
        ("client blew up",)]


# -- issue: one lifecycle (regressions) -------------------------------------------

def test_input_typed_while_resuming_reaches_the_shell_once_in_order(docker, clock):
    docker.add_container("alive", {"io.capsule.managed": "true", LABEL_INSTANCE: "t",
                                   LABEL_SESSION: SID})
    docker.keeper_output["alive"] = (0, 10)
    manager = recovered_manager(docker, clock)
    docker.hold_exec = True
    first = RecordingClient()
    session = manager.reconnect(SID, first, offset=10)
    manager.write(session, b"one ")
    # A takeover while it is still being resumed: both clients' input counts.
    second = RecordingClient()
    manager.reconnect(SID, second, offset=10)
    manager.write(session, b"two ")
    assert first.kinds() == ["taken_over"]
    docker.release_exec()
    process = docker.processes[-1]
    assert process.written == [b"one ", b"two "]
    assert second.kinds() == ["started"] and second.offset == 10
    manager.write(session, b"three")
    assert process.written == [b"one ", b"two ", b"three"]


def test_restart_notice_is_not_output_and_offsets_stay_exact(docker, clock):
    # The container restarted while capsule was down: its keeper starts again at 0.
    docker.add_container("alive", {"io.capsule.managed": "true", LABEL_INSTANCE: "t",
                                   LABEL_SESSION: SID})
    manager = recovered_manager(docker, clock)
    client = RecordingClient()
    session = manager.reconnect(SID, client, offset=300)
    assert client.events == [("started", SID, True), ("notice", "shell_restarted")]
    assert client.offset == 0
    docker.processes[-1].emit(b"fresh prompt$ ")
    assert client.output == b"fresh prompt$ "
    assert client.offset == session.replay.end == 14


def engine_goes_away(manager, docker, client):
    session = manager.create(client, 80, 24)
    docker.processes[-1].emit(b"T1\r\n")
    docker.reachable = False
    docker.processes[-1].exit(None)
    return session


def test_engine_away_keeps_the_session_and_its_client(manager, docker, clock):
    client = RecordingClient()
    session = engine_goes_away(manager, docker, client)
    assert session.status() == "interrupted" and session.id in manager.sessions
    assert client.kinds() == ["started", "output", "notice"]
    assert client.events[-1] == ("notice", "engine_away")
    # Typed while the engine is away: it reaches the shell once it is back.
    manager.write(session, b"echo back\r")
    docker.keeper_output[session.container_id] = (0, 4)
    clock.advance(0.5)
    assert session.status() == "interrupted", "retrying while the engine is away"
    docker.reachable = True
    clock.advance(1)
    assert session.status() == "running"
    process = docker.processes[-1]
    assert process.argv[process.argv.index("-o") + 1] == "4"
    assert process.written == [b"echo back\r"]
    assert client.events[-1] == ("notice", "engine_back")
    process.emit(b"back\r\n")
    assert client.output == b"T1\r\nback\r\n" and client.offset == 10


def test_engine_back_but_container_gone_ends_with_that_reason(manager, docker, clock):
    client = RecordingClient()
    session = engine_goes_away(manager, docker, client)
    del docker.containers[session.container_id]
    docker.reachable = True
    clock.advance(1)
    assert client.events[-1][0] == "ended" and "removed while" in client.events[-1][2]
    assert session.id not in manager.sessions


def test_engine_that_never_returns_ends_the_session_after_the_grace(manager, docker, clock):
    client = RecordingClient()
    session = engine_goes_away(manager, docker, client)
    clock.pump([5] * 11)
    assert session.id in manager.sessions
    clock.pump([5] * 2)
    assert client.events[-1][0] == "ended" and "did not come back" in client.events[-1][2]


def test_expiry_never_takes_a_session_waiting_for_the_engine(manager, docker, clock):
    client = RecordingClient()
    session = engine_goes_away(manager, docker, client)
    manager.detach(session, client)
    clock.advance(59)
    assert expire_due(manager, clock) == []
    assert session.status() == "interrupted"


def test_client_arriving_while_the_engine_is_away_gets_what_was_printed(manager, docker, clock):
    first = RecordingClient()
    session = engine_goes_away(manager, docker, first)
    manager.detach(session, first)
    second = RecordingClient()
    manager.reconnect(session.id, second, offset=0)
    assert second.events == [("started", session.id, True), ("output", b"T1\r\n"),
                             ("notice", "engine_away")]


def test_a_reconnect_without_offset_resumes_after_what_was_sent(manager, docker):
    first = RecordingClient()
    session = manager.create(first, 80, 24)
    docker.processes[0].emit(b"abcdef")
    # The connection closed with its last 2 bytes still waiting to go out.
    manager.detach(session, first, unsent=2)
    second = RecordingClient()
    manager.reconnect(session.id, second)
    assert second.output == b"ef"


def test_stale_output_of_a_replaced_stream_is_not_heard(manager, docker, clock):
    client = RecordingClient()
    session = engine_goes_away(manager, docker, client)
    old = docker.processes[-1]
    docker.reachable = True
    clock.advance(1)
    old.emit(b"ghost")
    old.exit(0)
    assert session.status() == "running" and b"ghost" not in client.output


# -- input backpressure ------------------------------------------------------------------

def test_a_shell_not_reading_its_input_pauses_the_client(manager, docker):
    from capsule.core.session_core import InputOverrun
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    process = docker.processes[0]
    gate = process.input_producer
    assert gate is session.core.input
    gate.pauseProducing()
    assert client.events[-1] == ("pause_input", True)
    # What was already read still goes to the shell, up to the cap.
    manager.write(session, b"x" * manager.config.max_input_overrun)
    with pytest.raises(InputOverrun):
        manager.write(session, b"y")
    # A takeover while paused: the new client is not read either.
    second = RecordingClient()
    manager.reconnect(session.id, second)
    assert ("pause_input", True) in second.events
    gate.resumeProducing()
    assert second.events[-1] == ("pause_input", False)
    manager.write(session, b"z")
    assert process.written[-1] == b"z"


# -- lifetime and idle limits ------------------------------------------------------------

def limited_manager(docker, clock, **limits):
    spec = ContainerSpec(image="capsule-runtime:latest")
    return SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", **limits))


def test_max_lifetime_ends_a_busy_attached_session(docker, clock):
    from capsule.sessions.cleanup import end_overdue
    manager = limited_manager(docker, clock, max_lifetime=100)
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    for _ in range(9):
        clock.advance(10)
        docker.processes[0].emit(b"busy\r\n")
        assert end_overdue(manager, clock) == []
    clock.advance(10)
    assert end_overdue(manager, clock) == [session]
    assert client.events[-1][0] == "ended" and "maximum lifetime" in client.events[-1][2]
    assert session.container_id in docker.removed


def test_limits_leave_a_session_waiting_for_the_engine_alone(docker, clock):
    from capsule.sessions.cleanup import overdue_sessions
    manager = limited_manager(docker, clock, max_lifetime=10)
    session = engine_goes_away(manager, docker, RecordingClient())
    clock.advance(30)
    assert overdue_sessions([session], clock.seconds(), 10) == []


# -- per-user CPU weight -------------------------------------------------------------------

def test_a_users_sessions_share_one_cpu_weight(docker, clock):
    spec = ContainerSpec(image="capsule-runtime:latest", cpu_shares=256)
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t"))
    ann = [manager.create(RecordingClient(), 80, 24, user="ann") for _ in range(2)]
    bob = manager.create(RecordingClient(), 80, 24, user="bob")
    shares = lambda s: docker.containers[s.container_id].get("cpu_shares", 256)  # noqa: E731
    assert [shares(s) for s in ann] == [128, 128] and shares(bob) == 256
    ann.append(manager.create(RecordingClient(), 80, 24, user="ann"))
    assert [shares(s) for s in ann] == [85, 85, 85]
    docker.processes[0].exit(0)
    assert [shares(s) for s in ann[1:]] == [128, 128] and shares(bob) == 256
    assert manager.fair_share.shares_of(None) == 256


# -- sessions made without a client --------------------------------------------------------

def test_a_session_without_a_client_is_kept_detached_and_replays_all_to_its_first(
        manager, docker, clock):
    session = manager.create(None, 100, 30, user="ann")
    assert session.status() == "detached" and session.client is None
    assert manager.find(session.id, "ann") is session and manager.find(session.id) is None
    process = docker.processes[0]
    assert process.resizes == [(100, 30)]
    process.emit(b"banner\r\n$ ")
    clock.advance(30)
    client = RecordingClient()
    assert manager.reconnect(session.id, client, 0, user="ann") is session
    assert session.status() == "running"
    assert client.events == [("started", session.id, True), ("output", b"banner\r\n$ ")]


def test_a_session_without_a_client_expires_after_the_grace(manager, docker, clock):
    docker.hold_create = True
    session = manager.create(None, 80, 24)
    assert session.status() == "starting"
    clock.advance(100)
    assert expire_due(manager, clock) == [], "the grace runs from when its shell is up"
    docker.release_create()
    assert session.status() == "detached"
    clock.advance(59)
    assert expire_due(manager, clock) == []
    clock.advance(1)
    assert expire_due(manager, clock) == [session]
    assert docker.containers == {} and session.id not in manager.sessions


def test_a_client_attached_while_a_clientless_session_starts_is_handed_it(manager, docker):
    docker.hold_create = True
    session = manager.create(None, 80, 24)
    client = RecordingClient()
    manager.reconnect(session.id, client, 0)
    manager.write(session, b"ls\r")
    docker.release_create()
    assert session.status() == "running"
    assert client.kinds() == ["started"]
    assert docker.processes[0].written == [b"ls\r"]


def test_a_session_without_a_client_that_cannot_start_is_forgotten(manager, docker):
    docker.images.clear()
    session = manager.create(None, 80, 24)
    assert session.status() == "ended" and session.id not in manager.sessions
    assert session.core.message == "the session image capsule-runtime:latest is missing"
