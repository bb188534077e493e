"""
The Docker contract (tests/docker_contract.py), against the real engine
through L{DockerAPI}.
"""

import os
import threading
import uuid
from dataclasses import replace

import docker.errors
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from capsule.core.errors import DockerError
from capsule.core.keeper import SECRET_LABEL
from capsule.core.spec import ContainerSpec

from capsule.engine import snapshots
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
        _remove_copiers(instance)
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


# -- what only the real engine shows of kept sessions' calls --------------------


@pytest.fixture
def real(request):
    """
    A started DockerAPI and a spec of an instance of the test's own; every
    container, image and volume of it is removed afterwards.
    """
    instance = f"contract-{uuid.uuid4().hex[:10]}"
    spec = ContainerSpec(image=IMAGE, memory="256m", cpus=0.5, pids=64, network="none",
                         labels={"io.capsule.managed": "true", LABEL_INSTANCE: instance})
    api = DockerAPI(reactor, threads=4, export_threads=1, timeout=30)
    api.start()
    yield api, spec
    api.stop()
    remove_instance_containers(instance)
    _remove_copiers(instance)
    remove_instance_images(instance)
    remove_instance_volumes(instance)


def _remove_copiers(instance: str) -> None:
    client = docker_client().api
    for c in client.containers(all=True, filters={
            "label": f"{snapshots.LABEL_COPIER}={instance}"}):
        client.remove_container(c["Id"], force=True, v=True)


@pytest_twisted.ensureDeferred
async def test_prune_removes_a_copier_a_stopped_capsule_left(real):
    api, spec = real
    instance = spec.labels[LABEL_INSTANCE]
    client = docker_client().api
    left = await deferToThread(client.create_container, IMAGE, ["true"],
                               labels={snapshots.LABEL_COPIER: instance})
    assert await api.prune_snapshots(spec.labels) == 0
    assert await api.prune_snapshots(spec.labels, grace=0) == 1
    assert await deferToThread(client.containers, all=True, filters={
        "label": f"{snapshots.LABEL_COPIER}={instance}"}) == []
    del left


async def _create(api, spec) -> str:
    return await api.create_session_container(str(uuid.uuid4()), spec)


async def _run(api, container_id, *argv) -> bytes:
    result = await api.run_command(container_id, list(argv), "developer", "/", {})
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest_twisted.ensureDeferred
async def test_put_file_is_the_users_with_its_mode(real):
    api, spec = real
    container_id = await _create(api, spec)
    await api.put_file(container_id, "/home/developer/.cache/capsule/screen", b"x", mode=0o640)
    said = await _run(api, container_id, "stat", "-c", "%u %g %a %F",
                      "/home/developer/.cache", "/home/developer/.cache/capsule",
                      "/home/developer/.cache/capsule/screen")
    assert said.decode().splitlines() == ["1000 1000 700 directory", "1000 1000 700 directory",
                                          "1000 1000 640 regular file"]


@pytest_twisted.ensureDeferred
async def test_read_file_of_what_is_no_regular_file_or_too_big(real, monkeypatch):
    api, spec = real
    container_id = await _create(api, spec)
    await _run(api, container_id, "sh", "-c", "mkfifo /workspace/pipe && mkdir /workspace/dir"
               " && head -c 3000 /dev/zero > /workspace/big")
    assert await api.read_file(container_id, "/workspace/pipe", 10) is None
    assert await api.read_file(container_id, "/workspace/dir", 10) is None
    assert await api.read_file(container_id, "/workspace/big", 10) == b"\0" * 10
    monkeypatch.setattr(snapshots, "READ_SCAN_LIMIT", 2000)
    assert await api.read_file(container_id, "/workspace/big", 10) is None
    with pytest.raises(DockerError):
        await api.put_file(container_id, "/workspace/dir", b"x")
    with pytest.raises(DockerError):
        await api.put_file(container_id, "/workspace/big/under", b"x")


@pytest_twisted.ensureDeferred
async def test_a_symlink_is_not_followed_out_of_the_container(real):
    """
    The engine resolves a link inside the container's root: a link to the
    host's files reaches the container's own at most, and capsule does not
    follow it at all.
    """
    api, spec = real
    container_id = await _create(api, spec)
    await _run(api, container_id, "ln", "-s", "/proc/1/root/etc/hostname", "/workspace/host")
    await _run(api, container_id, "ln", "-s", "../../../../../../etc", "/workspace/up")
    assert await api.read_file(container_id, "/workspace/host", 100) is None
    assert await api.read_file(container_id, "/workspace/up/hostname", 100) is None
    with pytest.raises(DockerError):
        await api.put_file(container_id, "/workspace/up/capsule-test", b"x")
    assert not os.path.exists("/etc/capsule-test")


