import pytest
from twisted.internet.task import Clock

from capsule.docker_api import ContainerSpec
from capsule.session import SessionConfig, SessionManager
from capsule.testing import FakeDockerAPI, RecordingClient


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def docker():
    return FakeDockerAPI()


def make_manager(docker, clock, size=2):
    spec = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64)
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t",
                                                          pool_size=size, pool_max_age=100))
    manager.pool.start()
    return manager


def test_pool_fills_with_session_like_containers(docker, clock):
    manager = make_manager(docker, clock)
    assert len(manager.pool.ready) == 2
    for warm in manager.pool.ready:
        container = docker.containers[warm.container_id]
        assert container["name"] == f"capsule-{warm.session_id}"
        assert container["labels"]["io.capsule.session"] == warm.session_id
        assert container["labels"]["io.capsule.instance"] == "t"
        assert container["spec"].memory == "1g" and container["spec"].pids == 64


def test_session_takes_a_warm_container_and_pool_refills(docker, clock):
    manager = make_manager(docker, clock)
    warm = manager.pool.ready[0]
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    assert session.id == warm.session_id and session.container_id == warm.container_id
    assert session.warm and session.status() == "running"
    assert len(manager.pool.ready) == 2
    assert len(docker.containers) == 3


def test_broken_warm_container_is_replaced_by_a_cold_start(docker, clock):
    manager = make_manager(docker, clock, size=1)
    warm = manager.pool.ready[0]
    del docker.containers[warm.container_id]  # died while waiting
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    assert session.status() == "running"
    assert session.container_id != warm.container_id and not session.warm
    assert client.kinds() == ["started"]


def test_old_warm_containers_are_not_handed_out(docker, clock):
    manager = make_manager(docker, clock, size=1)
    old = manager.pool.ready[0]
    clock.advance(101)
    session = manager.create(RecordingClient(), 80, 24)
    assert session.container_id != old.container_id
    assert old.container_id in docker.removed


def test_refill_failures_retry_later_without_a_tight_loop(docker, clock):
    docker.reachable = False
    manager = make_manager(docker, clock, size=2)
    assert len(manager.pool.ready) == 0 and manager.pool.filling == 0
    assert len(clock.getDelayedCalls()) == 1
    session = None
    docker.reachable = True
    clock.advance(manager.pool.retry_delay)
    assert len(manager.pool.ready) == 2
    session = manager.create(RecordingClient(), 80, 24)
    assert session.warm


def test_pool_size_zero_is_cold(docker, clock):
    manager = make_manager(docker, clock, size=0)
    session = manager.create(RecordingClient(), 80, 24)
    assert not session.warm and docker.containers.keys() == {session.container_id}


def test_shutdown_removes_warm_containers(docker, clock):
    manager = make_manager(docker, clock)
    session = manager.create(RecordingClient(), 80, 24)
    manager.shutdown()
    # The session is kept for a restart; the warm containers go.
    assert set(docker.containers) == {session.container_id}
    clock.advance(10)
    assert set(docker.containers) == {session.container_id}, "a stopped pool must not refill"
