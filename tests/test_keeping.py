"""
Kept sessions (capsule.sessions.keeping) against the in-memory engine and a
Clock: put away instead of removed, found again after a restart, resumed
under the same id, deleted, swept past their retention, forked, and named
snapshots.
"""

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from capsule.core.errors import SessionNotFound
from capsule.core.keeper import encode_screen, parse_screen
from capsule.core.kept import GRACE, PUT_AWAY, STOPPED, KeptSession, screen_path
from capsule.core.profiles import LABEL_PROFILE, Profile, ProfileError, load_profiles
from capsule.core.spec import ContainerSpec
from capsule.sessions.cleanup import CleanupService, expire_due
from capsule.sessions.keeping import (LABEL_OWN_VOLUMES, PRUNE_AGAIN, LABEL_WARM, SNAPSHOT_REPOSITORY,
                                      KeepingConfig, KeptLimit, NotKept, SnapshotExists,
                                      SnapshotNotFound, kept_message, own_volumes)
from capsule.sessions.manager import SessionManager
from capsule.sessions.owners import OwnerFile
from capsule.sessions.session import LABEL_INSTANCE, LABEL_MANAGED, LABEL_SESSION, SessionConfig
from tests.support.fakes import FakeDockerAPI, RecordingClient

DAY = 86400.0
SID = "6f9619ff-8b86-4011-b42d-00c04fc964ff"
LABELS = {LABEL_MANAGED: "true", LABEL_INSTANCE: "t"}


@pytest.fixture
def docker():
    return FakeDockerAPI()


@pytest.fixture
def clock():
    clock = Clock()
    clock.advance(1_800_000_000)
    return clock


def make_manager(docker, clock, state_dir=None, owners=None, profiles=None, **keeping):
    spec = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64,
                         read_only_root=True)
    config = SessionConfig(spec=spec, instance="t", grace=60, replay_bytes=4096,
                           profiles=profiles)
    return SessionManager(docker, clock, config, owners=owners,
                          keeping=KeepingConfig(**{"retention": 7 * DAY,
                                                   "state_dir": state_dir, **keeping}))


@pytest.fixture
def manager(docker, clock, tmp_path):
    return make_manager(docker, clock, str(tmp_path))


def result(d: Deferred):
    """
    What an already fired Deferred fired with (its failure raised).
    """
    found = []
    d.addBoth(found.append)
    assert found, "not fired"
    if hasattr(found[0], "raiseException"):
        found[0].raiseException()
    return found[0]


def running(manager, docker, user=None, output=b"$ ls\r\nnotes.txt\r\n$ "):
    client = RecordingClient()
    session = manager.create(client, 80, 24, user=user)
    if output:
        docker.processes[-1].emit(output)
    return session, client


def put_away(manager, docker, user=None, **kw):
    session, client = running(manager, docker, user=user, **kw)
    kept = result(manager.keeping.put_away(session))
    return session, client, kept


# -- putting away ------------------------------------------------------------------

def test_an_expired_session_is_put_away_not_removed(manager, docker, clock):
    session, client = running(manager, docker)
    manager.detach(session, client)
    clock.advance(60)
    assert expire_due(manager, clock) == [session]
    assert session.id not in manager.sessions
    container = docker.containers[session.container_id]
    assert container["state"] == "exited"
    assert session.container_id not in docker.removed
    # As the keeper writes it: the newest output, and the offset it starts at.
    assert parse_screen(container["files"][screen_path(session.id)]) == (
        b"$ ls\r\nnotes.txt\r\n$ ", session.replay.end)
    assert container["modes"][screen_path(session.id)][1:] == (1000, 1000)
    [kept] = manager.keeping.kept(None)
    assert (kept.id, kept.reason, kept.retention) == (session.id, GRACE, 7 * DAY)
    assert kept.kept_at == clock.seconds()
    assert session.state.value == "ended"