@pytest_twisted.ensureDeferred
async def test_a_snapshot_keeps_secrets_out_of_its_image(real):
    api, spec = real
    secret = uuid.uuid4().hex
    made = replace(spec, secrets={"CONTRACT_SECRET": secret},
                   labels={**spec.labels, SECRET_LABEL: "ab" * 16})
    container_id = await _create(api, made)
    snapshot = await api.snapshot_container(container_id, "capsule-snapshot",
                                            f"contract-{uuid.uuid4().hex[:12]}",
                                            {**spec.labels, "io.capsule.snapshot": "s"})
    config = (await deferToThread(docker_client().api.inspect_image, snapshot.image))["Config"]
    assert "CONTRACT_SECRET=" in config["Env"]
    assert not any(secret in e for e in config["Env"])
    assert config["Labels"][SECRET_LABEL] == ""
    assert SECRET_LABEL not in snapshot.labels
    # Its own layer is small: the image's size less the session image's.
    assert snapshot.size is not None and snapshot.size < 50 * 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_a_snapshot_leaves_no_copier_and_labels_its_copies(real):
    api, spec = real
    container_id = await _create(api, replace(spec, read_only_root=True))
    labels = {**spec.labels, "io.capsule.snapshot": "labelled"}
    snapshot = await api.snapshot_container(container_id, "capsule-snapshot",
                                            f"contract-{uuid.uuid4().hex[:12]}", labels)
    client = docker_client().api
    left = await deferToThread(client.containers, all=True, filters={
        "label": f"{LABEL_INSTANCE}={spec.labels[LABEL_INSTANCE]}"})
    assert [c["Id"] for c in left] == [container_id]
    copiers = await deferToThread(client.containers, all=True, filters={
        "label": f"{snapshots.LABEL_COPIER}={spec.labels[LABEL_INSTANCE]}"})
    assert copiers == []
    for name in snapshot.volumes.values():
        volume = await deferToThread(client.inspect_volume, name)
        assert {k: volume["Labels"].get(k) for k in labels} == labels
        assert volume["Labels"]["io.capsule.volume"] == "copy"


@pytest_twisted.ensureDeferred
async def test_container_cpu_without_the_cgroup(real):
    """
    Where capsule cannot read the container's cgroup (another host, or a
    container of its own), the engine's one-shot stats tell.
    """
    api, spec = real
    api._cgroup_path = "/nonexistent/{id}/cpuacct.usage"
    container_id = await _create(api, spec)
    before = await api.container_cpu(container_id)
    await deferToThread(_thd_exec, container_id, [
        "sh", "-c", 'end=$(($(date +%s) + 3)); while [ "$(date +%s)" -lt "$end" ]; do :; done'])
    after = await api.container_cpu(container_id)
    assert isinstance(before, float) and after > before + 0.1
    await api.stop_container(container_id, timeout=1)
    assert await api.container_cpu(container_id) is None


@pytest_twisted.ensureDeferred
async def test_copies_of_a_snapshot_whose_volume_is_gone(real):
    """
    Mounting a missing volume makes it anew, empty: the copy is refused
    rather than empty, and leaves nothing behind.
    """
    api, spec = real
    container_id = await _create(api, replace(spec, read_only_root=True))
    snapshot = await api.snapshot_container(container_id, "capsule-snapshot",
                                            f"contract-{uuid.uuid4().hex[:12]}",
                                            {**spec.labels, "io.capsule.snapshot": "gone"})
    client = docker_client().api
    lost = snapshot.volumes["/workspace"]
    await deferToThread(client.remove_volume, lost)
    with pytest.raises(DockerError):
        await api.copy_snapshot_volumes(snapshot, spec.labels)
    ours = await deferToThread(client.volumes, filters={
        "label": f"{LABEL_INSTANCE}={spec.labels[LABEL_INSTANCE]}"})
    assert sorted(v["Name"] for v in ours["Volumes"] or []) == sorted(
        set(snapshot.volumes.values()) - {lost})
    with pytest.raises(docker.errors.NotFound):
        await deferToThread(client.inspect_volume, lost)
