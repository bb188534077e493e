"""
Fakes that tests share: an in-memory Docker engine and exec, and a client
that records what a session tells it.
"""

from __future__ import annotations

import io
import posixpath
import struct
import tarfile
import time
import uuid
from dataclasses import replace

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from zope.interface import implementer

from capsule.engine.command import OutputCollector
from capsule.core.diskuse import DiskUsage, Mount
from capsule.engine.docker import READ_ONLY_VOLUMES
from capsule.core.errors import ContainerGone, DockerError, DockerUnavailable, ImageMissing
from capsule.core.interfaces import IDockerAPI, IExecProcess, ISessionClient
from capsule.core.kept import Snapshot
from capsule.core.keeper import SECRET_LABEL, FrameReader, parse_secret


@implementer(IExecProcess)
class FakeExecProcess:
    """
    An exec.  With C{keeper}, it behaves as capsule-keeper's relay: output
    goes out in C{o} frames, the exit status in an C{x} frame, and the
    C{i}/C{w} frames written to it are decoded into C{written} and
    C{resizes}.  With a C{program} (see L{FakeDockerAPI.programs}), what is
    written to it is also handed to the program, which answers through
    L{emit} and L{exit}.
    """

    def __init__(self, process_protocol, container_id: str, argv, size,
                 keeper: bool = False, tty: bool = True, program=None) -> None:
        self.exec_id = f"exec-{container_id}"
        self.container_id = container_id
        self.process_protocol = process_protocol
        self.argv = tuple(argv)
        self.size = size
        self.keeper = keeper
        self.tty = tty
        self.program = program
        self.written: list[bytes] = []
        self.raw_written: list[bytes] = []  # every write, frames and all
        self.resizes: list[tuple[int, int]] = []
        self.paused = False
        self.input_producer = None
        self.connected = True
        self._frames = FrameReader()

    def emit(self, data: bytes, fd: int = 1) -> None:
        """
        The program writes C{data} to C{fd} (1 or 2); with a TTY, both end
        up on fd 1, as they do on a terminal.
        """
        if self.keeper and fd == 1:
            data = b"o" + struct.pack(">I", len(data)) + data
        self.process_protocol.childDataReceived(1 if self.tty else fd, data)

    def exit(self, code: int | None) -> None:
        """
        The shell ended with C{code}; C{None}: the exec died without a word
        (its container was killed).
        """
        if self.keeper and code is not None:
            self.process_protocol.childDataReceived(1, b"x" + struct.pack(">II", 4, code))
            code = 0
        self.end(code)

    def end(self, code: int | None) -> None:
        """
        The exec itself ended with C{code} (C{None}: Docker could not say),
        as the engine reports it: C{processEnded}, once.
        """
        if not self.connected:
            return
        self.connected = False
        if code == 0:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(exitCode=code))
        self.process_protocol.processEnded(reason)

    def _start(self) -> None:
        if self.program is not None:
            self.program.started(self)

    def write(self, data: bytes) -> None:
        self.raw_written.append(data)
        if self.program is not None and self.connected:
            self.program.received(self, data)
        if not self.keeper:
            self.written.append(data)
            return
        for kind, payload in self._frames.feed(data):
            if kind == b"i":
                self.written.append(payload)
            elif kind == b"w":
                self.resizes.append(struct.unpack(">HH", payload))

    def resize(self, cols: int, rows: int) -> None:
        self.resizes.append((cols, rows))

    def throttle_input(self, producer) -> None:
        self.input_producer = producer

    def loseConnection(self) -> None:
        """
        As with the engine, the exec's end follows: a keeper's relay exits
        253 when its input ends; a program decides (C{closed(process)});
        an exec of neither is reported ended without a code, as the engine
        does for a program that is still running.
        """
        if not self.connected:
            return
        if self.keeper:
            self.end(253)
        elif self.program is not None and hasattr(self.program, "closed"):
            self.program.closed(self)
        else:
            self.end(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.loseConnection()


@implementer(IDockerAPI)
class FakeDockerAPI:
    """
    Containers are dicts; every call answers at once unless C{hold_create}
    is set, in which case creates wait until C{release_create()}; an exec
    connects when its caller waits on it (or, while C{hold_exec} is set, at
    C{release_exec()}), and its first bytes follow its Deferred.  While
    C{reachable} is false, every call fails with L{DockerUnavailable}, as
    the engine's calls do.

    @ivar programs: what an exec runs, by its argv (a tuple): a callable
        making an object with C{started(process)} and C{received(process,
        data)}.  An exec of any other argv does nothing by itself; tests
        drive it through its L{FakeExecProcess}.
    """

    host = "fake://docker"

    def __init__(self, images=("capsule-runtime:latest",)) -> None:
        self.images = set(images)
        self.containers: dict[str, dict] = {}
        # container id -> the address its keeper is reached at (none: the relay exec)
        self.addresses: dict[str, str] = {}
        # ... and of every other container (None: they have none)
        self.default_address: str | None = None
        self.removed: list[str] = []
        self.processes: list[FakeExecProcess] = []
        self.programs: dict[tuple[str, ...], object] = {}
        self.reachable = True
        self.hold_create = False
        self.live_restore = True
        # docker info's SecurityOptions: user namespaces on, so that whether
        # this host has an account of the sessions' uid matters to no test
        # but those that set them off.
        self.security_options = ["name=seccomp,profile=default", "name=userns"]
        # While set, execs connect only at release_exec().
        self.hold_exec = False
        # The channels a keeper asked for them carries (None: an older keeper).
        self.keeper_channels: int | None = 32
        self._held_execs: list[tuple[FakeExecProcess, Deferred]] = []
        # While set, listings wait until release_list().
        self.hold_list = False
        self._held_lists: list[tuple[Deferred, dict]] = []
        self._held: list[tuple[Deferred, str]] = []
        # Per container: the (first held, end) output offsets its keeper reports.
        self.keeper_output: dict[str, tuple[int, int]] = {}
        # Networks by name, as inspect_network describes them.
        self.networks: dict[str, dict] = {}
        # Containers' addresses by network, as network_addresses tells them.
        self.addresses: dict[str, dict[str, str]] = {}
        # What run_command runs, by argv, and what it ran.
        self.commands: dict[tuple[str, ...], object] = {}
        self.commands_run: list[dict] = []
        # Volumes' sizes disk_usage() gives, by name, and what it was asked
        # (whether volumes' sizes were).
        self.volume_sizes: dict[str, int] = {}
        self.disk_usage_calls: list[bool] = []
        # Snapshots by image (repository:tag), each with the files it
        # copied; volumes (the snapshots' copies) by name, with their labels.
        self.snapshots: dict[str, Snapshot] = {}
        self.snapshot_files: dict[str, dict[str, bytes]] = {}
        self.volumes: dict[str, dict] = {}
        # The CPU seconds container_cpu tells, by container (a running
        # container nobody set has used 0.0; None: the engine cannot say).
        self.cpu: dict[str, float | None] = {}
        # What was called, in order: ("stop", id), ("start", id), ...
        self.keep_calls: list[tuple] = []
        self._next = 0

    def _check(self):
        if not self.reachable:
            return fail(DockerUnavailable("cannot reach the Docker engine at fake://docker"))
        return None

    def ping(self):
        return self._check() or succeed({"Version": "fake"})

    def container_sizes(self, labels):
        return self._check() or succeed({
            c["id"]: c.get("size_rw", 0) for c in self.containers.values()
            if c["state"] == "running" and all(c["labels"].get(k) == v
                                               for k, v in labels.items())})

    def disk_usage(self, labels, volumes=False):
        """
        As the engine does: a container's C{size_rw} and C{spec}'s volumes;
        volumes' sizes from C{volume_sizes} (a volume a container mounts
        and nobody sized is empty).
        """
        failed = self._check()
        if failed:
            return failed
        found = [c for c in self.containers.values()
                 if c["state"] == "running" and all(c["labels"].get(k) == v
                                                    for k, v in labels.items())]
        mounts = {c["id"]: _mounts(c) for c in found}
        sizes = {}
        if volumes:
            sizes = {m.name: 0 for ms in mounts.values() for m in ms}
            sizes.update(self.volume_sizes)
        self.disk_usage_calls.append(volumes)
        return succeed(DiskUsage(layers={c["id"]: c.get("size_rw", 0) for c in found},
                                 mounts=mounts, volumes=sizes))

    def info(self):
        return self._check() or succeed({"LiveRestoreEnabled": self.live_restore,
                                         "SecurityOptions": list(self.security_options)})

    def image_exists(self, image):
        return self._check() or succeed(image in self.images)

    def create_session_container(self, session_id, spec):
        failed = self._check()
        if failed:
            return failed
        if spec.image not in self.images:
            return fail(ImageMissing(f"the session image {spec.image} is missing"))
        self._next += 1
        container_id = f"container{self._next:04d}"
        self.containers[container_id] = {
            "id": container_id, "name": f"capsule-{uuid.uuid4().hex}",
            "labels": dict(spec.labels), "state": "running", "spec": spec,
            # A snapshot's image brings the files it copied.
            "files": dict(self.snapshot_files.get(spec.image, {})),
            "created": time.time(), "finished": 0.0,
        }
        if self.hold_create:
            d = Deferred()
            self._held.append((d, container_id))
            return d
        return succeed(container_id)

    def inspect_network(self, name):
        failed = self._check()
        if failed:
            return failed
        network = self.networks.get(name)
        return succeed(None if network is None else dict(network))

    def network_addresses(self, name):
        failed = self._check()
        if failed:
            return failed
        return succeed(dict(self.addresses.get(name, {})))

    def ensure_network(self, name, options, labels, internal=False):
        failed = self._check()
        if failed:
            return failed
        if name in self.networks:
            return succeed((dict(self.networks[name]), False))
        number = len(self.networks) + 20
        self.networks[name] = {
            "id": f"network{len(self.networks) + 1:04d}", "name": name, "driver": "bridge",
            "internal": internal,
            "options": dict(options), "labels": dict(labels),
            "subnets": [f"172.{number}.0.0/16"], "gateways": [f"172.{number}.0.1"],
        }
        return succeed((dict(self.networks[name]), True))

    def release_create(self) -> None:
        held, self._held = self._held, []
        for d, container_id in held:
            d.callback(container_id)

    def add_container(self, container_id: str, labels: dict) -> None:
        self.containers[container_id] = {"id": container_id, "name": container_id,
                                         "labels": dict(labels), "state": "running",
                                         "files": {}, "created": time.time(),
                                         "finished": 0.0}

    def add_file(self, container_id: str, path: str, data: bytes) -> None:
        """
        Put a file (an absolute path) into a container, as a program in it would.
        """
        self.containers[container_id].setdefault("files", {})[path] = data

    def kill_container(self, container_id: str, oom: bool = False) -> None:
        """
        The container dies (killed, or out of memory with C{oom}), as
        C{docker kill} does: it stays, exited with 137, and its execs end
        with 137.
        """
        container = self.containers[container_id]
        container.update(state="exited", exit_code=137, oom=oom, finished=time.time())
        for process in self.processes:
            if process.exec_id == f"exec-{container_id}":
                process.end(137)

    # -- kept sessions, forks and snapshots ----------------------------------

    def stop_container(self, container_id, timeout=10):
        """
        As C{docker stop}: the container stays, exited, with its files;
        its execs end as its processes are killed.
        """
        failed = self._check()
        if failed:
            return failed
        self.keep_calls.append(("stop", container_id))
        container = self.containers.get(container_id)
        if container is None:
            return succeed(False)
        if container["state"] == "running":
            container.update(state="exited", exit_code=143, finished=time.time())
            for process in self.processes:
                if process.exec_id == f"exec-{container_id}":
                    process.end(137)
        return succeed(True)

    def start_container(self, container_id):
        """
        As C{docker start}: running again, its files as they were; its CPU
        counter starts anew (a new cgroup).
        """
        failed = self._check()
        if failed:
            return failed
        self.keep_calls.append(("start", container_id))
        container = self.containers.get(container_id)
        if container is None:
            return fail(ContainerGone("the session's container no longer exists"))
        if container["state"] != "running":
            container.update(state="running", exit_code=0, oom=False)
            self.cpu.pop(container_id, None)
        return succeed(None)

    def kept_containers(self, labels):
        failed = self._check()
        if failed:
            return failed
        return succeed([
            {"id": c["id"], "name": c["name"], "labels": dict(c["labels"]),
             "state": c["state"], "created": c.get("created", 0.0),
             "finished": c.get("finished", 0.0),
             "size": c.get("size_rw", sum(len(data) for data in c.get("files", {}).values()))}
            for c in self.containers.values()
            if c["state"] != "running"
            and all(c["labels"].get(k) == v for k, v in labels.items())
        ])

    def put_file(self, container_id, path, data, mode=0o600, uid=1000, gid=1000):
        failed = self._check()
        if failed:
            return failed
        container = self.containers.get(container_id)
        if container is None:
            return fail(ContainerGone("the session's container no longer exists"))
        if not _normal_path(path):
            return fail(ValueError(f"not a normal absolute path of a file: {path!r}"))
        if _through_link(container, path):
            return fail(DockerError(
                f"refused to write {path} in the container: it is, or is under, a symbolic link"))
        container.setdefault("files", {})[path] = bytes(data)
        container.setdefault("modes", {})[path] = (mode, uid, gid)
        return succeed(None)

    def read_file(self, container_id, path, max_bytes):
        failed = self._check()
        if failed:
            return failed
        if not _normal_path(path):
            return fail(ValueError(f"not a normal absolute path of a file: {path!r}"))
        container = self.containers.get(container_id)
        if container is None:
            return fail(ContainerGone("the session's container no longer exists"))
        data = container.get("files", {}).get(path)
        if data is None or _through_link(container, path):
            return succeed(None)
        return succeed(data[-max_bytes:] if max_bytes else b"")

    def add_symlink(self, container_id: str, path: str, target: str) -> None:
        """
        Make C{path} a symbolic link to C{target} in a container, as a
        program in it could: capsule's file calls never follow it.
        """
        self.containers[container_id].setdefault("links", {})[path] = target

    def set_cpu(self, container_id: str, seconds: float | None) -> None:
        """
        The container's processes used C{seconds} of CPU so far (C{None}:
        the engine cannot say).
        """
        self.cpu[container_id] = seconds

    def container_cpu(self, container_id):
        if not self.reachable:
            return succeed(None)
        container = self.containers.get(container_id)
        if container is None or container["state"] != "running":
            return succeed(None)
        return succeed(self.cpu.get(container_id, 0.0))

    def snapshot_container(self, container_id, repository, tag, labels):
        """
        The container's files become the image's (each anonymous volume's
        copy is a new volume named in the snapshot); later changes to
        either are the other's no more.
        """
        failed = self._check()
        if failed:
            return failed
        self.keep_calls.append(("snapshot", container_id, f"{repository}:{tag}"))
        container = self.containers.get(container_id)
        if container is None:
            return fail(ContainerGone("the session's container no longer exists"))
        image = f"{repository}:{tag}"
        volumes = {}
        for mount in _mounts(container):
            # Anonymous: the container's own, or a snapshot's copy (named
            # as the engine names anonymous volumes).
            if mount.name.startswith(container_id) or mount.name in self.volumes:
                name = uuid.uuid4().hex + uuid.uuid4().hex
                self.volumes[name] = {"labels": dict(labels), "created": time.time()}
                volumes[mount.destination] = name
        files = dict(container.get("files", {}))
        snapshot = Snapshot(image=image, volumes=volumes, labels=dict(labels),
                            created=time.time(),
                            size=sum(len(data) for data in files.values()))
        self.images.add(image)
        self.snapshots[image] = snapshot
        self.snapshot_files[image] = files
        return succeed(snapshot)

    def fork_container(self, container_id, session_id, spec, fast=True):
        """
        As the engine: a new running container whose files (and links and
        modes) are a copy of the source's, and whose anonymous volumes are
        new copies carrying the spec's labels; the spec's named volumes are
        shared.  Either way the engine's result is the same, and the fake
        makes it so: C{fast} is recorded only.
        """
        failed = self._check()
        if failed:
            return failed
        self.keep_calls.append(("fork", container_id, "host" if fast else "snapshot"))
        source = self.containers.get(container_id)
        if source is None:
            return fail(ContainerGone("the session's container no longer exists"))
        if source.get("spec") is not None:
            # The engine's image is the source's either way (the same
            # image, or the snapshot of it); the fake never removes one a
            # container uses.
            spec = replace(spec, image=source["spec"].image)
        mounted = {target for _, target in spec.volumes}
        copies = []
        for mount in _mounts(source):
            if mount.destination in mounted:
                continue
            if mount.name.startswith(container_id) or mount.name in self.volumes:
                name = uuid.uuid4().hex + uuid.uuid4().hex
                self.volumes[name] = {"labels": {**spec.labels, "io.capsule.volume": "copy"},
                                      "created": time.time()}
                copies.append((name, mount.destination))
        self._next += 1
        new_id = f"container{self._next:04d}"
        labels = {k: v for k, v in spec.labels.items() if k != "io.capsule.own-volumes"}
        if copies:
            labels["io.capsule.own-volumes"] = ",".join(
                f"{mount}={name}" for name, mount in sorted(copies, key=lambda c: c[1]))
        self.containers[new_id] = {
            "id": new_id, "name": f"capsule-{uuid.uuid4().hex}",
            "labels": labels, "state": "running",
            "spec": replace(spec, labels=labels, volumes=spec.volumes + tuple(copies)),
            "files": dict(source.get("files", {})),
            "links": dict(source.get("links", {})),
            "modes": dict(source.get("modes", {})),
            "created": time.time(), "finished": 0.0,
        }
        return succeed(new_id)

    # Replicas: one host is one server (as Docker's).

    def renew_replica(self, replica, seconds):
        return self._check() or succeed(None)

    def drop_replica(self, replica):
        return self._check() or succeed(False)

    def live_replicas(self):
        return self._check() or succeed(set())

    def container_holder(self, container_id):
        return self._check() or succeed(None)

    def claim_container(self, container_id, replica, holder=None, annotations=None,
                        labels=None):
        return self._check() or succeed(True)

    def unpause_container(self, container_id):
        failed = self._check()
        if failed:
            return failed
        container = self.containers.get(container_id)
        if container is None or container["state"] != "paused":
            return succeed(False)
        container["state"] = "running"
        return succeed(True)

    def list_snapshots(self, labels):
        failed = self._check()
        if failed:
            return failed
        return succeed([s for s in self.snapshots.values()
                        if all(s.labels.get(k) == v for k, v in labels.items())])

    def remove_snapshot(self, snapshot):
        failed = self._check()
        if failed:
            return failed
        self.keep_calls.append(("remove_snapshot", snapshot.image))
        existed = self.snapshots.pop(snapshot.image, None) is not None
        self.snapshot_files.pop(snapshot.image, None)
        self.images.discard(snapshot.image)
        # As with the engine: a volume a container uses stays (it is that
        # container's now).
        used = {m.name for c in self.containers.values() for m in _mounts(c)}
        for name in snapshot.volumes.values():
            if name not in used:
                self.volumes.pop(name, None)
        return succeed(existed)

    def copy_snapshot_volumes(self, snapshot, labels):
        failed = self._check()
        if failed:
            return failed
        if snapshot.image not in self.snapshots:
            return fail(DockerError(f"the snapshot {snapshot.image} is gone"))
        copies = {}
        for mount in snapshot.volumes:
            copies[mount] = uuid.uuid4().hex + uuid.uuid4().hex
            self.volumes[copies[mount]] = {"labels": dict(labels), "created": time.time()}
        return succeed(copies)

    def prune_snapshots(self, labels, grace=600.0):
        failed = self._check()
        if failed:
            return failed
        used = {m.name for c in self.containers.values() for m in _mounts(c)}
        named = {name for s in self.snapshots.values() for name in s.volumes.values()}
        now = time.time()
        pruned = [name for name, volume in self.volumes.items()
                  if name not in used and name not in named
                  and now - volume["created"] >= grace
                  and all(volume["labels"].get(k) == v for k, v in labels.items())]
        for name in pruned:
            del self.volumes[name]
        # An untagged image a removed fork used: the fake keeps none.
        return succeed(len(pruned))

    def set_cpu_shares(self, container_id, shares):
        failed = self._check()
        if failed:
            return failed
        container = self.containers.get(container_id)
        if container is None:
            return succeed(False)
        container["cpu_shares"] = shares
        return succeed(True)

    def remove_container(self, container_id):
        failed = self._check()
        if failed:
            return failed
        if getattr(self, "hold_remove", False):
            # An engine slow to remove: the removal waits for release_removes().
            d = Deferred()
            self.__dict__.setdefault("_held_removes", []).append((d, container_id))
            return d
        existed = self.containers.pop(container_id, None) is not None
        if existed:
            self.removed.append(container_id)
        return succeed(existed)

    def release_removes(self):
        """
        Let the removals held by C{hold_remove} finish.
        """
        self.hold_remove = False
        held, self._held_removes = getattr(self, "_held_removes", []), []
        for d, container_id in held:
            existed = self.containers.pop(container_id, None) is not None
            if existed:
                self.removed.append(container_id)
            d.callback(existed)

    def list_containers(self, labels):
        failed = self._check()
        if failed:
            return failed
        if self.hold_list:
            d = Deferred()
            self._held_lists.append((d, labels))
            return d
        return self._listing(labels)

    def release_list(self) -> None:
        """
        Answer the listings held while C{hold_list} was set (and hold no more).
        """
        self.hold_list = False
        held, self._held_lists = self._held_lists, []
        for d, labels in held:
            self._listing(labels).chainDeferred(d)

    def _listing(self, labels):
        return succeed([
            {k: c[k] for k in ("id", "name", "labels", "state")}
            for c in self.containers.values()
            if all(c["labels"].get(k) == v for k, v in labels.items())
        ])

    def container_state(self, container_id):
        failed = self._check()
        if failed:
            return failed
        c = self.containers.get(container_id)
        return succeed(None if c is None else {"Running": c["state"] == "running",
                                               "OOMKilled": c.get("oom", False),
                                               "ExitCode": c.get("exit_code", 0)})

    def keeper_address(self, container_id):
        """
        The container's address (C{addresses}, else C{default_address}:
        none unless a test gives one, so that sessions take the relay exec)
        and its keeper's secret (its label).
        """
        failed = self._check()
        if failed:
            return failed
        c = self.containers.get(container_id)
        if c is None:
            return fail(ContainerGone("the session's container no longer exists"))
        return succeed((self.addresses.get(container_id, self.default_address),
                        parse_secret(c["labels"].get(SECRET_LABEL))))

    def spawn_exec(self, process_protocol, container_id, argv, user, workdir, env, size,
                   tty=True):
        failed = self._check()
        if failed:
            return failed
        container = self.containers.get(container_id)
        if container is None:
            return fail(ContainerGone("the session's container no longer exists"))
        if container["state"] != "running":
            return fail(ContainerGone("the session's container is not running"))
        keeper = argv[0] == "capsule-keeper"
        program = self.programs.get(tuple(argv))
        process = FakeExecProcess(process_protocol, container_id, argv, size, keeper,
                                  tty=tty, program=program() if program else None)
        process.user, process.workdir, process.env = user, workdir, dict(env)
        self.processes.append(process)
        if self.hold_exec:
            d = Deferred()
            self._held_execs.append((process, d))
            return d
        return _StartedWhenAwaited(lambda d: self._connect(process, d))

    def _connect(self, process: FakeExecProcess, d: Deferred) -> None:
        """
        As the engine does once its exec-start upgrade is done: the process
        protocol is connected, the Deferred fires, then the first bytes come.
        """
        process.process_protocol.makeConnection(process)
        d.callback(process)
        if process.keeper:
            # As the keeper does: say where the output resumes.
            argv = process.argv
            wanted = int(argv[argv.index("-o") + 1])
            held_from, end = self.keeper_output.get(process.container_id, (0, 0))
            start = min(max(wanted, held_from), end)
            dropped = start - wanted if wanted < held_from else 0
            # A keeper asked for channels says how many it carries (None:
            # an older keeper, which does not).
            more = (f";channels={self.keeper_channels}"
                    if "CAPSULE_KEEPER_CHANNELS" in process.env
                    and self.keeper_channels is not None else "")
            process.emit(f"\x1b_capsule-keeper;offset={start};dropped={dropped}{more}\x1b\\"
                         .encode())
        process._start()

    def release_exec(self) -> None:
        """
        Connect the execs held while C{hold_exec} was set (and hold no more).
        """
        self.hold_exec = False
        held, self._held_execs = self._held_execs, []
        for process, d in held:
            self._connect(process, d)

    def run_command(self, container_id, argv, user, workdir, env, stdin=b"",
                    max_output=1024 * 1024, timeout=None):
        """
        As the engine does, with what C{commands} says the command does:
        C{commands[tuple(argv)](stdin)} gives C{(stdout, stderr, exit_code)}
        (or a Deferred of it); any other command exits 127.  Each run is
        recorded in C{commands_run}.
        """
        failed = self._check()
        if failed:
            return failed
        container = self.containers.get(container_id)
        if container is None or container["state"] != "running":
            return fail(ContainerGone("the session's container is not running"))
        return Deferred.fromCoroutine(self._run_command(
            container_id, tuple(argv), user, workdir, dict(env), stdin, max_output))

    async def _run_command(self, container_id, argv, user, workdir, env, stdin, max_output):
        if callable(stdin):
            consumer = _Collected()
            await stdin(consumer)
            stdin = bytes(consumer.data)
        self.commands_run.append({"container_id": container_id, "argv": argv, "user": user,
                                  "workdir": workdir, "env": env, "stdin": stdin})
        command = self.commands.get(argv)
        if command is None:
            stdout, stderr, code = b"", f"{argv[0]}: not found".encode(), 127
        else:
            stdout, stderr, code = await maybeDeferred(command, stdin)
        collector = OutputCollector(max_output)
        collector.childDataReceived(1, stdout)
        collector.childDataReceived(2, stderr)
        collector.processEnded(Failure(ProcessDone(0)) if code == 0
                               else Failure(ProcessTerminated(exitCode=code)))
        return await collector.done

    def export_workspace(self, container_id, path, write):
        """
        As the engine does, but C{write} is called on the calling thread.
        """
        failed = self._check()
        if failed:
            return failed
        container = self.containers.get(container_id)
        if container is None:
            return fail(ContainerGone(
                f"{path} cannot be exported: the session's container is gone"))
        top = posixpath.basename(path.rstrip("/"))
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            tar.addfile(_tar_entry(top, tarfile.DIRTYPE))
            for name, data in sorted(container.get("files", {}).items()):
                relative = posixpath.relpath(name, path)
                if relative.startswith(".."):
                    continue
                entry = _tar_entry(f"{top}/{relative}", tarfile.REGTYPE, len(data))
                tar.addfile(entry, io.BytesIO(data))
        data = archive.getvalue()
        try:
            for at in range(0, len(data), 64 * 1024):
                write(data[at : at + 64 * 1024])
        except Exception:
            return fail()
        return succeed(None)


def _normal_path(path) -> bool:
    return (isinstance(path, str) and path.startswith("/") and "\0" not in path
            and posixpath.normpath(path) == path and path != "/")


def _through_link(container: dict, path: str) -> bool:
    """
    Whether C{path}, or a directory it is in, is a symbolic link in the
    container (see L{FakeDockerAPI.add_symlink}).
    """
    links = container.get("links", {})
    while path not in ("/", ""):
        if path in links:
            return True
        path = posixpath.dirname(path)
    return False


def _mounts(container: dict) -> tuple[Mount, ...]:
    """
    The volumes a fake container mounts: its spec's named ones, and a
    --read-only-root one's anonymous ones (named after the container).
    """
    spec = container.get("spec")
    if spec is None:
        return ()
    # As with the engine, a named volume at one of those places replaces
    # the anonymous one.
    named = {target for _, target in spec.volumes}
    anonymous = [target for target in (READ_ONLY_VOLUMES if spec.read_only_root else ())
                 if target not in named]
    return (tuple(Mount(name, target) for name, target in spec.volumes)
            + tuple(Mount(f"{container['id']}-{target.strip('/').replace('/', '-')}", target)
                    for target in anonymous))


class _StartedWhenAwaited(Deferred):
    """
    The Deferred of an exec that is not held.  The engine fires an exec's
    Deferred when its exec-start upgrade is done, a turn of the reactor
    after the call, so the callbacks its caller added have run before the
    first bytes come.  The fake has no reactor: it connects the exec when
    its caller first adds a callback (or awaits it), so that callback runs
    before the exec's first bytes, as it would with the engine.

    Twisted chains a Deferred returned by a callback without adding a
    callback to it: return this one from a callback and it never fires.
    """

    def __init__(self, start) -> None:
        super().__init__()
        self._start = start

    def _started(self) -> None:
        start, self._start = self._start, None
        if start is not None:
            start(self)

    def addCallbacks(self, *args, **kwargs):
        super().addCallbacks(*args, **kwargs)
        self._started()
        return self

    def addCallback(self, *args, **kwargs):
        super().addCallback(*args, **kwargs)
        self._started()
        return self

    def addErrback(self, *args, **kwargs):
        super().addErrback(*args, **kwargs)
        self._started()
        return self

    def addBoth(self, *args, **kwargs):
        super().addBoth(*args, **kwargs)
        self._started()
        return self


@implementer(IConsumer)
class _Collected:
    """
    An exec's input, kept.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.producer = None

    def registerProducer(self, producer, streaming) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data += data


def _tar_entry(name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type = kind
    entry.size = size
    entry.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return entry


@implementer(ISessionClient)
class RecordingClient:
    """
    Records every call a session makes on its client, in order, and the
    offset of the next output byte it would get.
    """

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.offset = None

    @property
    def output(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "output")

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    def session_started(self, session, resumed, offset, replay):
        self.offset = offset
        self.events.append(("started", session.id, resumed))

    def session_output(self, data):
        self.offset += len(data)
        self.events.append(("output", data))

    def session_dropped(self, count, offset):
        self.events.append(("dropped", count, offset))

    def session_notice(self, code, message):
        self.events.append(("notice", code))

    def session_failed(self, message, code):
        self.events.append(("failed", message, code))

    def session_ended(self, exit_code, message):
        self.events.append(("ended", exit_code, message))

    def session_taken_over(self):
        self.events.append(("taken_over",))

    def pause_input(self, paused):
        self.events.append(("pause_input", paused))

    def session_interrupted(self, message):
        self.events.append(("interrupted", message))