def test_the_screen_saved_is_the_last_of_the_output(docker, clock, tmp_path, monkeypatch):
    monkeypatch.setattr("capsule.sessions.keeping.SCREEN_MAX_BYTES", 10)
    manager = make_manager(docker, clock, str(tmp_path))
    session, _, _ = put_away(manager, docker, output=b"0123456789abcdef")
    saved = docker.containers[session.container_id]["files"][screen_path(session.id)]
    assert saved == b"\x1b_capsule-screen;start=6\x1b\\6789abcdef"
    assert parse_screen(saved) == (b"6789abcdef", 16)


def test_putting_away_tells_the_client_it_is_kept_until_when(manager, docker, clock):
    session, client, kept = put_away(manager, docker)
    assert isinstance(kept, KeptSession) and kept.reason == PUT_AWAY
    kind, code, message = client.events[-1]
    assert (kind, code) == ("ended", None)
    assert message == kept_message(PUT_AWAY, clock.seconds() + 7 * DAY)
    assert "kept until" in message and "resume it" in message
    # Nobody finds it live; a reconnect is not attached to anything.
    assert manager.find(session.id) is None


def test_a_shell_that_exits_on_its_own_is_removed_not_kept(manager, docker):
    session, client = running(manager, docker)
    docker.processes[-1].exit(0)
    assert session.container_id in docker.removed
    assert manager.keeping.kept(None) == []


def test_a_sessions_shell_is_told_how_long_its_files_are_kept(manager, docker, clock,
                                                                 tmp_path):
    session, _ = running(manager, docker)
    spec = docker.containers[session.container_id]["spec"]
    assert spec.environment["CAPSULE_KEPT_FOR"] == "7 days"
    spec = ContainerSpec(image="capsule-runtime:latest")
    profiles = {"shell": Profile(name="shell", spec=spec, retention=0.0)}
    other = make_manager(docker, clock, str(tmp_path / "other"), profiles=profiles)
    session, _ = running(other, docker)
    assert "CAPSULE_KEPT_FOR" not in docker.containers[session.container_id]["spec"].environment


def test_a_profile_with_retention_0_is_removed_as_before(docker, clock, tmp_path):
    spec = ContainerSpec(image="capsule-runtime:latest")
    profiles = {"shell": Profile(name="shell", spec=spec, retention=0.0)}
    manager = make_manager(docker, clock, str(tmp_path), profiles=profiles)
    session, client = running(manager, docker)
    with pytest.raises(NotKept, match="retention is 0"):
        result(manager.keeping.put_away(session))
    manager.detach(session, client)
    clock.advance(60)
    expire_due(manager, clock)
    assert session.container_id in docker.removed
    assert manager.keeping.kept(None) == []


def test_a_manager_without_a_keeping_config_keeps_nothing(docker, clock):
    spec = ContainerSpec(image="capsule-runtime:latest")
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", grace=60))
    assert manager.keeping is None
    session, client = running(manager, docker)
    manager.detach(session, client)
    clock.advance(60)
    expire_due(manager, clock)
    assert session.container_id in docker.removed


def test_a_starting_session_cannot_be_put_away(manager, docker):
    docker.hold_create = True
    session = manager.create(RecordingClient(), 80, 24)
    with pytest.raises(NotKept):
        result(manager.keeping.put_away(session))
    docker.release_create()
    assert session.id in manager.sessions


def test_a_session_whose_container_went_is_not_kept(manager, docker):
    session, client = running(manager, docker)
    del docker.containers[session.container_id]
    with pytest.raises(SessionNotFound):
        result(manager.keeping.put_away(session))
    assert manager.keeping.kept(None) == [] and session.over


def test_on_close_says_what_closing_the_last_tab_does(manager, docker, clock):
    session, _ = running(manager, docker)
    assert manager.keeping.on_close(session) == {
        "outcome": "kept", "after": 60, "until": clock.seconds() + 60 + 7 * DAY}


