"""
Memory: the host's reading (capsule.sessions.host_memory) from fake files,
the warm pool's place in the memory budget against the in-memory engine and
a Clock, and the out-of-memory scores of sessions and of capsule.
"""

from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from capsule.core.admission import SERVER_FULL, AdmissionControl, AdmissionPolicy, AdmissionRefused
from capsule.core.memory import MemoryBudget
from capsule.core.profiles import Profile
from capsule.core.spec import ContainerSpec
from capsule.engine.docker import DockerAPI
from capsule.services import protect_from_oom
from capsule.sessions.host_memory import CGROUP_ROOT, HostMemory
from capsule.sessions.manager import SessionManager
from capsule.sessions.service import OpenRequest, SessionService
from capsule.sessions.session import SessionConfig
from tests.support.fakes import FakeDockerAPI, RecordingClient

MIB = 1024 ** 2
GIB = 1024 ** 3
SPEC = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64)


# -- the host's reading -----------------------------------------------------------------

class Files:
    """
    A fake host's files: path -> text; counts the reads.
    """

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.reads: list[str] = []

    def __call__(self, path: str) -> str | None:
        self.reads.append(path)
        return self.files.get(path)


MEMINFO = "MemTotal:       24683772 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n"


def test_the_reading_takes_available_memory_and_each_containers_working_set():
    v1 = f"{CGROUP_ROOT}/memory/docker"
    files = Files({
        "/proc/meminfo": MEMINFO,
        # Idle: its use as it is (under 32 MiB the statistics are not read).
        f"{v1}/aaa/memory.usage_in_bytes": f"{6 * MIB}\n",
        # Busy: its use less its inactive file cache.
        f"{v1}/bbb/memory.usage_in_bytes": f"{400 * MIB}\n",
        f"{v1}/bbb/memory.stat": f"cache 1\nrss 2\ntotal_inactive_file {100 * MIB}\n",
    })
    clock = Clock()
    host = HostMemory(clock, lambda: ["aaa", "bbb", "gone"], interval=5.0, read=files)
    assert host.engine_is(24683772 * 1024, "unix:///var/run/docker.sock")
    assert host.available == 20000000 * 1024
    assert (host.used("aaa"), host.used("bbb"), host.used("gone")) == (6 * MIB, 300 * MIB, None)
    # The layout is learnt once: then one file per idle container per reading.
    files.reads.clear()
    clock.advance(5.0)
    assert sorted(files.reads) == sorted([
        "/proc/meminfo", f"{v1}/aaa/memory.usage_in_bytes", f"{v1}/bbb/memory.usage_in_bytes",
        f"{v1}/bbb/memory.stat", f"{v1}/gone/memory.usage_in_bytes"])
    host.stop()
    assert clock.getDelayedCalls() == []


def test_the_log_says_when_the_host_goes_under_its_reserve_and_back():
    files = Files({"/proc/meminfo": MEMINFO})
    host = HostMemory(Clock(), lambda: [], read=files, reserve=lambda: 19000000 * 1024)
    said = []
    globalLogPublisher.addObserver(said.append)
    try:
        host.read()
        for _ in range(3):
            files.files["/proc/meminfo"] = MEMINFO.replace("20000000", "18000000")
            host.read()
        files.files["/proc/meminfo"] = MEMINFO
        host.read()
        host.read()
    finally:
        globalLogPublisher.removeObserver(said.append)
    lines = [e["log_format"].format(**e) for e in said if "reserve" in e.get("log_format", "")]
    assert lines == [
        "the host has 17578 MiB of memory available, under the reserve of 18554 MiB"
        " (--memory-reserve): new sessions are refused until it has more",
        "the host has 19531 MiB of memory available again (reserve 18554 MiB): new sessions"
        " are admitted"]


def test_cgroup_v2_under_systemd_is_read_too():
    scope = f"{CGROUP_ROOT}/system.slice/docker-ccc.scope"
    files = Files({"/proc/meminfo": MEMINFO, f"{scope}/memory.current": f"{200 * MIB}\n",
                   f"{scope}/memory.stat": f"anon 1\ninactive_file {50 * MIB}\n"})
    host = HostMemory(Clock(), lambda: ["ccc"], read=files)
    host.read()
    assert host.used("ccc") == 150 * MIB


def test_no_cgroups_of_theirs_are_not_looked_for_again():
    files = Files({"/proc/meminfo": MEMINFO})
    host = HostMemory(Clock(), lambda: ["aaa", "bbb"], read=files)
    host.read()
    assert host.used("aaa") is None and len(files.reads) == 1 + 2 * 4
    files.reads.clear()
    host.read()
    assert files.reads == ["/proc/meminfo"]


# -- the warm pool's place in the budget ------------------------------------------------

def profiles():
    return {"shell": Profile(name="shell", spec=SPEC, pool=2, memory_request="100m"),
            "other": Profile(name="other", spec=SPEC, pool=0, memory_request="100m")}


class Host:
    def __init__(self, available=None):
        self.available = available

    def used(self, container_id):
        return None


