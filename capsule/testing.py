"""
Fakes that tests share: an in-memory Docker engine and exec, and a client
that records what a session tells it.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import ContainerGone, DockerUnavailable, ImageMissing
from .interfaces import IDockerAPI, IExecProcess, ISessionClient


@implementer(IExecProcess)
class FakeExecProcess:
    def __init__(self, process_protocol, container_id: str, argv, size) -> None:
        self.exec_id = f"exec-{container_id}"
        self.process_protocol = process_protocol
        self.argv = tuple(argv)
        self.size = size
        self.written: list[bytes] = []
        self.resizes: list[tuple[int, int]] = []
        self.paused = False
        self.connected = True

    def emit(self, data: bytes) -> None:
        self.process_protocol.childDataReceived(1, data)

    def exit(self, code: int | None) -> None:
        self.connected = False
        if code == 0:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(exitCode=code))
        self.process_protocol.processEnded(reason)

    def write(self, data: bytes) -> None:
        self.written.append(data)

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

    def spawn_exec(self, process_protocol, container_id, argv, user, workdir, env, size):
        if container_id not in self.containers:
            return fail(ContainerGone("the session's container no longer exists"))
        process = FakeExecProcess(process_protocol, container_id, argv, size)
        self.processes.append(process)
        process_protocol.makeConnection(process)
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

    def pause_output_producer(self, producer):
        self.producer = producer