def test_the_oldest_kept_sessions_go_past_the_users_limits(docker, clock, tmp_path):
    manager = make_manager(docker, clock, str(tmp_path), max_kept=2)
    first, _, _ = put_away(manager, docker, user="alice")
    clock.advance(1)
    second, _, _ = put_away(manager, docker, user="alice")
    put_away(manager, docker, user="bob")
    clock.advance(1)
    session, _ = running(manager, docker, user="alice")
    assert manager.keeping.on_close(session)["removes_oldest"] == 1
    result(manager.keeping.put_away(session))
    assert [k.id for k in manager.keeping.kept("alice")] == [second.id, session.id]
    assert first.container_id in docker.removed
    assert len(manager.keeping.kept("bob")) == 1


def test_the_oldest_go_past_the_users_bytes(docker, clock, tmp_path):
    manager = make_manager(docker, clock, str(tmp_path), max_kept_bytes=100)
    first, _, kept = put_away(manager, docker, output=b"x" * 80)
    assert kept.size == len(encode_screen(b"x" * 80, 80))     # the screen saved
    clock.advance(1)
    second, _, _ = put_away(manager, docker, output=b"y" * 80)
    assert [k.id for k in manager.keeping.kept(None)] == [second.id]
    assert first.container_id in docker.removed


# -- found again after a restart -----------------------------------------------------------

def test_kept_sessions_outlive_a_restart_of_capsule(docker, clock, tmp_path):
    owners = OwnerFile(str(tmp_path), "t")
    first = make_manager(docker, clock, str(tmp_path), owners=owners)
    session, _, kept = put_away(first, docker, user="alice")
    # Another run of capsule, on the same engine and state directory.
    again = make_manager(docker, clock, str(tmp_path), owners=OwnerFile(str(tmp_path), "t"))
    result(Deferred.fromCoroutine(again.recovery.recover()))
    [found] = again.keeping.kept("alice")
    assert (found.id, found.user, found.reason, found.kept_at) == (
        session.id, "alice", PUT_AWAY, kept.kept_at)
    assert session.container_id not in docker.removed
    assert again.keeping.find(session.id, "bob") is None
    assert again.keeping.find(session.id, None) is None
    assert again.keeping.kept("bob") == []


def test_a_stopped_container_without_a_record_is_kept_as_stopped(docker, clock, tmp_path):
    owners = OwnerFile(str(tmp_path), "t")
    owners.session_opened(type("S", (), {"id": SID, "core": type("C", (), {"user": "carol"})})())
    docker.add_container("c1", {**LABELS, LABEL_SESSION: SID, LABEL_PROFILE: "shell"})
    docker.containers["c1"].update(state="exited", finished=clock.seconds() - 10)
    manager = make_manager(docker, clock, str(tmp_path), owners=OwnerFile(str(tmp_path), "t"))
    result(Deferred.fromCoroutine(manager.recovery.recover()))
    [kept] = manager.keeping.kept("carol")
    assert (kept.id, kept.reason, kept.kept_at) == (SID, STOPPED, clock.seconds() - 10)
    assert "c1" not in docker.removed
    # The owners' file forgot it (it has live sessions only); the records did not.
    again = make_manager(docker, clock, str(tmp_path), owners=OwnerFile(str(tmp_path), "t"))
    result(Deferred.fromCoroutine(again.recovery.recover()))
    assert [k.id for k in again.keeping.kept("carol")] == [SID]


def test_leftovers_are_still_removed_at_start(docker, clock, tmp_path):
    """
    A stopped warm container nobody took, and one whose id is not a
    session's, are leftovers; so is every stopped one where nothing is kept.
    """
    docker.add_container("warm", {**LABELS, LABEL_SESSION: SID, LABEL_WARM: "true"})
    docker.add_container("odd", {**LABELS, LABEL_SESSION: "not-an-id"})
    for name in ("warm", "odd"):
        docker.containers[name]["state"] = "exited"
    manager = make_manager(docker, clock, str(tmp_path))
    result(Deferred.fromCoroutine(manager.recovery.recover()))
    assert {"warm", "odd"} <= set(docker.removed)
    assert manager.keeping.kept(None) == []


