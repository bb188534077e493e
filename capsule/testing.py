"""
Fakes that tests share: an in-memory Docker engine and exec, and a client
that records what a session tells it.
"""

from __future__ import annotations

import struct

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import ContainerGone, DockerUnavailable, ImageMissing
from .interfaces import IDockerAPI, IExecProcess, ISessionClient
from .keeper import FrameReader


@implementer(IExecProcess)
class FakeExecProcess:
    """
    An exec.  With C{keeper}, it behaves as capsule-keeper's relay: output
    goes out in C{o} frames, the exit status in an C{x} frame, and the
    C{i}/C{w} frames written to it are decoded into C{written} and
    C{resizes}.
    """

    def __init__(self, process_protocol, container_id: str, argv, size,
                 keeper: bool = False) -> None:
        self.exec_id = f"exec-{container_id}"
        self.process_protocol = process_protocol
        self.argv = tuple(argv)
        self.size = size
        self.keeper = keeper
        self.written: list[bytes] = []
        self.resizes: list[tuple[int, int]] = []
        self.paused = False
        self.connected = True
        self._frames = FrameReader()

    def emit(self, data: bytes) -> None:
        if self.keeper:
            data = b"o" + struct.pack(">I", len(data)) + data
        self.process_protocol.childDataReceived(1, data)

    def exit(self, code: int | None) -> None:
        """
        The shell ended with C{code}; C{None}: the exec died without a word
        (its container was killed).
        """
        self.connected = False
        if self.keeper and code is not None:
            self.process_protocol.childDataReceived(1, b"x" + struct.pack(">II", 4, code))
            code = 0
        if code == 0:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(exitCode=code))
        self.process_protocol.processEnded(reason)

    def write(self, data: bytes) -> None:
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

    def loseConnection(self) -> None:
        self.connected = False

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
    is set, in which case creates wait until C{release_create()}.
    """

    host = "fake://docker"

    def __init__(self, images=("capsule-runtime:latest",)) -> None:
        self.images = set(images)
        self.containers: dict[str, dict] = {}
        self.removed: list[str] = []
        self.processes: list[FakeExecProcess] = []
        self.reachable = True
        self.hold_create = False
        self._held: list[tuple[Deferred, str]] = []
        # Per container: the (first held, end) output offsets its keeper reports.
        self.keeper_output: dict[str, tuple[int, int]] = {}
        self._next = 0

    def _check(self):
        if not self.reachable:
            return fail(DockerUnavailable("cannot reach the Docker engine at fake://docker"))
        return None

    def ping(self):
        return self._check() or succeed({"Version": "fake"})

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
            "id": container_id, "name": f"capsule-{session_id}",
            "labels": dict(spec.labels), "state": "running", "spec": spec,
        }
        if self.hold_create:
            d = Deferred()
            self._held.append((d, container_id))
            return d
        return succeed(container_id)

    def release_create(self) -> None:
        held, self._held = self._held, []
        for d, container_id in held:
            d.callback(container_id)

    def add_container(self, container_id: str, labels: dict) -> None:
        self.containers[container_id] = {"id": container_id, "name": container_id,
                                         "labels": dict(labels), "state": "running"}

    def remove_container(self, container_id):
        failed = self._check()
        if failed:
            return failed
        existed = self.containers.pop(container_id, None) is not None
        if existed:
            self.removed.append(container_id)
        return succeed(existed)

    def list_containers(self, labels):
        failed = self._check()
        if failed:
            return failed
        return succeed([
            {k: c[k] for k in ("id", "name", "labels", "state")}
            for c in self.containers.values()
            if all(c["labels"].get(k) == v for k, v in labels.items())
        ])

    def container_state(self, container_id):
        c = self.containers.get(container_id)
        return succeed(None if c is None else {"Running": c["state"] == "running",
                                               "OOMKilled": c.get("oom", False),
                                               "ExitCode": c.get("exit_code", 0)})

    def spawn_exec(self, process_protocol, container_id, argv, user, workdir, env, size,
                   tty=True):
        if container_id not in self.containers:
            return fail(ContainerGone("the session's container no longer exists"))
        keeper = argv[0] == "capsule-keeper"
        process = FakeExecProcess(process_protocol, container_id, argv, size, keeper)
        self.processes.append(process)
        process_protocol.makeConnection(process)
        if keeper:
            # As the keeper does: say where the output resumes.
            wanted = int(argv[argv.index("-o") + 1])
            held_from, end = self.keeper_output.get(container_id, (0, 0))
            start = min(max(wanted, held_from), end)
            dropped = start - wanted if wanted < held_from else 0
            process.emit(f"\x1b_capsule-keeper;offset={start};dropped={dropped}\x1b\\".encode())
        return succeed(process)

    def export_workspace(self, container_id, path, write):
        return fail(ContainerGone("not supported by the fake"))


@implementer(ISessionClient)
class RecordingClient:
    """
    Records every call a session makes on its client, in order.
    """

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.producer = None
        self.sent_offset = 0

    @property
    def output(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "output")

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    def session_started(self, session, resumed, offset):
        self.sent_offset = offset
        self.events.append(("started", session.id, resumed))

    def session_output(self, data):
        self.sent_offset += len(data)
        self.events.append(("output", data))

    def session_dropped(self, count, offset):
        self.events.append(("dropped", count, offset))

    def session_failed(self, message, code):
        self.events.append(("failed", message, code))

    def session_ended(self, exit_code, message):
        self.events.append(("ended", exit_code, message))

    def session_taken_over(self):
        self.events.append(("taken_over",))

    def session_interrupted(self, message):
        self.events.append(("interrupted", message))

    def pause_output_producer(self, producer):
        self.producer = producer
