"""
The engine contract (tests/engine_contract.py), against the real engine
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
pytest.register_assert_rewrite("tests.engine_contract")
from ..engine_contract import (FORK_PATHS, FORK_SHAPE, FORK_SHAPE_ROOT, LABEL_INSTANCE,
                               EngineContract)
from ..support.live import remove_instance_images, remove_instance_volumes
from .harness import IMAGE, docker_client, remove_instance_containers


class TestRealDocker(EngineContract):
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

    @pytest.fixture
    def shape_files(self):
        def shape(container_id):
            def _thd():
                _thd_exec(container_id, ["sh", "-c", FORK_SHAPE_ROOT], user="root")
                _thd_exec(container_id, ["sh", "-c", FORK_SHAPE])
            return deferToThread(_thd)
        return shape

    @pytest.fixture
    def file_tree(self):
        def tree(container_id):
            return deferToThread(_thd_file_tree, container_id)
        return tree


# One line per path: its type, mode, owner, links, inode, and its content's
# digest or its link's target.
_DESCRIBE = """for p; do
  if [ -e "$p" ] || [ -L "$p" ]; then
    printf '%s|%s|' "$p" "$(stat -c '%F %a %u:%g %h %i' "$p")"
    if [ -L "$p" ]; then readlink "$p"; elif [ -f "$p" ]; then md5sum < "$p"; else echo; fi
  else printf '%s|absent|\n' "$p"; fi