def test_the_orphan_sweep_leaves_kept_sessions_alone(manager, docker, clock):
    session, _, _ = put_away(manager, docker)
    removed = result(Deferred.fromCoroutine(manager.recovery.remove_leftovers()))
    assert removed == 0 and session.container_id not in docker.removed


def test_a_warm_container_is_labelled(docker, clock, tmp_path):
    spec = ContainerSpec(image="capsule-runtime:latest")
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", pool_size=1))
    manager.pool.start()
    [container] = docker.containers.values()
    assert container["labels"][LABEL_WARM] == "true"


# -- its container stopped under it ------------------------------------------------------------

def test_a_container_stopped_under_its_session_is_kept(manager, docker, clock):
    session, client = running(manager, docker)
    docker.containers[session.container_id].update(state="exited", exit_code=143)
    docker.processes[-1].exit(None)
    [kept] = manager.keeping.kept(None)
    assert (kept.id, kept.reason) == (session.id, STOPPED)
    kind, _, message = client.events[-1]
    assert kind == "ended"
    assert message == kept_message(STOPPED, clock.seconds() + 7 * DAY,
                                   "the session's container stopped (exit code 143)")
    assert message.startswith("the session's container stopped (exit code 143): the session"
                              " is kept; its files are kept until ")
    assert "resume it" in message
    assert session.container_id not in docker.removed


def test_a_container_stopped_while_the_engine_was_away_is_kept(manager, docker, clock):
    session, client = running(manager, docker)
    docker.reachable = False
    docker.processes[-1].exit(None)
    assert session.state.value == "interrupted"
    docker.reachable = True
    docker.containers[session.container_id].update(state="exited", exit_code=255)
    clock.advance(5)
    [kept] = manager.keeping.kept(None)
    assert kept.reason == STOPPED
    assert client.events[-1][2].startswith(
        "the session's container stopped while the Docker engine was away (exit code 255):"
        " the session is kept; its files are kept until ")


# -- resume, delete ------------------------------------------------------------------------------

def test_resume_brings_back_the_same_session_with_a_new_shell(manager, docker, clock):
    session, _, kept = put_away(manager, docker, user="alice")
    clock.advance(3600)
    resumed = result(manager.keeping.resume(session.id, "alice"))
    assert resumed.id == session.id and resumed is not session
    assert docker.containers[kept.container_id]["state"] == "running"
    assert resumed.resumed_from == kept.kept_at
    assert resumed.state.value == "recovered" and resumed.core.user == "alice"
    assert manager.keeping.kept("alice") == []
    # Its client attaches: a keeper is started in the container again.
    client = RecordingClient()
    manager.reconnect(session.id, client, user="alice")
    process = docker.processes[-1]
    assert process.container_id == kept.container_id and process.argv[0] == "capsule-keeper"
    process.emit(b"$ ")
    assert client.output == b"$ "
    assert resumed.state.value == "running"


def test_resume_is_for_its_owner_only(manager, docker):
    session, _, _ = put_away(manager, docker, user="alice")
    with pytest.raises(SessionNotFound):
        result(manager.keeping.resume(session.id, "bob"))
    with pytest.raises(SessionNotFound):
        result(manager.keeping.delete(session.id, "bob"))
    assert manager.keeping.find(session.id, "alice") is not None


def test_resuming_a_removed_container_says_it_is_gone(manager, docker):
    session, _, kept = put_away(manager, docker)
    del docker.containers[kept.container_id]
    with pytest.raises(SessionNotFound, match="gone"):
        result(manager.keeping.resume(session.id, None))
    assert manager.keeping.kept(None) == []


def test_a_resumed_session_not_visited_is_put_away_again(manager, docker, clock):
    session, _, _ = put_away(manager, docker)
    result(manager.keeping.resume(session.id, None))
    clock.advance(60)
    expire_due(manager, clock)
    [kept] = manager.keeping.kept(None)
    assert kept.reason == GRACE


