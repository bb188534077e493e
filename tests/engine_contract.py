"""
What capsule relies on from an engine, as one suite of tests of
L{IDockerAPI} for every engine: it runs against the fake
(tests/test_docker_contract.py), the real Docker engine
(tests/integration/test_docker_contract.py), and the Kubernetes engine on
the tests' stand-in API server and, when C{CAPSULE_TEST_KUBECONFIG} is set,
on a real cluster (tests/integration/test_kube_contract.py), so that no
engine, and not the fake, shows behaviour the others never do.  A case that
is one engine's alone is skipped on the others, saying why.

A backend is a subclass of L{EngineContract} providing these fixtures:

  - C{api}: a started L{IDockerAPI} talking to a reachable engine;
  - C{unreachable_api}: one whose engine cannot be reached;
  - C{spec}: a L{ContainerSpec} of the session image, whose labels carry an
    C{io.capsule.instance} of the test's own (the backend removes every
    container with it afterwards, whether the test passed or not);
  - C{put_file}: C{put_file(container_id, path, data)} puts a file into a
    running container by other means than the API (a Deferred);
  - C{kill_container}: C{kill_container(container_id)} kills a container as
    C{docker kill} does (a Deferred);
  - C{network_name}: the name of a network no one has, removed afterwards
    if a test made it;
  - C{make_symlink}: C{make_symlink(container_id, path, target)} makes
    C{path} a symbolic link to C{target} in a running container, as its
    user could (a Deferred);
  - C{burn_cpu}: C{burn_cpu(container_id)} makes the container's processes
    use CPU for a second or so (a Deferred firing once they did);
  - C{shape_files}: C{shape_files(container_id)} changes a running
    container's files as L{FORK_SHAPE} says (a Deferred);
  - C{file_tree}: C{file_tree(container_id)} fires with a description of
    each of L{FORK_PATHS} in a running container, by path ("absent" for
    none), equal for equal files (type, mode, owner, links, content).

Images and volumes a test makes (snapshots) carry the spec's labels: the
backend removes them afterwards too.

The scripts run in execs are in L{SCRIPT} and L{SCRIPT_TTY}; a fake backend
has to emulate them.
"""

from __future__ import annotations

import io
import re
import tarfile
import uuid
from dataclasses import replace

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from zope.interface.verify import verifyObject

from capsule.core.errors import ContainerGone, DockerError, DockerUnavailable, ImageMissing
from capsule.core.interfaces import IDockerAPI, IExecProcess
from capsule.core.kept import SCREEN_PATH, Snapshot

LABEL_INSTANCE = "io.capsule.instance"
LABEL_ROLE = "io.capsule.contract"
LABEL_SNAPSHOT = "io.capsule.snapshot"
SNAPSHOT_REPOSITORY = "capsule-snapshot"
# Generous: the real engine is shared with other tests on a small machine.
DEADLINE = 30.0

# Says it is ready, reads a line, answers it, writes to stderr and exits 3.
SCRIPT = ("sh", "-c", 'printf ready; read line; printf "got %s" "$line"; printf oops >&2; exit 3')
# Runs on, whatever it is given.
SCRIPT_SLEEP = ("sh", "-c", "printf ready; exec sleep 1000")
SCRIPT_TTY = ("sh", "-c", 'printf ready; read line; printf "got %s" "$line"; exit 0')
# Copies its input to its output, complains and exits 3: run to completion.
SCRIPT_COMMAND = ("sh", "-c", "cat; printf oops >&2; exit 3")

# What shape_files does, as root then as the container's user: a file of
# the image deleted, a directory of the image replaced by a new one, a
# file made by root, a file with a mode of its own, a hard link to it, a
# symbolic link, a directory with a mode of its own.
FORK_SHAPE_ROOT = ("rm /etc/issue && rm -r /etc/skel && mkdir /etc/skel"
                   " && echo new > /etc/skel/only && echo root > /rootfile")
FORK_SHAPE = ("echo a > /workspace/a && chmod 640 /workspace/a && ln /workspace/a /workspace/b"
              " && ln -s /etc/passwd /workspace/link && mkdir -m 751 /workspace/d")
FORK_PATHS = ("/etc/issue", "/etc/skel", "/etc/skel/only", "/etc/skel/.bashrc", "/rootfile",
              "/workspace/a", "/workspace/b", "/workspace/link", "/workspace/d")


class ExecRecorder(ProcessProtocol):
    """
    Records, in order, what an exec does to its process protocol.
    """

    def __init__(self) -> None:
        self.events: list = []
        self.output = {1: b"", 2: b""}
        self.reason = None
        self._ended: list[Deferred] = []
        self._waiting: list[tuple[int, bytes, Deferred]] = []

    def makeConnection(self, transport) -> None:
        self.events.append("connected")
        super().makeConnection(transport)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.events.append(("data", fd, data))
        self.output[fd] = self.output.get(fd, b"") + data
        waiting, self._waiting = self._waiting, []
        for wanted in waiting:
            self._check(*wanted)

    def processEnded(self, reason) -> None:
        self.events.append(("ended", reason))
        self.reason = reason
        ended, self._ended = self._ended, []
        for d in ended:
            if not d.called:
                d.callback(None)

    def kinds(self) -> list[str]:
        return [e if isinstance(e, str) else e[0] for e in self.events]

    def wait_for(self, text: bytes, fd: int = 1) -> Deferred:
        """
        Fire once the output on C{fd} contains C{text}; fail after
        L{DEADLINE}.
        """
        d: Deferred = Deferred()
        d.addTimeout(DEADLINE, reactor)
        self._check(fd, text, d)
        return d

    def _check(self, fd: int, text: bytes, d: Deferred) -> None:
        if d.called:
            return
        if text in self.output.get(fd, b""):
            d.callback(None)
        else:
            self._waiting.append((fd, text, d))

    def wait_ended(self) -> Deferred:
        """
        Fire once C{processEnded} was called (its reason is C{reason});
        fail after L{DEADLINE}.
        """
        d: Deferred = Deferred()
        d.addTimeout(DEADLINE, reactor)
        if self.reason is not None:
            d.callback(None)
        else:
            self._ended.append(d)
        return d


