"""
Idle means idle (capsule.sessions.idle): a session is idle only when, for its
profile's idle_timeout, it had no input, no output and no CPU use; then it is
put away where its retention is more than 0, else it ends.
"""

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from capsule.core.kept import IDLE
from capsule.core.profiles import builtin_profiles, load_profiles
from capsule.core.spec import ContainerSpec
from capsule.sessions.idle import (
    IS_IDLE, NOTHING, SAMPLE, IdlePolicy, IdleService, duration, idle_message)
from capsule.sessions.keeping import KeepingConfig
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig, shell_profile
from tests.support.fakes import FakeDockerAPI, RecordingClient

SPEC = ContainerSpec(image="capsule-runtime:latest")
DAY = 86400.0


class CpuDocker(FakeDockerAPI):
    """
    The fake engine (whose containers' CPU counters a test sets), counting
    the readings.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cpu_reads: list[str] = []

    def container_cpu(self, container_id):
        self.cpu_reads.append(container_id)
        return super().container_cpu(container_id)

    def add_cpu(self, container_id: str, seconds: float) -> None:
        self.set_cpu(container_id, (self.cpu.get(container_id) or 0.0) + seconds)


class NoticeClient(RecordingClient):
    def session_notice(self, code, message):
        self.events.append(("notice", code, message))


class FakeKeeping:
    """
    What the idle service asks of the manager's keeping: each profile's
    retention, and putting a session away.
    """

    def __init__(self, retention: float, fails: bool = False) -> None:
        self.retention = retention
        self.put: list[tuple] = []
        self.fails = fails

    def retention_of(self, settings):
        return self.retention

    def put_away(self, session, reason):
        self.put.append((session, reason))
        if self.fails:
            return fail(RuntimeError("the engine said no"))
        return succeed(None)


@pytest.fixture
def docker():
    return CpuDocker()


@pytest.fixture
def clock():
    return Clock()


def make(docker, clock, idle_timeout=60.0, keeping=None, profiles=None, **policy):
    manager = SessionManager(docker, clock, SessionConfig(
        spec=SPEC, instance="t", idle_timeout=idle_timeout, profiles=profiles))
    service = IdleService(manager, clock, 1.0, docker, IdlePolicy(**policy), keeping=keeping)
    return manager, service


def run(clock, service, seconds, step=1.0, each=None):
    """
    Advance C{clock} by C{seconds}, checking every C{step} (what the timer
    does); C{each()} runs before each check.  Return what was found idle.
    """
    found = []
    for _ in range(int(seconds / step)):
        clock.advance(step)
        if each is not None:
            each()
        found += service.check()
    return found


# -- the policy alone -------------------------------------------------------------------

def test_a_busy_session_is_never_read():
    policy = IdlePolicy(sample_every=30, threshold=0.02)
    # Output 10 s ago, limit 60: its interval is 15 s; nothing to read.
    assert policy.step("a", 60, active_at=90, now=100) == NOTHING
    assert policy.watched() == 0


def test_policy_reads_a_candidate_every_interval_then_finds_it_idle():
    policy = IdlePolicy(sample_every=30, threshold=0.02)
    assert policy.interval(60) == 15 and policy.interval(DAY) == 30
    assert policy.step("a", 60, 0, 15) == SAMPLE
    assert policy.step("a", 60, 0, 16) == NOTHING, "a reading is under way"
    policy.sampled("a", 15, 1.0)
    assert policy.step("a", 60, 0, 29) == NOTHING
    assert policy.step("a", 60, 0, 30) == SAMPLE
    policy.sampled("a", 30, 1.1)           # 0.1 s in 15 s: 0.7 % of a CPU, quiet
    assert policy.step("a", 60, 0, 45) == SAMPLE
    policy.sampled("a", 45, 1.1)
    # At its limit: one more reading, which must cover it.
    assert policy.step("a", 60, 0, 60) == SAMPLE
    policy.sampled("a", 60, 1.1)
    assert policy.step("a", 60, 0, 60) == IS_IDLE
    assert policy.step("a", 60, 0, 61) == NOTHING, "acted on once"


def test_policy_cpu_use_moves_the_quiet_start():
    policy = IdlePolicy(sample_every=30, threshold=0.02)
    for now, cpu in ((15, 1.0), (30, 3.0)):    # 2 s in 15 s: busy
        assert policy.step("a", 60, 0, now) == SAMPLE
        policy.sampled("a", now, cpu)
    for now in (45, 60, 75):
        assert policy.step("a", 60, 0, now) == SAMPLE
        policy.sampled("a", now, 3.0)
    assert policy.step("a", 60, 0, 89) == NOTHING
    assert policy.step("a", 60, 0, 90) == SAMPLE
    policy.sampled("a", 90, 3.0)
    assert policy.step("a", 60, 0, 90) == IS_IDLE


def test_policy_a_counter_that_went_back_is_a_new_baseline():
    policy = IdlePolicy(sample_every=30, threshold=0.02)
    policy.step("a", 60, 0, 15)
    policy.sampled("a", 15, 50.0)
    policy.step("a", 60, 0, 30)
    assert policy.sampled("a", 30, 0.1) is False
    for now in (45, 60, 75):
        assert policy.step("a", 60, 0, now) == SAMPLE
        assert policy.sampled("a", now, 0.1) is False
    # Its CPU was watched from 30, not 15: its limit is 15 s later.
    assert policy.step("a", 60, 0, 75) == IS_IDLE


def test_policy_without_cpu_readings_judges_input_and_output_alone():
    policy = IdlePolicy(sample_every=30, threshold=0.02)
    assert policy.step("a", 60, 0, 15) == SAMPLE
    policy.sampled("a", 15, None)
    assert policy.step("a", 60, 0, 59) == NOTHING
    assert policy.step("a", 60, 0, 60) == IS_IDLE


def test_policy_a_failed_reading_is_tried_again_and_never_guessed():
    policy = IdlePolicy(sample_every=30, threshold=0.02)
    assert policy.step("a", 60, 0, 15) == SAMPLE
    policy.failed("a", 15)
    assert policy.step("a", 60, 0, 29) == NOTHING, "tried again one interval later"
    for now in (30, 45, 60, 75, 90):
        assert policy.step("a", 60, 0, now) == SAMPLE
        policy.failed("a", now)
    assert policy.step("a", 60, 0, 104) == NOTHING


def test_messages_say_how_long_and_what_became_of_it():
    assert duration(8) == "8 s" and duration(1800) == "30 minutes"
    assert duration(DAY) == "24 hours"
    assert idle_message(1800, "--idle-timeout", None) == (
        "the session was idle (no input, no output and no CPU use) for 30 minutes"
        " (--idle-timeout): it ended")
    assert idle_message(60, "--idle-timeout", 1_796_000_000) == (
        "the session was idle (no input, no output and no CPU use) for 60 s (--idle-timeout):"
        " it was put away, and is kept until 30 Nov 2026 00:53 UTC; resume it to go on")


# -- sessions, with the fake engine ----------------------------------------------------

def test_a_truly_idle_session_ends_at_its_limit_without_retention(docker, clock):
    manager, service = make(docker, clock, idle_timeout=60)
    client = NoticeClient()
    session = manager.create(client, 80, 24)
    assert run(clock, service, 59) == []
    assert session.id in manager.sessions
    assert run(clock, service, 1) == [session]
    assert client.events[-1] == (
        "ended", None, "the session was idle (no input, no output and no CPU use) for 60 s"
                       " (--idle-timeout): it ended")
    assert session.container_id in docker.removed


def test_a_truly_idle_session_is_put_away_where_retention_is_on(docker, clock):
    manager = SessionManager(docker, clock, SessionConfig(spec=SPEC, instance="t",
                                                          idle_timeout=60),
                             keeping=KeepingConfig(retention=7 * DAY))
    service = IdleService(manager, clock, 1.0, docker, IdlePolicy())
    client = NoticeClient()
    session = manager.create(client, 80, 24)
    container_id = session.container_id
    assert run(clock, service, 59) == []
    assert run(clock, service, 1) == [session]
    notice = [e for e in client.events if e[0] == "notice"][-1]
    assert notice == ("notice", "idle", (
        "the session was idle (no input, no output and no CPU use) for 60 s (--idle-timeout):"
        " it was put away, and is kept until 08 Jan 1970 00:01 UTC; resume it to go on"))
    # Kept: its container stopped, not removed; the session no longer live.
    assert docker.containers[container_id]["state"] != "running"
    assert container_id not in docker.removed
    assert session.id not in manager.sessions
    (kept,) = manager.keeping.kept(None)
    assert (kept.id, kept.reason) == (session.id, IDLE)
    assert client.events[-1][0] == "ended"
    # Nothing more to do about it.
    assert run(clock, service, 600, step=10) == []


def test_output_keeps_a_session_alive_and_costs_no_reading(docker, clock):
    manager, service = make(docker, clock, idle_timeout=60)
    session = manager.create(NoticeClient(), 80, 24)
    tick = lambda: docker.processes[0].emit(b"tick\r\n")  # noqa: E731
    # Printing every 10 s (its interval is 15): never read, never idle.
    assert run(clock, service, 600, step=10, each=tick) == []
    assert docker.cpu_reads == []
    assert session.id in manager.sessions
    # Silent from now: idle 60 s after its last line.
    assert run(clock, service, 60) == [session]


def test_input_keeps_a_session_alive(docker, clock):
    manager, service = make(docker, clock, idle_timeout=60)
    session = manager.create(NoticeClient(), 80, 24)
    assert run(clock, service, 600, step=30, each=lambda: manager.write(session, b"x")) == []
    assert session.id in manager.sessions


def test_cpu_use_keeps_a_silent_session_alive(docker, clock):
    manager, service = make(docker, clock, idle_timeout=60)
    client = NoticeClient()
    session = manager.create(client, 80, 24)

    def think():
        docker.add_cpu(session.container_id, 0.5)

    # Half a CPU, nothing printed, nothing typed, for an hour.
    assert run(clock, service, 3600, each=think) == []
    assert session.id in manager.sessions and docker.cpu_reads
    # Readings every 15 s, not every check.
    assert len(docker.cpu_reads) <= 3600 / 15 + 1
    # It stops: idle one limit after the last reading that saw it work.
    assert run(clock, service, 90) == [session]
    assert "no CPU use" in client.events[-1][2]


def test_a_little_cpu_below_the_threshold_is_still_idle(docker, clock):
    manager, service = make(docker, clock, idle_timeout=60)
    session = manager.create(NoticeClient(), 80, 24)

    def keeper():
        docker.add_cpu(session.container_id, 0.001)

    assert run(clock, service, 60, each=keeper) == [session]


def test_each_profile_has_its_own_idle_limit_and_0_is_none(docker, clock, tmp_path):
    path = tmp_path / "profiles.toml"
    path.write_text("[profiles.short]\nidle_timeout = 30\n"
                    "[profiles.forever]\nidle_timeout = 0\n")
    shell = shell_profile(SessionConfig(spec=SPEC, idle_timeout=600))
    profiles = load_profiles(str(path), builtin_profiles(shell))
    manager, service = make(docker, clock, idle_timeout=600, profiles=profiles)
    clients = {name: NoticeClient() for name in ("shell", "short", "forever")}
    sessions = {name: manager.create(client, 80, 24, profile=name)
                for name, client in clients.items()}
    assert run(clock, service, 30) == [sessions["short"]]
    assert clients["short"].events[-1][2] == (
        "the session was idle (no input, no output and no CPU use) for 30 s"
        " (the idle_timeout of profile short): it ended")
    assert run(clock, service, 570) == [sessions["shell"]]
    assert "for 10 minutes (--idle-timeout)" in clients["shell"].events[-1][2]
    assert run(clock, service, 3 * DAY, step=600) == []
    assert sessions["forever"].id in manager.sessions
    forever = sessions["forever"].container_id
    assert forever not in docker.cpu_reads, "a session without a limit is never read"


def test_no_limit_at_all_reads_nothing(docker, clock):
    manager, service = make(docker, clock, idle_timeout=0)
    session = manager.create(NoticeClient(), 80, 24)
    assert run(clock, service, 3 * DAY, step=600) == []
    assert session.id in manager.sessions and docker.cpu_reads == []


def test_an_engine_that_cannot_say_leaves_input_and_output(docker, clock):
    manager, service = make(docker, clock, idle_timeout=60)
    session = manager.create(NoticeClient(), 80, 24)
    docker.set_cpu(session.container_id, None)
    assert run(clock, service, 60) == [session]


def test_a_session_whose_cpu_cannot_be_read_is_not_idled(docker, clock, logged):
    manager, service = make(docker, clock, idle_timeout=60)
    session = manager.create(NoticeClient(), 80, 24)
    docker.container_cpu = lambda container_id: fail(RuntimeError("stats broke"))  # noqa
    assert run(clock, service, 599) == []
    assert session.id in manager.sessions
    warnings = [e for e in logged if "reading the CPU use" in e.get("log_format", "")]
    assert len(warnings) == 1, "at most one warning in ten minutes"
    # It reads again once a reading works, and then finds it idle.
    del docker.container_cpu
    assert run(clock, service, 60) == [session]


def test_a_put_away_that_fails_leaves_the_session_to_a_new_limit(docker, clock):
    keeping = FakeKeeping(retention=DAY, fails=True)
    manager, service = make(docker, clock, idle_timeout=60, keeping=keeping)
    session = manager.create(NoticeClient(), 80, 24)
    assert run(clock, service, 60) == [session]
    assert run(clock, service, 30) == []
    assert session.id in manager.sessions
    assert len(keeping.put) == 1
    assert run(clock, service, 60) == [session]
    assert len(keeping.put) == 2


def test_a_detached_session_is_idled_too(docker, clock):
    manager, service = make(docker, clock, idle_timeout=60)
    client = NoticeClient()
    session = manager.create(client, 80, 24)
    manager.detach(session, client)
    assert run(clock, service, 60) == [session]


def test_a_session_waiting_for_the_engine_is_left_alone(docker, clock):
    manager, service = make(docker, clock, idle_timeout=60)
    session = manager.create(NoticeClient(), 80, 24)
    docker.reachable = False
    docker.processes[-1].exit(None)
    assert not session.state.settled
    # (Past the grace period it ends for that reason.)
    assert run(clock, service, 55, step=5) == []
    assert session.id in manager.sessions and docker.cpu_reads == []


def _service(*args, tuning=""):
    from twisted.internet.testing import MemoryReactorClock

    from capsule.tap import Options, makeService
    options = Options()
    options.parseOptions(["-l", "tcp:0:interface=127.0.0.1", *args])
    return makeService(options, MemoryReactorClock())


def test_the_idle_service_runs_where_a_limit_is_set(monkeypatch):
    monkeypatch.setenv("CAPSULE_TUNING", "idle-cpu-interval=10,idle-cpu-threshold=0.05")
    (service,) = [c for c in _service() if isinstance(c, IdleService)]
    assert (service.policy.sample_every, service.policy.threshold) == (10.0, 0.05)
    assert service.policy.interval(DAY) == 10.0
    assert not [c for c in _service("--idle-timeout", "0") if isinstance(c, IdleService)]


def test_policy_cpu_use_after_a_late_baseline_counts_from_the_use():
    policy = IdlePolicy(sample_every=30, threshold=0.02)
    policy.step("a", 60, 0, 15)
    policy.failed("a", 15)
    assert policy.step("a", 60, 0, 30) == SAMPLE
    policy.sampled("a", 30, 1.0)        # the baseline, 15 s late
    assert policy.step("a", 60, 0, 45) == SAMPLE
    assert policy.sampled("a", 45, 5.0) is True
    for now in (60, 75, 90):
        assert policy.step("a", 60, 0, now) == SAMPLE
        policy.sampled("a", now, 5.0)
    # Watched since its use at 45: idle at 105, not later.
    assert policy.step("a", 60, 0, 104) == NOTHING
    assert policy.step("a", 60, 0, 105) == SAMPLE
    policy.sampled("a", 105, 5.0)
    assert policy.step("a", 60, 0, 105) == IS_IDLE