def test_delete_removes_a_kept_session(manager, docker, tmp_path):
    session, _, kept = put_away(manager, docker)
    result(manager.keeping.delete(session.id, None))
    assert kept.container_id in docker.removed
    assert manager.keeping.kept(None) == []
    assert session.id not in (tmp_path / "kept-t.json").read_text()


# -- retention -------------------------------------------------------------------------------------

def test_the_sweep_removes_kept_sessions_past_their_retention(manager, docker, clock):
    session, _, kept = put_away(manager, docker)
    cleanup = CleanupService(manager, clock, 1.0)
    clock.advance(7 * DAY - 1)
    cleanup._sweep()
    assert kept.container_id not in docker.removed
    clock.advance(1)
    cleanup._sweep()
    assert kept.container_id in docker.removed
    assert manager.keeping.kept(None) == []


def test_a_profiles_retention_wins(docker, clock, tmp_path):
    spec = ContainerSpec(image="capsule-runtime:latest")
    profiles = {"shell": Profile(name="shell", spec=spec, retention=3600.0)}
    manager = make_manager(docker, clock, str(tmp_path), profiles=profiles)
    _, _, kept = put_away(manager, docker)
    assert kept.retention == 3600.0
    result(manager.keeping.sweep(clock.seconds() + 3600))
    assert kept.container_id in docker.removed


# -- forks -------------------------------------------------------------------------------------------

def test_a_fork_has_the_same_files_and_is_independent(manager, docker):
    session, _ = running(manager, docker, user="alice")
    docker.add_file(session.container_id, "/workspace/notes.txt", b"draft 1")
    new_id = result(manager.keeping.fork(session.id, "alice"))
    fork = manager.sessions[new_id]
    assert new_id != session.id and fork.core.user == "alice"
    assert fork.state.value == "detached" and fork.profile == session.profile
    container = docker.containers[fork.container_id]
    assert container["files"]["/workspace/notes.txt"] == b"draft 1"
    # The engine copied the files (IDockerAPI.fork_container).
    assert ("fork", session.container_id, "host") in docker.keep_calls
    # Its copies of the volumes are its own, and say so.
    mounted = dict((target, name) for name, target in container["spec"].volumes)
    assert mounted and set(mounted) <= {"/workspace", "/home/developer"}
    assert own_volumes(container["labels"]) == mounted == fork.own_volumes
    docker.add_file(fork.container_id, "/workspace/notes.txt", b"draft 2")
    assert docker.containers[session.container_id]["files"]["/workspace/notes.txt"] == \
        b"draft 1"
    # Ended, it takes its volumes (labelled with it) with it at once.
    manager.end(fork, "done")
    assert not set(mounted.values()) & set(docker.volumes)


def test_a_kept_session_can_be_forked(manager, docker):
    session, _ = running(manager, docker)
    docker.add_file(session.container_id, "/workspace/a", b"A")
    result(manager.keeping.put_away(session))
    new_id = result(manager.keeping.fork(session.id, None))
    assert docker.containers[manager.sessions[new_id].container_id]["files"]["/workspace/a"] \
        == b"A"
    assert manager.keeping.find(session.id, None) is not None


def test_a_fork_of_another_users_session_is_not_found(manager, docker):
    session, _ = running(manager, docker, user="alice")
    with pytest.raises(SessionNotFound):
        result(manager.keeping.fork(session.id, "bob"))
    assert not any(c[0] == "snapshot" for c in docker.keep_calls)


def test_a_kept_fork_takes_its_volumes_when_swept(manager, docker, clock):
    session, _ = running(manager, docker)
    fork = manager.sessions[result(manager.keeping.fork(session.id, None))]
    volumes = set(fork.own_volumes.values())
    assert volumes and volumes <= set(docker.volumes)
    result(manager.keeping.put_away(fork))
    for name in volumes:  # (the fake engine's volumes age by the wall clock)
        docker.volumes[name]["created"] -= 7 * DAY
    result(manager.keeping.sweep(clock.seconds() + 7 * DAY))
    assert fork.container_id in docker.removed
    assert not volumes & set(docker.volumes)