def _from_snapshot(spec, snapshot):
    """
    C{spec} made from C{snapshot}: its image, its volumes (any the engine
    has to make carry the spec's labels, so that they are removed after
    the test).
    """
    return replace(spec, image=snapshot.image, volume_labels=dict(spec.labels), volumes=tuple(
        (name, mount) for mount, name in snapshot.volumes.items()))


def _labelled(spec, role: str):
    return replace(spec, labels={**spec.labels, LABEL_ROLE: role})


class EngineContract:
    """
    The behaviour of L{IDockerAPI} that capsule relies on.
    """

    async def create(self, api, spec, role: str = "any") -> str:
        return await api.create_session_container(str(uuid.uuid4()), _labelled(spec, role))

    async def spawn(self, api, container_id: str, argv, tty: bool = False):
        """
        Start C{argv} in the container; the recorder notes C{"fired"} when
        the Deferred of C{spawn_exec} fires.
        """
        recorder = ExecRecorder()
        d = api.spawn_exec(recorder, container_id, list(argv), "developer", "/workspace",
                           {"LANG": "C.UTF-8"}, (100, 30) if tty else None, tty=tty)
        d.addCallback(lambda process: (recorder.events.append("fired"), process)[1])
        d.addTimeout(DEADLINE, reactor)
        process = await d
        return recorder, process

    def test_provides_the_interface(self, api):
        assert verifyObject(IDockerAPI, api)

    @pytest_twisted.ensureDeferred
    async def test_ping_image_exists_and_info(self, api, spec):
        version = await api.ping()
        assert isinstance(version.get("Version"), str)
        assert await api.image_exists(spec.image) is True
        assert await api.image_exists("capsule-contract-no-such-image:missing") is False
        info = await api.info()
        assert isinstance(info["LiveRestoreEnabled"], bool)

    @pytest_twisted.ensureDeferred
    async def test_create_then_list_by_labels(self, api, spec):
        session_id = str(uuid.uuid4())
        first = await api.create_session_container(session_id, _labelled(spec, "first"))
        second = await self.create(api, spec, "second")
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        listed = await api.list_containers(instance)
        assert sorted(c["id"] for c in listed) == sorted([first, second])
        only = await api.list_containers({**instance, LABEL_ROLE: "first"})
        assert [(c["id"], c["state"]) for c in only] == [(first, "running")]
        # The name is random, not the session's id (other sessions can
        # read it through the network's DNS).
        assert re.fullmatch(r"capsule-[0-9a-f]{32}", only[0]["name"])
        assert session_id[:8] not in only[0]["name"]
        # The image's own labels come along on the real engine.
        labels = only[0]["labels"]
        assert {k: labels.get(k) for k in spec.labels} == spec.labels
        assert labels[LABEL_ROLE] == "first"
        assert await api.list_containers({**instance, LABEL_ROLE: "none"}) == []

    @pytest_twisted.ensureDeferred
    async def test_container_sizes_of_running_containers_by_labels(self, api, spec):
        first = await self.create(api, spec, "sized")
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        sizes = await api.container_sizes({**instance, LABEL_ROLE: "sized"})
        assert list(sizes) == [first]
        assert isinstance(sizes[first], int) and sizes[first] >= 0
        assert await api.container_sizes({**instance, LABEL_ROLE: "none"}) == {}

    @pytest_twisted.ensureDeferred
    async def test_disk_usage_of_running_containers_and_their_volumes(self, api, spec):
        plain = await self.create(api, spec, "used")
        private = await self.create(api, replace(spec, read_only_root=True), "used")
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        usage = await api.disk_usage({**instance, LABEL_ROLE: "used"})
        assert sorted(usage.layers) == sorted([plain, private]) and usage.volumes == {}
        assert all(isinstance(size, int) and size >= 0 for size in usage.layers.values())
        assert usage.mounts[plain] == ()
        assert sorted(m.destination for m in usage.mounts[private]) == [
            "/home/developer", "/workspace"]
        usage = await api.disk_usage({**instance, LABEL_ROLE: "used"}, volumes=True)
        for mount in usage.mounts[private]:
            assert isinstance(usage.volumes[mount.name], int)
        assert (await api.disk_usage({**instance, LABEL_ROLE: "none"}, True)).layers == {}

    @pytest_twisted.ensureDeferred
    async def test_set_cpu_shares_of_a_container(self, api, spec):
        container_id = await self.create(api, spec, "weighed")
        assert await api.set_cpu_shares(container_id, 100) is True
        await api.remove_container(container_id)
        assert await api.set_cpu_shares(container_id, 100) is False

    @pytest_twisted.ensureDeferred
    async def test_replica_calls(self, api, spec):
        """
        A single host is one server: a replica's liveness is nothing, and
        it holds every container.  A cluster says which replicas live and
        which holds each container.  Either way, this replica may claim a
        container no replica holds, and holds it then.
        """
        replica = f"contract-{uuid.uuid4().hex[:8]}"
        await api.renew_replica(replica, 60)
        live = await api.live_replicas()
        assert live == set() or replica in live
        container_id = await self.create(api, spec)
        assert await api.container_holder(container_id) in (None, getattr(api, "replica", None))
        assert await api.claim_container(container_id, replica,
                                         await api.container_holder(container_id)) is True
        assert await api.container_holder(container_id) in (None, replica)
        assert await api.drop_replica(replica) in (True, False)
        await api.remove_container(container_id)

    @pytest_twisted.ensureDeferred
    async def test_create_with_a_missing_image(self, api, spec):
        missing = replace(spec, image="capsule-contract-no-such-image:missing")
        with pytest.raises(ImageMissing):
            await self.create(api, missing)
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        assert await api.list_containers(instance) == []

    @pytest_twisted.ensureDeferred
    async def test_container_state_running_then_none_after_removal(self, api, spec):
        container_id = await self.create(api, spec)
        state = await api.container_state(container_id)
        assert state["Running"] is True and state["OOMKilled"] is False
        await api.remove_container(container_id)
        assert await api.container_state(container_id) is None

    @pytest_twisted.ensureDeferred
    async def test_remove_says_whether_it_existed(self, api, spec):
        container_id = await self.create(api, spec)
        assert await api.remove_container(container_id) is True
        assert await api.remove_container(container_id) is False
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        assert await api.list_containers(instance) == []

    @pytest_twisted.ensureDeferred
    async def test_spawn_exec_fires_before_the_first_output(self, api, spec):
        container_id = await self.create(api, spec)
        recorder, _ = await self.spawn(api, container_id, SCRIPT)
        await recorder.wait_for(b"ready")
        assert recorder.events[:2] == ["connected", "fired"]

    @pytest_twisted.ensureDeferred
    async def test_spawn_exec_output_input_and_exit(self, api, spec):
        container_id = await self.create(api, spec)
        recorder, process = await self.spawn(api, container_id, SCRIPT)
        assert IExecProcess.providedBy(process)
        assert recorder.transport is process
        await recorder.wait_for(b"ready")
        process.write(b"hello\n")
        await recorder.wait_ended()
        reason = recorder.reason
        assert reason.check(ProcessTerminated) and reason.value.exitCode == 3
        assert recorder.output == {1: b"readygot hello", 2: b"oops"}
        assert recorder.kinds().count("ended") == 1 and recorder.kinds()[-1] == "ended"

    @pytest_twisted.ensureDeferred
    async def test_spawn_exec_with_a_tty(self, api, spec):
        container_id = await self.create(api, spec)
        recorder, process = await self.spawn(api, container_id, SCRIPT_TTY, tty=True)
        await recorder.wait_for(b"ready")
        process.write(b"hello\r")
        await recorder.wait_for(b"got hello")
        await recorder.wait_ended()
        assert recorder.reason.check(ProcessDone)
        assert recorder.output[1].startswith(b"ready")
        assert recorder.output[2] == b""

    @pytest_twisted.ensureDeferred
    async def test_lose_connection_closes_the_input_and_the_end_follows(self, api, spec):
        container_id = await self.create(api, spec)
        recorder, process = await self.spawn(api, container_id, SCRIPT)
        await recorder.wait_for(b"ready")
        process.loseConnection()
        await recorder.wait_ended()
        # The script's read saw the end of its input and it failed: how (its
        # exit code) is the engine's business; what it wrote after that is
        # not read any more.
        assert recorder.reason.check(ProcessTerminated)
        assert recorder.reason.value.exitCode not in (0, None)
        assert recorder.output == {1: b"ready", 2: b""}
        kinds = recorder.kinds()
        assert kinds[0] == "connected" and kinds[-1] == "ended" and kinds.count("ended") == 1

    @pytest_twisted.ensureDeferred
    async def test_lose_connection_of_a_program_that_runs_on(self, api, spec):
        container_id = await self.create(api, spec)
        recorder, process = await self.spawn(api, container_id, SCRIPT_SLEEP)
        await recorder.wait_for(b"ready")
        process.loseConnection()
        await recorder.wait_ended()
        # Still running: the engine has no exit code to tell.
        assert recorder.reason.check(ProcessTerminated)
        assert recorder.reason.value.exitCode is None
        assert recorder.kinds().count("ended") == 1 and recorder.kinds()[-1] == "ended"

    @pytest_twisted.ensureDeferred
    async def test_a_killed_container(self, api, spec, kill_container):
        container_id = await self.create(api, spec)
        recorder, _ = await self.spawn(api, container_id, SCRIPT)
        await recorder.wait_for(b"ready")
        await kill_container(container_id)
        await recorder.wait_ended()
        assert recorder.reason.check(ProcessTerminated)
        assert recorder.reason.value.exitCode == 137
        state = await api.container_state(container_id)
        assert (state["Running"], state["OOMKilled"], state["ExitCode"]) == (False, False, 137)
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        assert [c["state"] for c in await api.list_containers(instance)] == ["exited"]
        with pytest.raises(ContainerGone):
            await self.spawn(api, container_id, SCRIPT)
        chunks: list[bytes] = []
        await api.export_workspace(container_id, "/workspace", chunks.append)
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
            assert tar.getmember("workspace").isdir()

    @pytest_twisted.ensureDeferred
    async def test_spawn_exec_in_a_removed_container(self, api, spec):
        container_id = await self.create(api, spec)
        await api.remove_container(container_id)
        recorder = ExecRecorder()
        with pytest.raises(ContainerGone):
            await api.spawn_exec(recorder, container_id, list(SCRIPT), "developer",
                                 "/workspace", {}, None, tty=False)
        assert recorder.events == []

    @pytest_twisted.ensureDeferred
    async def test_run_command_input_output_cap_and_exit(self, api, spec):
        container_id = await self.create(api, spec)
        result = await api.run_command(container_id, SCRIPT_COMMAND, "developer", "/tmp", {},
                                       b"hello", 3, DEADLINE)
        assert (result.stdout, result.stderr, result.exit_code) == (b"hel", b"oop", 3)
        assert (result.truncated_stdout, result.truncated_stderr, result.cut) == (
            True, True, False)
        result = await api.run_command(container_id, SCRIPT_COMMAND, "developer", "/tmp", {})
        assert (result.stdout, result.stderr, result.exit_code) == (b"", b"oops", 3)
        assert (result.truncated_stdout, result.truncated_stderr) == (False, False)

    @pytest_twisted.ensureDeferred
    async def test_run_command_in_a_removed_container(self, api, spec):
        container_id = await self.create(api, spec)
        await api.remove_container(container_id)
        with pytest.raises(ContainerGone):
            await api.run_command(container_id, SCRIPT_COMMAND, "developer", "/tmp", {})

    @pytest_twisted.ensureDeferred
    async def test_export_streams_a_tar_of_the_path(self, api, spec, put_file):
        container_id = await self.create(api, spec)
        await put_file(container_id, "/workspace/notes.txt", b"written in the container\n")
        chunks: list[bytes] = []
        await api.export_workspace(container_id, "/workspace", chunks.append)
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
            assert tar.getmember("workspace").isdir()
            notes = tar.getmember("workspace/notes.txt")
            assert notes.isfile()
            assert tar.extractfile(notes).read() == b"written in the container\n"

    @pytest_twisted.ensureDeferred
    async def test_export_of_a_removed_container(self, api, spec):
        container_id = await self.create(api, spec)
        await api.remove_container(container_id)
        chunks: list[bytes] = []
        with pytest.raises(ContainerGone):
            await api.export_workspace(container_id, "/workspace", chunks.append)
        assert chunks == []

    @pytest_twisted.ensureDeferred
    async def test_ensure_network_creates_it_once(self, api, network_name):
        assert await api.inspect_network(network_name) is None
        options = {"com.docker.network.bridge.enable_icc": "false"}
        labels = {"io.capsule.network": "contract"}
        network, created = await api.ensure_network(network_name, options, labels)
        assert created is True
        assert network["name"] == network_name and network["driver"] == "bridge"
        assert network["options"]["com.docker.network.bridge.enable_icc"] == "false"
        assert network["labels"] == labels
        assert len(network["subnets"]) == 1 and len(network["gateways"]) == 1
        again, created = await api.ensure_network(network_name, {}, {})
        assert created is False
        assert again == network
        assert await api.inspect_network(network_name) == network

    # -- kept sessions, forks and snapshots ----------------------------------

    @pytest_twisted.ensureDeferred
    async def test_stop_keeps_the_files_and_start_runs_again(self, api, spec, put_file):
        container_id = await self.create(api, spec, "kept")
        await put_file(container_id, "/workspace/notes.txt", b"before the stop")
        assert await api.stop_container(container_id, timeout=1) is True
        state = await api.container_state(container_id)
        assert state["Running"] is False
        with pytest.raises(ContainerGone):
            await self.spawn(api, container_id, SCRIPT)
        # Stopping a stopped container is no error.
        assert await api.stop_container(container_id, timeout=1) is True
        assert await api.read_file(container_id, "/workspace/notes.txt", 1024) == (
            b"before the stop")
        await api.start_container(container_id)
        assert (await api.container_state(container_id))["Running"] is True
        recorder, process = await self.spawn(api, container_id, SCRIPT)
        await recorder.wait_for(b"ready")
        process.write(b"again\n")
        await recorder.wait_ended()
        assert recorder.output[1] == b"readygot again"
        assert await api.read_file(container_id, "/workspace/notes.txt", 1024) == (
            b"before the stop")

    @pytest_twisted.ensureDeferred
    async def test_stop_and_start_of_a_removed_container(self, api, spec):
        container_id = await self.create(api, spec)
        await api.remove_container(container_id)
        assert await api.stop_container(container_id, timeout=1) is False
        with pytest.raises(ContainerGone):
            await api.start_container(container_id)

    @pytest_twisted.ensureDeferred
    async def test_kept_containers_are_the_stopped_ones_with_their_sizes(
            self, api, spec, put_file):
        running = await self.create(api, spec, "kept")
        stopped = await self.create(api, spec, "kept")
        other = await self.create(api, spec, "other")
        await put_file(stopped, "/workspace/notes.txt", b"x" * 5000)
        await api.stop_container(stopped, timeout=1)
        await api.stop_container(other, timeout=1)
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        kept = await api.kept_containers({**instance, LABEL_ROLE: "kept"})
        assert [c["id"] for c in kept] == [stopped]
        found = kept[0]
        assert found["state"] == "exited"
        assert found["labels"][LABEL_ROLE] == "kept"
        assert re.fullmatch(r"capsule-[0-9a-f]{32}", found["name"])
        assert 0 < found["created"] <= found["finished"]
        assert found["size"] is None or found["size"] >= 5000
        assert sorted(c["id"] for c in await api.kept_containers(instance)) == sorted(
            [stopped, other])
        await api.start_container(stopped)
        assert await api.kept_containers({**instance, LABEL_ROLE: "kept"}) == []
        assert running not in [c["id"] for c in await api.kept_containers(instance)]

    @pytest_twisted.ensureDeferred
    async def test_put_file_and_read_file_running_and_stopped(self, api, spec):
        container_id = await self.create(api, spec)
        # Its directories are made.
        await api.put_file(container_id, SCREEN_PATH, b"the screen\r\n")
        assert await api.read_file(container_id, SCREEN_PATH, 1024) == b"the screen\r\n"
        # At most the last max_bytes.
        assert await api.read_file(container_id, SCREEN_PATH, 6) == b"reen\r\n"
        assert await api.read_file(container_id, "/workspace/none", 1024) is None
        await api.stop_container(container_id, timeout=1)
        await api.put_file(container_id, SCREEN_PATH, b"saved while stopped")
        await api.put_file(container_id, "/workspace/a/b/c.txt", b"deep")
        assert await api.read_file(container_id, SCREEN_PATH, 1024) == b"saved while stopped"
        assert await api.read_file(container_id, "/workspace/a/b/c.txt", 10) == b"deep"
        await api.start_container(container_id)
        assert await api.read_file(container_id, SCREEN_PATH, 1024) == b"saved while stopped"

    @pytest.mark.parametrize("path", ["relative/file", "/workspace/../etc/passwd",
                                      "/workspace//file", "/", "/workspace/\0file"])
    @pytest_twisted.ensureDeferred
    async def test_file_paths_are_absolute_and_normal(self, api, spec, path):
        container_id = await self.create(api, spec)
        with pytest.raises(ValueError):
            await api.put_file(container_id, path, b"x")
        with pytest.raises(ValueError):
            await api.read_file(container_id, path, 10)

    @pytest_twisted.ensureDeferred
    async def test_files_of_a_removed_container(self, api, spec):
        container_id = await self.create(api, spec)
        await api.remove_container(container_id)
        with pytest.raises(ContainerGone):
            await api.put_file(container_id, SCREEN_PATH, b"x")
        with pytest.raises(ContainerGone):
            await api.read_file(container_id, SCREEN_PATH, 10)

    @pytest_twisted.ensureDeferred
    async def test_a_symlink_in_the_container_is_never_followed(
            self, api, spec, make_symlink):
        """
        The container's user can make any path a link to anywhere: reading
        gives nothing (as if there were no file), writing is refused, and
        nothing is read or written where the link points.
        """
        container_id = await self.create(api, spec)
        await make_symlink(container_id, "/workspace/screen", "/etc/passwd")
        assert await api.read_file(container_id, "/workspace/screen", 4096) is None
        await make_symlink(container_id, "/workspace/dir", "/etc")
        assert await api.read_file(container_id, "/workspace/dir/passwd", 4096) is None
        await api.stop_container(container_id, timeout=1)
        with pytest.raises(DockerError):
            await api.put_file(container_id, "/workspace/screen", b"root::0:0::/:/bin/sh\n")
        with pytest.raises(DockerError):
            await api.put_file(container_id, "/workspace/dir/passwd", b"root::0:0::/:/bin/sh\n")
        passwd = await api.read_file(container_id, "/etc/passwd", 1 << 20)
        assert passwd is None or b"root::0:0" not in passwd
        assert await api.read_file(container_id, "/etc/screen", 10) is None

    @pytest_twisted.ensureDeferred
    async def test_container_cpu_grows_while_it_works(self, api, spec, burn_cpu):
        container_id = await self.create(api, spec)
        before = await api.container_cpu(container_id)
        assert isinstance(before, float) and before >= 0.0
        await burn_cpu(container_id)
        after = await api.container_cpu(container_id)
        assert after > before + 0.1
        await api.remove_container(container_id)
        assert await api.container_cpu(container_id) is None

    @pytest_twisted.ensureDeferred
    async def test_container_cpu_of_an_unreachable_engine_is_unknown(self, unreachable_api):
        assert await unreachable_api.container_cpu("0" * 64) is None

    def snapshot_labels(self, spec, name: str) -> dict:
        return {**spec.labels, LABEL_SNAPSHOT: name}

    @pytest_twisted.ensureDeferred
    async def test_snapshot_of_the_writable_layer(self, api, spec, put_file):
        source = await self.create(api, spec, "source")
        await put_file(source, "/workspace/notes.txt", b"in the layer")
        tag = f"contract-{uuid.uuid4().hex[:12]}"
        labels = self.snapshot_labels(spec, "layer")
        snapshot = await api.snapshot_container(source, SNAPSHOT_REPOSITORY, tag, labels)
        assert isinstance(snapshot, Snapshot)
        assert snapshot.image == f"{SNAPSHOT_REPOSITORY}:{tag}"
        assert snapshot.volumes == {} and snapshot.name == "layer"
        assert {k: snapshot.labels.get(k) for k in labels} == labels
        assert snapshot.created > 0
        assert await api.image_exists(snapshot.image) is True
        fork = await self.create(api, replace(spec, image=snapshot.image), "fork")
        assert await api.read_file(fork, "/workspace/notes.txt", 100) == b"in the layer"
        await api.put_file(fork, "/workspace/notes.txt", b"changed in the fork")
        assert await api.read_file(source, "/workspace/notes.txt", 100) == b"in the layer"
        listed = await api.list_snapshots({LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]})
        assert [s.image for s in listed] == [snapshot.image]
        assert listed[0].name == "layer"
        assert await api.list_snapshots({**labels, LABEL_SNAPSHOT: "other"}) == []

    @pytest_twisted.ensureDeferred
    async def test_snapshot_copies_the_anonymous_volumes(self, api, spec):
        private = replace(spec, read_only_root=True)
        source = await self.create(api, private, "source")
        await api.put_file(source, "/workspace/notes.txt", b"in the volume")
        await api.put_file(source, "/home/developer/.profile-extra", b"at home")
        # Snapshots of a stopped container too.
        await api.stop_container(source, timeout=1)
        tag = f"contract-{uuid.uuid4().hex[:12]}"
        snapshot = await api.snapshot_container(source, SNAPSHOT_REPOSITORY, tag,
                                                self.snapshot_labels(spec, "volumes"))
        assert sorted(snapshot.volumes) == ["/home/developer", "/workspace"]
        assert len(set(snapshot.volumes.values())) == 2
        forked = _from_snapshot(private, snapshot)
        fork = await self.create(api, forked, "fork")
        usage = await api.disk_usage({LABEL_INSTANCE: spec.labels[LABEL_INSTANCE],
                                      LABEL_ROLE: "fork"})
        assert sorted((m.destination, m.name) for m in usage.mounts[fork]) == sorted(
            snapshot.volumes.items())
        assert await api.read_file(fork, "/workspace/notes.txt", 100) == b"in the volume"
        assert await api.read_file(fork, "/home/developer/.profile-extra", 100) == b"at home"
        # The copies are the fork's own.
        await api.put_file(fork, "/workspace/notes.txt", b"the fork's")
        await api.start_container(source)
        await api.put_file(source, "/home/developer/.profile-extra", b"the source's")
        assert await api.read_file(source, "/workspace/notes.txt", 100) == b"in the volume"
        assert await api.read_file(fork, "/home/developer/.profile-extra", 100) == b"at home"

    @pytest_twisted.ensureDeferred
    async def test_a_snapshot_of_a_fork_copies_the_copies(self, api, spec):
        private = replace(spec, read_only_root=True)
        source = await self.create(api, private, "source")
        await api.put_file(source, "/workspace/notes.txt", b"first")
        first = await api.snapshot_container(source, SNAPSHOT_REPOSITORY,
                                             f"contract-{uuid.uuid4().hex[:12]}",
                                             self.snapshot_labels(spec, "first"))
        fork = await self.create(api, _from_snapshot(private, first), "fork")
        second = await api.snapshot_container(fork, SNAPSHOT_REPOSITORY,
                                              f"contract-{uuid.uuid4().hex[:12]}",
                                              self.snapshot_labels(spec, "second"))
        assert sorted(second.volumes) == sorted(first.volumes)
        assert not set(second.volumes.values()) & set(first.volumes.values())
        again = await self.create(api, _from_snapshot(private, second), "again")
        await api.put_file(again, "/workspace/notes.txt", b"third")
        assert await api.read_file(fork, "/workspace/notes.txt", 100) == b"first"
        # The first snapshot's image tag goes; what the fork uses stays.
        assert await api.remove_snapshot(first) is True
        assert await api.read_file(fork, "/workspace/notes.txt", 100) == b"first"
        await api.put_file(fork, "/workspace/more.txt", b"still the fork's")
        assert await api.read_file(fork, "/workspace/more.txt", 100) == b"still the fork's"

    @pytest_twisted.ensureDeferred
    async def test_remove_snapshot_removes_its_image_and_volumes(self, api, spec):
        private = replace(spec, read_only_root=True)
        source = await self.create(api, private, "source")
        await api.put_file(source, "/workspace/notes.txt", b"kept")
        tag = f"contract-{uuid.uuid4().hex[:12]}"
        snapshot = await api.snapshot_container(source, SNAPSHOT_REPOSITORY, tag,
                                                self.snapshot_labels(spec, "removed"))
        assert await api.remove_snapshot(snapshot) is True
        assert await api.image_exists(snapshot.image) is False
        assert await api.list_snapshots({LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}) == []
        forked = replace(_from_snapshot(private, snapshot), image=spec.image)
        # Its volumes are gone: a container naming them gets new, empty ones.
        fork = await self.create(api, forked, "fork")
        assert await api.read_file(fork, "/workspace/notes.txt", 100) is None
        await api.remove_container(fork)
        assert await api.remove_snapshot(snapshot) is False
        # The source is as it was.
        assert await api.read_file(source, "/workspace/notes.txt", 100) == b"kept"

    @pytest_twisted.ensureDeferred
    async def test_prune_removes_what_a_removed_fork_leaves(self, api, spec):
        private = replace(spec, read_only_root=True)
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        source = await self.create(api, private, "source")
        await api.put_file(source, "/workspace/notes.txt", b"kept")
        named = await api.snapshot_container(source, SNAPSHOT_REPOSITORY,
                                             f"contract-{uuid.uuid4().hex[:12]}",
                                             self.snapshot_labels(spec, "named"))
        # A fork: a snapshot for the new container, untagged once it exists.
        passing = await api.snapshot_container(source, SNAPSHOT_REPOSITORY,
                                               f"contract-{uuid.uuid4().hex[:12]}",
                                               self.snapshot_labels(spec, "fork"))
        fork = await self.create(api, _from_snapshot(private, passing), "fork")
        await api.remove_snapshot(passing)
        assert await api.prune_snapshots(instance, grace=0) == 0
        assert await api.read_file(fork, "/workspace/notes.txt", 100) == b"kept"
        await api.remove_container(fork)
        # The fork's volumes and image go; the named snapshot stays whole.
        assert await api.prune_snapshots(instance, grace=0) >= 2
        assert await api.prune_snapshots(instance, grace=0) == 0
        assert [s.image for s in await api.list_snapshots(instance)] == [named.image]
        again = await self.create(api, _from_snapshot(private, named), "again")
        assert await api.read_file(again, "/workspace/notes.txt", 100) == b"kept"
        gone = await self.create(api, replace(_from_snapshot(private, passing),
                                              image=spec.image), "gone")
        assert await api.read_file(gone, "/workspace/notes.txt", 100) is None

    @pytest_twisted.ensureDeferred
    async def test_sessions_from_a_named_snapshot_leave_it_as_it_was(self, api, spec):
        private = replace(spec, read_only_root=True)
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        source = await self.create(api, private, "source")
        await api.put_file(source, "/workspace/notes.txt", b"as taken")
        named = await api.snapshot_container(source, SNAPSHOT_REPOSITORY,
                                             f"contract-{uuid.uuid4().hex[:12]}",
                                             self.snapshot_labels(spec, "named"))
        copies = await api.copy_snapshot_volumes(named, instance)
        assert sorted(copies) == sorted(named.volumes)
        assert not set(copies.values()) & set(named.volumes.values())
        # Copies just made wait for the container that mounts them.
        await api.prune_snapshots(instance)
        first = await self.create(api, replace(_from_snapshot(private, named), volumes=tuple(
            (name, mount) for mount, name in copies.items())), "first")
        assert await api.read_file(first, "/workspace/notes.txt", 100) == b"as taken"
        await api.put_file(first, "/workspace/notes.txt", b"changed")
        again = await api.copy_snapshot_volumes(named, instance)
        second = await self.create(api, replace(_from_snapshot(private, named), volumes=tuple(
            (name, mount) for mount, name in again.items())), "second")
        assert await api.read_file(second, "/workspace/notes.txt", 100) == b"as taken"
        await api.remove_container(first)
        assert await api.prune_snapshots(instance, grace=0) == len(copies)
        await api.remove_snapshot(named)
        with pytest.raises(DockerError):
            await api.copy_snapshot_volumes(named, instance)

    # -- forks ---------------------------------------------------------------

    @pytest.mark.parametrize("fast", [True, False], ids=["on-host", "by-snapshot"])
    @pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
    @pytest_twisted.ensureDeferred
    async def test_a_fork_has_the_sources_files(self, api, spec, shape_files, file_tree,
                                                fast, running):
        """
        The writable layer comes whole: a file of the image deleted stays
        deleted, a directory of the image replaced stays replaced, links
        stay links, hard links one file, modes and owners as they were; from
        a running or a stopped source, either way the engine copies.
        """
        source = await self.create(api, spec, "source")
        await shape_files(source)
        tree = await file_tree(source)
        assert tree["/etc/issue"] == "absent" and tree["/etc/skel/.bashrc"] == "absent"
        assert tree["/etc/skel/only"] != "absent" and tree["/workspace/link"] != "absent"
        if not running:
            await api.stop_container(source, timeout=1)
        fork = await api.fork_container(source, str(uuid.uuid4()), _labelled(spec, "fork"),
                                        fast=fast)
        assert await file_tree(fork) == tree
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        listed = await api.list_containers({**instance, LABEL_ROLE: "fork"})
        assert [(c["id"], c["state"]) for c in listed] == [(fork, "running")]
        assert (await api.container_state(source))["Running"] is running
        # Each its own from now on.
        await api.put_file(fork, "/workspace/a", b"the fork's")
        await api.put_file(source, "/workspace/more", b"the source's")
        assert await api.read_file(source, "/workspace/a", 100) == b"a\n"
        assert await api.read_file(fork, "/workspace/more", 100) is None
        # Nothing else is left: no other container, no snapshot.
        assert sorted(c["id"] for c in await api.list_containers(instance)) == sorted(
            [source, fork])
        assert await api.list_snapshots(instance) == []

    @pytest.mark.parametrize("fast", [True, False], ids=["on-host", "by-snapshot"])
    @pytest_twisted.ensureDeferred
    async def test_a_fork_copies_the_anonymous_volumes(self, api, spec, fast):
        private = replace(spec, read_only_root=True)
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        source = await self.create(api, private, "source")
        await api.put_file(source, "/workspace/notes.txt", b"in the volume")
        await api.put_file(source, "/home/developer/.profile-extra", b"at home")
        fork = await api.fork_container(source, str(uuid.uuid4()), _labelled(private, "fork"),
                                        fast=fast)
        usage = await api.disk_usage(instance)
        assert sorted(m.destination for m in usage.mounts[fork]) == [
            "/home/developer", "/workspace"]
        # The fork's container names the copies it owns.
        listed = await api.list_containers({**instance, LABEL_ROLE: "fork"})
        assert listed[0]["labels"]["io.capsule.own-volumes"] == ",".join(
            f"{m.destination}={m.name}" for m in sorted(usage.mounts[fork],
                                                       key=lambda m: m.destination))
        assert not {m.name for m in usage.mounts[fork]} & {m.name for m in usage.mounts[source]}
        assert await api.read_file(fork, "/workspace/notes.txt", 100) == b"in the volume"
        assert await api.read_file(fork, "/home/developer/.profile-extra", 100) == b"at home"
        await api.put_file(fork, "/workspace/notes.txt", b"the fork's")
        await api.put_file(source, "/home/developer/.profile-extra", b"the source's")
        assert await api.read_file(source, "/workspace/notes.txt", 100) == b"in the volume"
        assert await api.read_file(fork, "/home/developer/.profile-extra", 100) == b"at home"
        # A fork of the fork copies its copies.
        again = await api.fork_container(fork, str(uuid.uuid4()), _labelled(private, "again"),
                                         fast=fast)
        assert await api.read_file(again, "/workspace/notes.txt", 100) == b"the fork's"
        # The copies outlive the fork, until pruned.
        assert await api.prune_snapshots(instance, grace=0) == 0
        await api.remove_container(again)
        await api.remove_container(fork)
        assert await api.prune_snapshots(instance, grace=0) >= 4
        assert await api.read_file(source, "/workspace/notes.txt", 100) == b"in the volume"

    @pytest_twisted.ensureDeferred
    async def test_a_fork_shares_the_named_volumes_its_spec_mounts(self, api, spec):
        shared = f"capsule-contract-{uuid.uuid4().hex[:12]}"
        named = replace(spec, volumes=((shared, "/home/developer/.agent"),),
                        volume_labels=dict(spec.labels))
        source = await self.create(api, named, "source")
        await api.put_file(source, "/home/developer/.agent/state", b"shared")
        fork = await api.fork_container(source, str(uuid.uuid4()), _labelled(named, "fork"))
        usage = await api.disk_usage({LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]})
        assert [m.name for m in usage.mounts[fork]] == [shared]
        assert await api.read_file(fork, "/home/developer/.agent/state", 100) == b"shared"

    @pytest.mark.parametrize("fast", [True, False], ids=["on-host", "by-snapshot"])
    @pytest_twisted.ensureDeferred
    async def test_a_fork_is_of_the_sources_image(self, api, spec, fast):
        """
        Whatever image the spec names (even one that is not there): the
        source's files lie on the source's image.
        """
        source = await self.create(api, spec, "source")
        await api.put_file(source, "/workspace/notes.txt", b"mine")
        other = replace(_labelled(spec, "fork"), image="capsule-contract-no-such-image:missing")
        fork = await api.fork_container(source, str(uuid.uuid4()), other, fast=fast)
        assert await api.read_file(fork, "/workspace/notes.txt", 100) == b"mine"
        assert (await api.container_state(fork))["Running"] is True

    @pytest.mark.parametrize("fast", [True, False], ids=["on-host", "by-snapshot"])
    @pytest_twisted.ensureDeferred
    async def test_a_fork_of_a_removed_container(self, api, spec, fast):
        container_id = await self.create(api, replace(spec, read_only_root=True))
        await api.remove_container(container_id)
        with pytest.raises(ContainerGone):
            await api.fork_container(container_id, str(uuid.uuid4()), spec, fast=fast)
        instance = {LABEL_INSTANCE: spec.labels[LABEL_INSTANCE]}
        assert await api.list_containers(instance) == []
        assert await api.list_snapshots(instance) == []

    @pytest_twisted.ensureDeferred
    async def test_unpause_of_a_container_that_is_not_paused(self, api, spec):
        container_id = await self.create(api, spec)
        assert await api.unpause_container(container_id) is False
        assert (await api.container_state(container_id))["Running"] is True
        await api.remove_container(container_id)
        assert await api.unpause_container(container_id) is False

    @pytest_twisted.ensureDeferred
    async def test_snapshot_of_a_removed_container(self, api, spec):
        container_id = await self.create(api, spec)
        await api.remove_container(container_id)
        with pytest.raises(ContainerGone):
            await api.snapshot_container(container_id, SNAPSHOT_REPOSITORY,
                                         f"contract-{uuid.uuid4().hex[:12]}",
                                         self.snapshot_labels(spec, "gone"))

    @pytest.mark.parametrize("call", [
        lambda api, spec: api.ping(),
        lambda api, spec: api.info(),
        lambda api, spec: api.image_exists(spec.image),
        lambda api, spec: api.create_session_container(str(uuid.uuid4()), spec),
        lambda api, spec: api.remove_container("0" * 64),
        lambda api, spec: api.list_containers(spec.labels),
        lambda api, spec: api.container_state("0" * 64),
        lambda api, spec: api.spawn_exec(ExecRecorder(), "0" * 64, list(SCRIPT), "developer",
                                         "/workspace", {}, None, tty=False),
        lambda api, spec: api.export_workspace("0" * 64, "/workspace", lambda chunk: None),
        lambda api, spec: api.run_command("0" * 64, SCRIPT_COMMAND, "developer", "/tmp", {}),
        lambda api, spec: api.inspect_network("capsule"),
        lambda api, spec: api.ensure_network("capsule", {}, {}),
        lambda api, spec: api.stop_container("0" * 64),
        lambda api, spec: api.start_container("0" * 64),
        lambda api, spec: api.kept_containers(spec.labels),
        lambda api, spec: api.put_file("0" * 64, SCREEN_PATH, b"x"),
        lambda api, spec: api.read_file("0" * 64, SCREEN_PATH, 10),
        lambda api, spec: api.snapshot_container("0" * 64, SNAPSHOT_REPOSITORY, "t", {}),
        lambda api, spec: api.list_snapshots(spec.labels),
        lambda api, spec: api.remove_snapshot(Snapshot(f"{SNAPSHOT_REPOSITORY}:t", {}, {}, 0.0)),
        lambda api, spec: api.prune_snapshots(spec.labels),
        lambda api, spec: api.copy_snapshot_volumes(
            Snapshot(f"{SNAPSHOT_REPOSITORY}:t", {"/workspace": "0" * 64}, {}, 0.0), {}),
        lambda api, spec: api.fork_container("0" * 64, str(uuid.uuid4()), spec),
        lambda api, spec: api.unpause_container("0" * 64),
    ], ids=["ping", "info", "image_exists", "create", "remove", "list", "state", "spawn_exec",
            "export", "run_command", "inspect_network", "ensure_network", "stop", "start",
            "kept", "put_file", "read_file", "snapshot", "list_snapshots", "remove_snapshot",
            "prune_snapshots", "copy_snapshot_volumes", "fork", "unpause"])
    @pytest_twisted.ensureDeferred
    async def test_an_unreachable_engine(self, unreachable_api, spec, call):
        d = call(unreachable_api, spec)
        d.addTimeout(DEADLINE, reactor)
        with pytest.raises(DockerUnavailable):
            await d
