"""
The warm pool (L{capsule.sessions.pool}): sessions started ahead of need, against the
in-memory Docker engine and a Clock.
"""

import re

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from capsule.sessions.cleanup import expire_due
from capsule.core.spec import ContainerSpec
from capsule.core.keeper import keeper_argv
from capsule.core.profiles import Profile
from capsule.core.session_core import State
from capsule.sessions.manager import SessionManager
from capsule.sessions.pool import WarmPool
from capsule.sessions.observers import SessionObserver
from capsule.sessions.session import WARM_SIZE, SessionConfig
from tests.support.fakes import FakeDockerAPI, RecordingClient

SPEC = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64)


class CountingDocker:
    """
    The fake engine, counting every call made through it.
    """

    def __init__(self, docker: FakeDockerAPI) -> None:
        self._docker = docker
        self.calls: list[str] = []

    def __getattr__(self, name):
        attribute = getattr(self._docker, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            self.calls.append(name)
            return attribute(*args, **kwargs)
        return call


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def docker():
    return FakeDockerAPI()


def make_manager(docker, clock, size=2, max_age=100.0, observers=(), **config):
    manager = SessionManager(docker, clock, SessionConfig(
        spec=SPEC, instance="t", pool_size=size, pool_max_age=max_age, grace=60, **config),
        observers=observers)
    manager.pool.start()
    return manager


def fill(manager, clock, banner=b"banner\r\n$ "):
    """
    Let the pool fill, each warm shell printing C{banner} as it starts.
    """
    pool = manager.pool["shell"]
    for _ in range(pool.size * 2):
        clock.advance(pool.refill_delay)
        for session in pool.ready:
            if session.replay.end == 0 and banner:
                session.shell.process._stream.emit(banner)
    return pool


def test_the_pool_fills_one_at_a_time_with_running_shells(docker, clock):
    docker.hold_create = True
    manager = make_manager(docker, clock)
    pool = manager.pool["shell"]
    # One at a time: the next is made once the last one's shell runs.
    assert pool.making is not None and len(docker.containers) == 1
    clock.advance(10)
    assert len(docker.containers) == 1
    docker.hold_create = False
    docker.release_create()
    assert len(pool.ready) == 1 and pool.making is None
    clock.advance(0)
    assert len(pool.ready) == 2
    for session in pool.ready:
        assert session.status() == "detached" and session.client is None
        container = docker.containers[session.container_id]
        assert re.fullmatch(r"capsule-[0-9a-f]{32}", container["name"])
        assert session.id[:8] not in container["name"]
        assert container["labels"]["io.capsule.session"] == session.id
        assert container["spec"].memory == "1g" and container["spec"].pids == 64
        assert session.id not in manager.sessions
    assert [p.argv for p in docker.processes] == [tuple(keeper_argv(("bash", "-l"), 0,
                                                                    1024 * 1024))] * 2
    assert all(p.resizes == [WARM_SIZE] for p in docker.processes)


def test_taking_a_warm_session_makes_no_docker_call(docker, clock):
    counting = CountingDocker(docker)
    manager = make_manager(counting, clock, size=1)
    pool = fill(manager, clock)
    warm = pool.ready[0]
    process = docker.processes[0]
    counting.calls.clear()
    client = RecordingClient()
    session = manager.create(client, 120, 40)
    assert counting.calls == []
    assert session is warm and session.warm and session.status() == "running"
    assert manager.sessions[session.id] is session
    assert client.events == [("started", session.id, False), ("output", b"banner\r\n$ ")]
    # The client's size reaches the shell's terminal (SIGWINCH: the prompt is redrawn).
    assert process.resizes == [WARM_SIZE, (120, 40)]
    manager.write(session, b"ls\r")
    process.emit(b"ls\r\n")
    assert process.written == [b"ls\r"]
    assert client.output == b"banner\r\n$ ls\r\n"
    # The refill comes after a delay, once nobody has typed for a while,
    # and is the only work then.
    assert counting.calls == []
    clock.advance(pool.refill_delay)
    assert counting.calls == []
    clock.advance(pool.quiet - pool.refill_delay)
    assert counting.calls == ["create_session_container", "spawn_exec"]
    assert len(pool.ready) == 1 and pool.ready[0] is not session


def test_a_refill_waits_for_a_pause_in_typing_but_not_for_ever(docker, clock):
    counting = CountingDocker(docker)
    manager = make_manager(counting, clock, size=1)
    pool = fill(manager, clock)
    session = manager.create(RecordingClient(), 80, 24)
    taken = clock.seconds()
    counting.calls.clear()
    # Someone types every 0.3 s: no refill while they do...
    for _ in range(int(pool.max_wait / 0.3) - 1):
        manager.write(session, b"x")
        clock.advance(0.3)
        assert counting.calls == []
    # ...until the refill has waited max_wait seconds.
    while not counting.calls:
        manager.write(session, b"x")
        clock.advance(0.3)
    assert counting.calls == ["create_session_container", "spawn_exec"]
    due = taken + pool.refill_delay + pool.max_wait
    assert due <= clock.seconds() < due + 0.3
    # The next refill waits afresh for a pause.
    fill(manager, clock)
    other = manager.create(RecordingClient(), 80, 24)
    counting.calls.clear()
    manager.write(other, b"y")
    clock.advance(pool.refill_delay)
    assert counting.calls == []
    clock.advance(pool.quiet)
    assert counting.calls == ["create_session_container", "spawn_exec"]


def test_a_warm_session_is_nobodys_never_expires_and_counts_in_no_limit(docker, clock):
    manager = make_manager(docker, clock, size=1, max_age=10000)
    fill(manager, clock)
    warm = manager.pool["shell"].ready[0]
    mine = manager.create(None, 80, 24, user="ann")
    assert mine is warm, "a session without a client takes a warm one too"
    clock.advance(0.5)
    other = manager.pool["shell"].ready[0]
    assert manager.of_user("ann") == [mine] and manager.of_user(None) == []
    assert manager.find(other.id) is None and manager.find(other.id, "ann") is None
    assert manager.fair_share.shares_of("ann") == SPEC.cpu_shares
    clock.advance(5000)
    assert expire_due(manager, clock) == [mine], "the one taken, kept from its take"
    assert other.status() == "detached" and manager.pool["shell"].ready[0] is other


def test_a_session_made_without_a_client_from_the_pool_is_kept_from_the_take(docker, clock):
    manager = make_manager(docker, clock, size=1)
    fill(manager, clock)
    clock.advance(30)
    session = manager.create(None, 100, 30)
    assert session.status() == "detached" and session.core.left_at == clock.seconds()
    client = RecordingClient()
    manager.reconnect(session.id, client, 0)
    assert client.events == [("started", session.id, True), ("output", b"banner\r\n$ ")]


def test_a_warm_shell_that_died_is_replaced_and_never_handed_out(docker, clock):
    manager = make_manager(docker, clock, size=1)
    pool = fill(manager, clock)
    dead = pool.ready[0]
    dead.shell.process._stream.exit(137)
    assert dead.status() in ("ending", "ended") and dead not in pool.ready
    assert dead.container_id not in docker.containers
    assert dead.id not in manager.sessions
    clock.advance(0)
    assert len(pool.ready) == 1 and pool.ready[0] is not dead
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    assert session is not dead and session.warm
    assert client.kinds() == ["started"]


def test_a_warm_session_whose_relay_closed_is_not_handed_out(docker, clock):
    manager = make_manager(docker, clock, size=1)
    pool = fill(manager, clock)
    broken = pool.ready[0]
    # The relay closes without the shell's status; the container still
    # runs, and the session is being ended (its cause found) when a client comes.
    docker.hold_exec = True
    broken.core.stream = None
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    assert session is not broken and not session.warm
    assert broken.status() in ("ending", "ended")
    assert broken.container_id not in docker.containers
    docker.hold_exec = False
    docker.release_exec()
    assert client.kinds() == ["started"]


def test_warm_sessions_older_than_the_max_age_are_replaced(docker, clock):
    manager = make_manager(docker, clock, size=1, max_age=100)
    pool = fill(manager, clock)
    old = pool.ready[0]
    clock.advance(old.core.created_at + 99.5 - clock.seconds())
    assert old in pool.ready
    clock.advance(0.5)
    assert old not in pool.ready and old.container_id not in docker.containers
    clock.advance(0)
    assert len(pool.ready) == 1 and pool.ready[0] is not old


def test_the_max_age_is_checked_at_take_time_too(docker, clock):
    manager = make_manager(docker, clock, size=1, max_age=100)
    pool = fill(manager, clock)
    old = pool.ready[0]
    pool._forget_age(old)
    clock.advance(101)
    assert pool.fit(old) == "it is older than 100 s"
    session = manager.create(RecordingClient(), 80, 24)
    assert session is not old and not session.warm
    assert old.container_id not in docker.containers


def test_refill_failures_retry_later_without_a_tight_loop(docker, clock):
    docker.reachable = False
    manager = make_manager(docker, clock, size=2)
    pool = manager.pool["shell"]
    assert len(pool.ready) == 0 and pool.making is None
    assert pool._next is not None and pool._next.getTime() == pytest.approx(5.0)
    clock.advance(4.9)
    assert docker.containers == {}
    docker.reachable = True
    clock.advance(5)
    clock.advance(0)
    assert len(pool.ready) == 2


def test_a_miss_starts_cold_and_is_counted(docker, clock):
    docker.reachable = False
    missed = []

    class Misses(SessionObserver):
        def pool_taken(self, pool, found):
            missed.append(found)

    manager = make_manager(docker, clock, size=1, observers=[Misses()])
    docker.reachable = True
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    assert not session.warm and missed == [None]
    assert client.kinds() == ["started"]


def test_stopping_removes_the_warm_sessions_and_stops_refilling(docker, clock):
    manager = make_manager(docker, clock, size=2)
    pool = fill(manager, clock)
    warm = list(pool.ready)
    taken = manager.create(RecordingClient(), 80, 24)
    manager.shutdown()
    assert all(w.container_id not in docker.containers for w in warm if w is not taken)
    assert taken.container_id in docker.containers, "a session taken lives on"
    assert pool.ready == type(pool.ready)() and pool.making is None
    clock.advance(60)
    assert pool.making is None and len(pool.ready) == 0


def test_a_warm_session_of_an_earlier_run_is_kept_as_a_session_and_expires(docker, clock):
    manager = make_manager(docker, clock, size=1)
    pool = fill(manager, clock)
    warm = pool.ready[0]
    # capsule was killed: nothing stopped the pool.
    again = SessionManager(docker, clock, SessionConfig(spec=SPEC, instance="t", grace=60,
                                                        pool_size=0))
    from twisted.internet.defer import Deferred
    Deferred.fromCoroutine(again.recovery.recover())
    recovered = again.sessions[warm.id]
    assert recovered.status() == "recovered" and recovered.core.user is None
    clock.advance(60)
    assert expire_due(again, clock) == [recovered]
    assert warm.container_id not in docker.containers


def test_cpu_shares_are_shared_on_take(docker, clock):
    manager = make_manager(docker, clock, size=1)
    fill(manager, clock)
    first = manager.create(RecordingClient(), 80, 24, user="ann")
    clock.advance(1)
    second = manager.create(RecordingClient(), 80, 24, user="ann")
    assert first.warm and second.warm
    half = SPEC.cpu_shares // 2
    assert docker.containers[first.container_id]["cpu_shares"] == half
    assert docker.containers[second.container_id]["cpu_shares"] == half


def test_each_profile_has_a_pool_of_its_own(docker, clock):
    other = Profile(name="tools", spec=SPEC, command=("sh",), pool=1)
    shell = Profile(name="shell", spec=SPEC, pool=0)
    manager = SessionManager(docker, clock, SessionConfig(
        spec=SPEC, instance="t", profiles={"shell": shell, "tools": other}))
    manager.pool.start()
    assert set(manager.pool.pools) == {"tools"}
    clock.advance(1)
    warm = manager.pool["tools"].ready[0]
    assert docker.processes[0].argv[-1:] == ("sh",)
    assert manager.create(RecordingClient(), 80, 24).warm is False
    session = manager.create(RecordingClient(), 80, 24, profile="tools")
    assert session is warm and session.profile == "tools"
    assert manager.pool.size == 1


def test_a_profile_with_a_users_volume_gets_no_pool(docker, clock):
    agent = Profile(name="agent", spec=SPEC, pool=2, agent_volume="/home/developer/.agent")
    manager = SessionManager(docker, clock, SessionConfig(
        spec=SPEC, instance="t", profiles={"shell": Profile(name="shell", spec=SPEC, pool=1),
                                           "agent": agent}))
    manager.pool.start()
    assert set(manager.pool.pools) == {"shell"} and manager.pool.size == 1
    assert len(docker.containers) == 1


def test_a_warm_session_being_made_when_capsule_stops_leaves_no_container(docker, clock):
    docker.hold_create = True
    manager = make_manager(docker, clock, size=1)
    making = manager.pool["shell"].making
    assert making is not None and len(docker.containers) == 1
    manager.shutdown()
    assert making.status() == "ended"
    docker.release_create()
    assert docker.containers == {} and docker.processes == []


def test_a_stopping_capsule_waits_for_a_warm_container_still_being_created(docker, clock):
    """
    The stop is not over (twistd would exit, and the Docker threads stop)
    until the container that was being created is created and removed.
    """
    docker.hold_create = True
    manager = make_manager(docker, clock, size=1)
    stopped = manager.shutdown()
    assert not stopped.called and len(docker.containers) == 1
    docker.release_create()
    assert docker.containers == {}
    assert stopped.called


def test_capsule_stops_its_services_one_after_the_other():
    """
    The Docker pools (started first) stop only once the sessions' stop is
    over, not at the same time.
    """
    from types import SimpleNamespace

    from twisted.application.service import Service
    from twisted.internet.defer import Deferred

    from capsule.services import CapsuleService

    said, waiting = [], Deferred()

    class Child(Service):
        def __init__(self, name, wait=None):
            self.name, self.wait = name, wait

        def stopService(self):
            super().stopService()
            said.append(self.name)
            return self.wait
    service = CapsuleService(None, SimpleNamespace(manager=None), None)
    for child in (Child("docker"), Child("sessions", waiting), Child("listeners")):
        child.setServiceParent(service)
    service.startService()
    stopped = service.stopService()
    assert said == ["listeners", "sessions"] and not stopped.called
    waiting.callback(None)
    assert said == ["listeners", "sessions", "docker"] and stopped.called


def test_a_session_ended_while_its_container_is_made_leaves_no_container(docker, clock):
    docker.hold_create = True
    manager = make_manager(docker, clock, size=0)
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    manager.end(session, "ended by an administrator")
    assert session.status() == "ended"
    docker.release_create()
    assert docker.containers == {} and docker.processes == []
    assert client.kinds() == ["failed"]


# -- users first, and the pool following demand ----------------------------------------


def settle(clock, seconds=10.0, step=0.25):
    for _ in range(int(seconds / step)):
        clock.advance(step)


def test_a_refill_waits_while_clients_sessions_are_being_made(docker, clock):
    manager = make_manager(docker, clock, size=1)
    pool = fill(manager, clock)
    docker.hold_create = True
    # A burst: the warm session goes to the first, the others start cold.
    first = manager.create(RecordingClient(), 80, 24)
    cold = [manager.create(RecordingClient(), 80, 24) for _ in range(3)]
    assert first.status() == "running" and all(s.starting for s in cold)
    held = len(docker._held)
    # The refill is due, but the clients' containers are still being made:
    # no warm container competes with them.
    settle(clock, pool.refill_delay + 5)
    assert len(docker._held) == held == 3 and pool.making is None
    # Once they run, the pool refills.
    docker.hold_create = False
    docker.release_create()
    assert not any(s.starting for s in cold)
    settle(clock, 1)
    assert len(pool.ready) == 1


def test_a_refill_waits_for_clients_sessions_but_not_for_ever(docker, clock):
    manager = make_manager(docker, clock, size=1)
    pool = fill(manager, clock)
    docker.hold_create = True
    manager.create(RecordingClient(), 80, 24)
    stuck = manager.create(RecordingClient(), 80, 24)
    assert stuck.starting and len(docker._held) == 1
    settle(clock, pool.refill_delay + pool.max_wait + 1, step=0.5)
    # Its container still hangs: after max_wait, the refill is made anyway.
    assert len(docker._held) == 2


def grown_manager(docker, clock, room=None, **config):
    manager = SessionManager(docker, clock, SessionConfig(
        spec=SPEC, instance="t", pool_size=2, pool_max_age=1000.0, grace=60,
        pool_grow_by=3, pool_window=30.0, **config), pool_room=room)
    manager.pool.start()
    settle(clock, 5)
    return manager, manager.pool["shell"]


def test_the_pool_grows_while_takes_come_fast_up_to_its_cap():
    clock, docker = MemoryReactorClock(), FakeDockerAPI()
    manager, pool = grown_manager(docker, clock)
    assert len(pool.ready) == 2 and pool.target == 2
    # Two takes within the window: what the pool holds anyway.
    for _ in range(2):
        manager.create(RecordingClient(), 80, 24)
    settle(clock, 5)
    assert pool.target == 2 and len(pool.ready) == 2
    # Each take beyond its size wants one more warm session.
    manager.create(RecordingClient(), 80, 24)
    assert pool.target == 3
    settle(clock, 5)
    assert len(pool.ready) == 3
    # Many more: never beyond size + grow_by.
    for _ in range(10):
        manager.create(RecordingClient(), 80, 24)
        clock.advance(0.5)
    assert pool.target == 5
    settle(clock, 10)
    assert len(pool.ready) == 5 and len(pool.held) == 5


def test_the_pool_shrinks_back_to_its_size_once_takes_stop():
    clock, docker = MemoryReactorClock(), FakeDockerAPI()
    manager, pool = grown_manager(docker, clock)
    for _ in range(6):
        manager.create(RecordingClient(), 80, 24)
        clock.advance(0.5)
    settle(clock, 10)
    assert len(pool.ready) == 5
    users = set(manager.sessions)
    # No more takes: a window after the last, the pool is back at its size,
    # the oldest warm sessions ended and their containers removed.
    settle(clock, 30)
    assert pool.target == 2 and len(pool.ready) == 2 and pool.making is None
    assert set(manager.sessions) == users
    warm = {s.container_id for s in pool.ready}
    mine = {s.container_id for s in manager.sessions.values()}
    assert set(docker.containers) == warm | mine
    # And it stays there.
    settle(clock, 60, step=1)
    assert len(pool.ready) == 2 and set(docker.containers) == warm | mine


def test_the_pool_grows_only_while_the_server_has_room():
    clock, docker = MemoryReactorClock(), FakeDockerAPI()
    room = [False]
    manager, pool = grown_manager(docker, clock, room=lambda: room[0])
    for _ in range(6):
        manager.create(RecordingClient(), 80, 24)
        clock.advance(0.5)
    settle(clock, 10)
    # It wants more, but only refills to its size.
    assert pool.target == 5 and len(pool.ready) == 2
    room[0] = True
    manager.create(RecordingClient(), 80, 24)
    settle(clock, 10)
    assert len(pool.ready) == 5


def test_a_pool_that_does_not_grow_keeps_its_size_however_fast_the_takes(docker, clock):
    manager = make_manager(docker, clock, size=2)
    pool = fill(manager, clock)
    for _ in range(10):
        manager.create(RecordingClient(), 80, 24)
        clock.advance(0.2)
    settle(clock, 10)
    assert pool.target == 2 and len(pool.ready) == 2


def test_a_pool_grows_only_while_the_budget_keeps_room_for_a_user():
    from capsule.core.memory import MemoryBudget
    from capsule.services import warm_room
    clock, docker = MemoryReactorClock(), FakeDockerAPI()
    request = 64 * 1024 ** 2
    memory = MemoryBudget(request)
    manager, pool = grown_manager(docker, clock, room=lambda: warm_room(memory, manager))
    # Without a budget, only the cap bounds it.
    assert warm_room(memory, manager)
    # 2 warm sessions at their 64 MiB requests; a budget of five requests
    # leaves room for one more warm and one user's; three do not.
    memory.budget = 5 * request
    assert memory.warm(manager.pool.held) == 2 * request
    assert warm_room(memory, manager)
    memory.budget = 3 * request
    assert not warm_room(memory, manager)
    for _ in range(6):
        manager.create(RecordingClient(), 80, 24)
        clock.advance(0.5)
    settle(clock, 10)
    assert pool.target == 5 and len(pool.ready) == 2


class _SlowEnds:
    """
    Warm sessions for a L{WarmPool} alone, whose ending takes C{cost}
    seconds of the clock (as a real engine's work does while it runs).
    """

    def __init__(self, clock, cost: float) -> None:
        self.clock, self.cost = clock, cost
        self.pool = None
        self.ended = []

    def make(self):
        maker = self

        class Events:
            def prepare(self):
                pass

            def end(self, code, message):
                maker.ended.append(session)
                maker.clock.advance(maker.cost)
                maker.pool.lost(session)

        class Core:
            created_at = self.clock.seconds()
            stream = object()

        class Warm:
            id = f"warm-{len(self.ended)}-{self.clock.seconds()}"
            container_id = id
            state = State.DETACHED
            attached = False
            shell = object()
            core = Core()
            events = Events()

        session = Warm()
        return session


def test_the_pool_shrinks_to_its_size_even_when_ending_sessions_takes_time():
    clock = MemoryReactorClock()
    slow = _SlowEnds(clock, cost=0.4)
    pool = slow.pool = WarmPool(clock, 2, slow.make, max_age=1000.0, grow_by=6, window=30.0)
    pool.start()

    def fill_up():
        for _ in range(40):
            clock.advance(0.5)
            if pool.making is not None:
                pool.went_live(pool.making)

    fill_up()
    assert len(pool.ready) == 2
    # Four takes, then four more at once.
    for gap in (0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0):
        pool.take()
        clock.advance(gap)
    fill_up()
    assert len(pool.ready) == 8
    # The takes leave the window one by one while the extra sessions are
    # being ended: the pool must still come back to its size.
    for _ in range(100):
        clock.advance(0.1)
    assert pool.target == 2 and len(pool.ready) == 2