# -- named snapshots ------------------------------------------------------------------------------------

def test_snapshots_are_named_listed_started_and_deleted(manager, docker):
    session, _ = running(manager, docker, user="alice")
    docker.add_file(session.container_id, "/workspace/a", b"A")
    snapshot = result(manager.keeping.snapshot(session.id, "alice", "before-refactor"))
    assert snapshot.name == "before-refactor"
    assert snapshot.image.startswith(SNAPSHOT_REPOSITORY + ":t-")
    assert "alice" not in snapshot.image
    assert [s.name for s in result(manager.keeping.snapshots("alice"))] == ["before-refactor"]
    assert result(manager.keeping.snapshots("bob")) == []
    new_id = result(manager.keeping.start_snapshot("before-refactor", "alice"))
    new = manager.sessions[new_id]
    assert docker.containers[new.container_id]["files"]["/workspace/a"] == b"A"
    assert new.core.user == "alice"
    # The snapshot is as it was, and no holder container is left.
    assert snapshot.image in docker.snapshots
    assert {c["labels"][LABEL_SESSION] for c in docker.containers.values()} == {
        session.id, new_id}
    with pytest.raises(SnapshotNotFound):
        result(manager.keeping.delete_snapshot("before-refactor", "bob"))
    result(manager.keeping.delete_snapshot("before-refactor", "alice"))
    assert result(manager.keeping.snapshots("alice")) == []


def test_copies_too_new_for_the_engine_go_at_the_sweep_after_its_grace(manager, docker,
                                                                          clock):
    """
    A session from a named snapshot mounts copies of its volumes: when it
    is removed, the engine's prune leaves copies younger than its grace (one
    another fork may be about to mount); the sweep prunes again later.
    """
    session, _ = running(manager, docker, user="alice")
    result(manager.keeping.snapshot(session.id, "alice", "base"))
    new = manager.sessions[result(manager.keeping.start_snapshot("base", "alice"))]
    copies = set(new.own_volumes.values())
    assert copies and copies <= set(docker.volumes)
    manager.end(new, "done")
    assert copies <= set(docker.volumes)
    for name in copies:  # (the fake engine's volumes age by the wall clock)
        docker.volumes[name]["created"] -= 601
    result(manager.keeping.sweep())
    assert copies <= set(docker.volumes)        # not yet: not due
    clock.advance(PRUNE_AGAIN)
    result(manager.keeping.sweep())
    assert not copies & set(docker.volumes)


def test_snapshot_names_and_limits_are_checked(docker, clock, tmp_path):
    manager = make_manager(docker, clock, str(tmp_path), max_snapshots=1)
    session, _ = running(manager, docker)
    with pytest.raises(ValueError):
        result(manager.keeping.snapshot(session.id, None, "../../etc"))
    result(manager.keeping.snapshot(session.id, None, "one"))
    with pytest.raises(SnapshotExists):
        result(manager.keeping.snapshot(session.id, None, "one"))
    with pytest.raises(KeptLimit) as raised:
        result(manager.keeping.snapshot(session.id, None, "two"))
    assert raised.value.code == "kept_limit"
    with pytest.raises(SnapshotNotFound):
        result(manager.keeping.start_snapshot("nope", None))


# -- profiles and options -----------------------------------------------------------------------------

def test_a_profiles_retention_is_seconds_or_a_duration(tmp_path):
    path = tmp_path / "profiles.toml"
    spec = ContainerSpec(image="capsule-runtime:latest")
    builtins = {"shell": Profile(name="shell", spec=spec)}
    path.write_text('[profiles.a]\nretention = "2d"\n[profiles.b]\nretention = 0\n'
                    '[profiles.c]\nretention = 90\n')
    profiles = load_profiles(str(path), builtins)
    assert [profiles[n].retention for n in "abc"] == [2 * DAY, 0.0, 90.0]
    assert builtins["shell"].retention is None
    path.write_text('[profiles.a]\nretention = "forever"\n')
    with pytest.raises(ProfileError, match="retention"):
        load_profiles(str(path), builtins)


