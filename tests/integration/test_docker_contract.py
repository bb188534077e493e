"""
The Docker contract (tests/docker_contract.py), against the real engine
through L{DockerAPI}.
"""

import threading
import uuid

import docker.errors
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from capsule.core.spec import ContainerSpec

from capsule.engine.docker import DockerAPI

# The suite lives outside a test module: let pytest explain its failures.
pytest.register_assert_rewrite("tests.docker_contract")
from ..docker_contract import LABEL_INSTANCE, DockerContract
from ..support.live import remove_instance_images, remove_instance_volumes
from .harness import IMAGE, docker_client, remove_instance_containers


class TestRealDocker(DockerContract):
    @pytest.fixture
    def spec(self):
        instance = f"contract-{uuid.uuid4().hex[:10]}"
        # No network: the contract needs none, nor an engine's default bridge.
        yield ContainerSpec(image=IMAGE, memory="256m", cpus=0.5, pids=64, network="none",
                            labels={"io.capsule.managed": "true", LABEL_INSTANCE: instance})
        remove_instance_containers(instance)
        # Snapshots' images and volumes carry the spec's labels.
        remove_instance_images(instance)
        remove_instance_volumes(instance)

    @pytest.fixture
    def api(self, spec):
        api = DockerAPI(reactor, threads=4, export_threads=1, timeout=30)
        api.start()
        yield api
        api.stop()

    @pytest.fixture
    def unreachable_api(self, tmp_path):
        api = DockerAPI(reactor, host=f"unix://{tmp_path}/nothing-listens.sock",
                        threads=2, export_threads=1, timeout=5)
        api.start()
        yield api
        api.stop()

    @pytest.fixture
    def kill_container(self):
        def kill(container_id):
            return deferToThread(lambda: docker_client().api.kill(container_id))
        return kill

    @pytest.fixture
    def network_name(self):
        name = f"capsule-contract-{uuid.uuid4().hex[:10]}"
        yield name
        try:
            docker_client().api.remove_network(name)
        except docker.errors.NotFound:
            pass

    @pytest.fixture
    def put_file(self):
        def put(container_id, path, data):
            return deferToThread(_thd_write_file, container_id, path, data)
        return put

    @pytest.fixture
    def make_symlink(self):
        def link(container_id, path, target):
            return deferToThread(_thd_exec, container_id, ["ln", "-sfn", target, path])
        return link

    @pytest.fixture
    def burn_cpu(self):
        def burn(container_id):
            # Half a CPU (the spec's) for 3 seconds: 1.5 s of CPU time.
            return deferToThread(_thd_exec, container_id, [
                "sh", "-c", 'end=$(($(date +%s) + 3)); while [ "$(date +%s)" -lt "$end" ]; do :; done'])
        return burn


def _thd_exec(container_id: str, argv: list[str]) -> None:
    result = docker_client().containers.get(container_id).exec_run(argv, user="developer")
    assert result.exit_code == 0, result.output


def _thd_write_file(container_id: str, path: str, data: bytes) -> None:
    """
    Write a file in the container as its user would, with a shell.
    """
    text = data.decode("ascii")
    result = docker_client().containers.get(container_id).exec_run(
        ["sh", "-c", 'printf %s "$1" > "$0"', path, text], user="developer")
    assert result.exit_code == 0, result.output


@pytest_twisted.ensureDeferred
async def test_health_calls_do_not_queue_behind_busy_workers():
    """
    With every worker of the main pool busy (a burst of session starts),
    the health check still reaches the engine at once.
    """
    api = DockerAPI(reactor, threads=1, export_threads=1, timeout=30)
    api.start()
    gate = threading.Event()
    busy = api._call(lambda client: gate.wait(60))
    try:
        queued = api.list_containers({LABEL_INSTANCE: f"contract-{uuid.uuid4().hex[:10]}"})
        ping = api.ping()
        ping.addTimeout(30, reactor)
        version = await ping
        image = api.image_exists(IMAGE)
        image.addTimeout(30, reactor)
        assert await image is True
        assert isinstance(version["Version"], str)
        assert not queued.called
    finally:
        gate.set()
        await busy
        await queued
        api.stop()