@pytest.fixture
def opened():
    """
    A session service over the in-memory engine whose memory budget holds
    three sessions' requests.
    """
    clock, docker = Clock(), FakeDockerAPI()
    memory = MemoryBudget(100 * MIB, budget=300 * MIB, reserve=GIB, reading=Host())
    manager = SessionManager(docker, clock, SessionConfig(
        spec=SPEC, instance="t", grace=60, pool_size=2, profiles=profiles()), memory=memory)
    admission = AdmissionControl(manager, clock, AdmissionPolicy(
        max_sessions=100, max_per_client=100, rate=None), memory=memory)
    service = SessionService(manager, admission)
    manager.pool.start()

    def settle():
        for _ in range(20):
            clock.advance(1.0)

    def open_one(profile=None):
        return service.open(RecordingClient(), OpenRequest(user=None, address="192.0.2.1",
                                                           profile=profile))
    return manager, memory, settle, open_one


def test_warm_sessions_count_at_their_request_and_the_refill_waits_for_room(opened):
    manager, memory, settle, open_one = opened
    settle()
    pool = manager.pool["shell"]
    assert len(pool.ready) == 2
    open_one()
    settle()
    # One live, two warm: the budget (three requests) is full.
    assert (len(manager.sessions), len(pool.ready)) == (1, 2)
    open_one()
    settle()
    # Two live, one warm; a second warm one would pass the budget: it waits.
    assert (len(manager.sessions), len(pool.ready)) == (2, 1) and pool.making is None
    open_one()
    settle()
    assert (len(manager.sessions), len(pool.ready)) == (3, 0)
    with pytest.raises(AdmissionRefused) as refused:
        open_one()
    assert refused.value.code == SERVER_FULL
    # A session ends: the pool refills into the room it left.
    manager.end(next(iter(manager.sessions.values())), None, "done")
    settle()
    assert (len(manager.sessions), len(pool.ready)) == (2, 1)


def test_a_users_session_takes_a_warm_sessions_place(opened):
    manager, memory, settle, open_one = opened
    settle()
    pool = manager.pool["shell"]
    open_one("other")
    open_one("other")
    # Two live sessions of a profile without a pool, budget full of warm
    # ones: they gave their places up, one each.
    assert len(manager.sessions) == 2 and len(pool.ready) == 1
    assert memory.excess(manager.sessions.values(), pool.held) == 0
    # The last place: the warm session is given up for it, none refills.
    open_one("other")
    settle()
    assert (len(manager.sessions), len(pool.ready), pool.making) == (3, 0, None)


def test_room_for_a_warm_session_can_keep_a_users_place_besides():
    memory = MemoryBudget(100 * MIB, budget=300 * MIB)
    live = [type("S", (), {"settings": None, "container_id": None})()]
    assert memory.room_for_warm(live, [], None)
    assert memory.room_for_warm(live, [], None, beside=100 * MIB)
    assert not memory.room_for_warm(live, [], None, beside=101 * MIB)


def test_the_refill_waits_while_the_host_is_under_its_reserve(opened):
    manager, memory, settle, open_one = opened
    memory.reading.available = GIB - 1
    settle()
    # The one being made as the pool started, and no more.
    pool = manager.pool["shell"]
    assert len(pool.ready) == 1 and pool.making is None
    memory.reading.available = 4 * GIB
    settle()
    assert len(manager.pool["shell"].ready) == 2


# -- out-of-memory scores ----------------------------------------------------------------

class RecordingClientAPI:
    def create_host_config(self, **kwargs):
        self.host_config = kwargs
        return {}

    def create_container(self, image, **kwargs):
        return {"Id": "c1"}


def test_session_containers_are_killed_first_under_memory_pressure():
    client = RecordingClientAPI()
    DockerAPI._thd_create(client, "s1", SPEC, False)
    assert client.host_config["oom_score_adj"] == 1000
    assert client.host_config["mem_limit"] == "1g"


def test_capsule_lowers_its_own_score(tmp_path):
    path = tmp_path / "oom_score_adj"
    path.write_text("0\n")
    assert protect_from_oom(str(path))
    assert path.read_text() == "-900\n"
    # Already lower (systemd's OOMScoreAdjust): left as it is.
    path.write_text("-950\n")
    assert protect_from_oom(str(path))
    assert path.read_text() == "-950\n"


# A file that holds a number and that not even root may write.
READ_ONLY = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"


@pytest.mark.skipif(not os.path.exists(READ_ONLY), reason=f"no {READ_ONLY}")
def test_capsule_says_what_to_set_when_it_may_not_lower_its_score():
    said = []
    globalLogPublisher.addObserver(said.append)
    try:
        assert not protect_from_oom(READ_ONLY)
    finally:
        globalLogPublisher.removeObserver(said.append)
    text = " ".join(e.get("log_format", "").format(**e) for e in said
                    if "out-of-memory" in e.get("log_format", ""))
    assert "OOMScoreAdjust=-900" in text