def test_the_retention_option(tmp_path):
    from capsule.tap import Options
    options = Options()
    options.parseOptions(["--retention", "12h", "--max-kept-per-user", "3",
                          "--max-kept-bytes-per-user", "1g", "--state-dir", str(tmp_path)])
    config = options["config"] if "config" in options else None
    retention = config.retention if config is not None else options["retention"]
    assert retention == 12 * 3600
    assert options["max-kept-per-user"] == 3
    assert options["max-kept-bytes-per-user"] == 1024 ** 3


# -- warm sessions ----------------------------------------------------------------------------------

def warm_manager(docker, clock, tmp_path):
    spec = ContainerSpec(image="capsule-runtime:latest")
    config = SessionConfig(spec=spec, instance="t", grace=60, pool_size=1)
    return SessionManager(docker, clock, config,
                          keeping=KeepingConfig(retention=DAY, state_dir=str(tmp_path)))


def test_a_warm_session_taken_then_stopped_by_a_reboot_is_kept(docker, clock, tmp_path):
    manager = warm_manager(docker, clock, tmp_path)
    manager.pool.start()
    session = manager.create(RecordingClient(), 80, 24)
    assert session.warm
    # The host restarts: capsule and the container stop together.
    docker.containers[session.container_id].update(state="exited", finished=clock.seconds())
    again = warm_manager(docker, clock, tmp_path)
    result(Deferred.fromCoroutine(again.recovery.recover()))
    assert [k.id for k in again.keeping.kept(None)] == [session.id]


def test_a_warm_session_nobody_took_is_never_kept(docker, clock, tmp_path):
    manager = warm_manager(docker, clock, tmp_path)
    manager.pool.start()
    [warm] = docker.containers
    # capsule is killed; its warm container runs on, and is found as a session.
    again = warm_manager(docker, clock, tmp_path)
    result(Deferred.fromCoroutine(again.recovery.recover()))
    [found] = again.sessions.values()
    assert found.container_id == warm and found.untaken
    clock.advance(60)
    expire_due(again, clock)
    assert warm in docker.removed
    assert again.keeping.kept(None) == []


# -- admission ---------------------------------------------------------------------------------------

def test_admission_never_counts_a_kept_session(manager, docker, clock):
    """
    A kept session holds no memory and no live session's place: a user at
    their limit who puts a session away may open another.
    """
    from capsule.core.admission import AdmissionControl, AdmissionPolicy, AdmissionRefused
    from capsule.core.memory import MemoryBudget
    memory = MemoryBudget(256 * 1024 ** 2, budget=1024 ** 3)
    admission = AdmissionControl(manager, clock, AdmissionPolicy(
        max_sessions=1, max_per_user=1, rate=None), memory=memory)
    session, _ = running(manager, docker, user="alice")
    with pytest.raises(AdmissionRefused):
        admission.admit("127.0.0.1", "alice")
    before = admission.committed_memory()
    result(manager.keeping.put_away(session))
    assert admission.committed_memory() < before
    admission.admit("127.0.0.1", "alice")
    assert manager.keeping.disk_bytes("alice") > 0


def test_a_session_being_put_away_is_listed_and_waited_for(manager, docker, monkeypatch):
    """
    Between the keep and the stop's end, the session is found as kept
    (not missing); a resume or a delete asked meanwhile waits for the put
    away, then does its work.
    """
    stopping = []
    monkeypatch.setattr(docker, "stop_container",
                        lambda container_id, timeout=10: stopping.append(Deferred())
                        or stopping[-1])
    session, _ = running(manager, docker)
    away = manager.keeping.put_away(session)
    [pending] = manager.keeping.kept(None)
    assert pending.id == session.id and manager.keeping.find(session.id, None) is pending
    assert manager.keeping.holds(session.id)
    resumed = manager.keeping.resume(session.id, None)
    assert not resumed.called and not away.called
    stopping[0].callback(True)
    assert result(away).id == session.id
    assert result(resumed).id == session.id and session.id in manager.sessions