done"""


def _thd_file_tree(container_id: str) -> dict[str, str]:
    result = docker_client().containers.get(container_id).exec_run(
        ["sh", "-c", _DESCRIBE, "describe", *FORK_PATHS], user="developer")
    assert result.exit_code == 0, result.output
    described, inodes = {}, {}
    for line in result.output.decode().splitlines():
        path, kind, rest = line.split("|", 2)
        if kind != "absent":
            # Inodes differ from one container to another: which paths
            # share one is what is compared.
            *head, inode = kind.split(" ")
            kind = " ".join(head + [str(inodes.setdefault(inode, len(inodes)))])
            described[path] = f"{kind} {rest}"
        else:
            described[path] = "absent"
    return described


def _thd_exec(container_id: str, argv: list[str], user: str = "developer") -> None:
    result = docker_client().containers.get(container_id).exec_run(argv, user=user)
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
async def test_prune_removes_a_copier_a_stopped_capsule_left(real, monkeypatch):
    api, spec = real
    instance = spec.labels[LABEL_INSTANCE]
    client = docker_client().api
    left = await deferToThread(client.create_container, IMAGE, ["true"],
                               labels={snapshots.LABEL_COPIER: instance})
    # A copier not running is left alone for COPIER_GRACE whatever the grace
    # asked (another call may have just made it), then removed.
    assert await api.prune_snapshots(spec.labels) == 0
    assert await api.prune_snapshots(spec.labels, grace=0) == 0
    monkeypatch.setattr(snapshots, "COPIER_GRACE", 0.0)
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


# -- forks: which way, and what a failure leaves -------------------------------


def _instance_filter(spec) -> dict:
    return {"label": f"{LABEL_INSTANCE}={spec.labels[LABEL_INSTANCE]}"}


@pytest_twisted.ensureDeferred
async def test_a_fork_is_copied_on_the_host_where_it_can_be(real):
    """
    Root beside a local overlay2 engine, the same image: no image is
    made, the fork runs the source's very image, and the running source
    is not left paused.
    """
    api, spec = real
    client = docker_client().api
    source = await _create(api, spec)
    await _run(api, source, "sh", "-c", "echo here > /workspace/notes")
    fork = await api.fork_container(source, str(uuid.uuid4()), spec)
    assert await _run(api, fork, "cat", "/workspace/notes") == b"here\n"
    assert await deferToThread(client.images, filters=_instance_filter(spec)) == []
    found = await deferToThread(client.inspect_container, fork)
    assert found["Image"] == (await deferToThread(client.inspect_container, source))["Image"]
    state = (await deferToThread(client.inspect_container, source))["State"]
    assert state["Running"] is True and state["Paused"] is False


@pytest_twisted.ensureDeferred
async def test_a_fork_whose_copy_fails_is_made_by_a_snapshot(real, monkeypatch):
    """
    What the copy on the host made is removed; the snapshot's way gives
    the same files, and leaves only the fork and the volume copies it
    mounts.
    """
    api, spec = real
    from capsule.engine import forks
    monkeypatch.setattr(forks, "COPY_COMMAND", ("false",))
    client = docker_client().api
    private = replace(spec, read_only_root=True)
    source = await _create(api, private)
    await api.put_file(source, "/workspace/notes", b"in the volume")
    fork = await api.fork_container(source, str(uuid.uuid4()), private)
    assert await api.read_file(fork, "/workspace/notes", 100) == b"in the volume"
    left = await deferToThread(client.containers, all=True, filters=_instance_filter(spec))
    assert sorted(c["Id"] for c in left) == sorted([source, fork])
    mounted = {m["Name"] for m in (await deferToThread(client.inspect_container, fork))["Mounts"]}
    volumes = await deferToThread(client.volumes, filters=_instance_filter(spec))
    assert {v["Name"] for v in volumes["Volumes"] or []} == mounted
    # The snapshot's image is the fork's, untagged.
    images = await deferToThread(client.images, filters=_instance_filter(spec))
    assert [i.get("RepoTags") or [] for i in images] in ([[]], [["<none>:<none>"]])


@pytest_twisted.ensureDeferred
async def test_a_fork_that_fails_both_ways_leaves_nothing(real, monkeypatch):
    api, spec = real
    from capsule.engine import forks

    def refuse(*args, **kwargs):
        raise DockerError("Docker could not copy the container's files: refused")
    monkeypatch.setattr(forks, "COPY_COMMAND", ("false",))
    monkeypatch.setattr(DockerAPI, "_thd_snapshot", refuse)
    client = docker_client().api
    private = replace(spec, read_only_root=True)
    source = await _create(api, private)
    with pytest.raises(DockerError):
        await api.fork_container(source, str(uuid.uuid4()), private)
    left = await deferToThread(client.containers, all=True, filters=_instance_filter(spec))
    assert [c["Id"] for c in left] == [source]
    assert (await deferToThread(client.volumes, filters=_instance_filter(spec)))["Volumes"] in (
        None, [])
    assert await deferToThread(client.images, filters=_instance_filter(spec)) == []


@pytest.mark.parametrize("fast", [True, False], ids=["on-host", "by-snapshot"])
@pytest_twisted.ensureDeferred
async def test_a_file_deleted_from_a_volume_stays_deleted_in_the_fork(real, fast):
    """
    The engine fills a new, empty volume from the image when a container
    that mounts it is made: a fork's copies are filled first.
    """
    api, spec = real
    private = replace(spec, read_only_root=True)
    source = await _create(api, private)
    assert await api.read_file(source, "/home/developer/.bashrc", 10) is not None
    await _run(api, source, "rm", "/home/developer/.bashrc")
    fork = await api.fork_container(source, str(uuid.uuid4()), private, fast=fast)
    assert await api.read_file(fork, "/home/developer/.bashrc", 10) is None
    assert await api.read_file(fork, "/home/developer/.profile", 10) is not None


@pytest_twisted.ensureDeferred
async def test_unpause_thaws_a_paused_container(real):
    api, spec = real
    container_id = await _create(api, spec)
    await deferToThread(docker_client().api.pause, container_id)
    assert await api.unpause_container(container_id) is True
    state = (await deferToThread(docker_client().api.inspect_container, container_id))["State"]
    assert state["Running"] is True and state["Paused"] is False
    assert await api.unpause_container(container_id) is False