def test_a_delete_while_being_put_away_waits(manager, docker, monkeypatch):
    stopping = []
    monkeypatch.setattr(docker, "stop_container",
                        lambda container_id, timeout=10: stopping.append(Deferred())
                        or stopping[-1])
    session, _ = running(manager, docker)
    manager.keeping.put_away(session)
    deleted = manager.keeping.delete(session.id, None)
    assert not deleted.called
    stopping[0].callback(True)
    result(deleted)
    assert session.container_id in docker.removed and manager.keeping.kept(None) == []


def test_no_records_file_is_made_for_nothing(docker, clock, tmp_path):
    manager = make_manager(docker, clock, str(tmp_path))
    result(Deferred.fromCoroutine(manager.recovery.recover()))
    assert not (tmp_path / "kept-t.json").exists()
    put_away(manager, docker)
    assert (tmp_path / "kept-t.json").exists()


def test_snapshot_refusals_are_logged_at_a_bounded_rate(docker, clock, tmp_path):
    from twisted.logger import globalLogPublisher
    lines = []
    globalLogPublisher.addObserver(lines.append)
    try:
        manager = make_manager(docker, clock, str(tmp_path), max_snapshots=0)
        session, _ = running(manager, docker)
        for _ in range(5):
            with pytest.raises(KeptLimit):
                result(manager.keeping.snapshot(session.id, None, "s"))
    finally:
        globalLogPublisher.removeObserver(lines.append)
    refused = [e for e in lines if "snapshot refused" in e.get("log_format", "")]
    assert len(refused) == 1


class RecordingEngine(FakeDockerAPI):
    """
    An engine that keeps capsule's record with a kept session (as the
    Kubernetes engine does on its claim): C{note_kept}, and C{record} in
    what C{kept_containers} lists.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, dict] = {}

    def note_kept(self, container_id, record):
        self.records[container_id] = dict(record)
        return Deferred.fromCoroutine(_nothing())

    def kept_containers(self, labels):
        d = super().kept_containers(labels)
        d.addCallback(lambda found: [{**c, "record": self.records.get(c["id"], {})}
                                     for c in found])
        return d


async def _nothing():
    return None


def test_a_kept_session_is_found_from_the_engines_record_alone(clock, tmp_path):
    """
    Another server on the same engine, with no state file of its own (a
    replica): whose the session is, why and when it was kept come from the
    engine.
    """
    docker = RecordingEngine()
    first = make_manager(docker, clock, str(tmp_path / "first"))
    session, _, kept = put_away(first, docker, user="alice")
    assert docker.records[session.container_id] == {
        "user": "alice", "reason": PUT_AWAY, "kept_at": kept.kept_at}
    other = make_manager(docker, clock, None)
    result(Deferred.fromCoroutine(other.recovery.recover()))
    [found] = other.keeping.kept("alice")
    assert (found.id, found.user, found.reason, found.kept_at) == (
        session.id, "alice", PUT_AWAY, kept.kept_at)
    assert session.container_id not in docker.removed


def test_an_engine_record_that_is_not_whole_is_not_used(clock, tmp_path):
    docker = RecordingEngine()
    docker.add_container("c1", {**LABELS, LABEL_SESSION: SID, LABEL_PROFILE: "shell"})
    docker.containers["c1"].update(state="exited", finished=clock.seconds() - 10)
    docker.records["c1"] = {"user": "mallory"}
    manager = make_manager(docker, clock, str(tmp_path))
    result(Deferred.fromCoroutine(manager.recovery.recover()))
    [kept] = manager.keeping.kept(None)
    assert (kept.id, kept.reason) == (SID, STOPPED)
