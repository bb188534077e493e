"""
The Kubernetes engine's floor next to Docker's: a session container made
and running, an exec's first output, and a keystroke's echo through an
exec with a terminal, each through capsule's engine behind IDockerAPI:
L{capsule.engine.docker.DockerAPI} on the local engine, and
L{capsule.engine.kubernetes.KubernetesAPI} on the tests' stand-in API
server (tests/support/kube_standin.py), whose pods are containers on the
same engine.  The difference is what the API server's path adds (HTTP
calls, a watch, the pods/exec WebSocket and the stand-in's own relay): a
real cluster adds its scheduler, kubelet and network instead.

    python bench/kube_floor.py [--image capsule-runtime:latest] [--runs 10] [--echoes 50]

Containers carry io.capsule.instance=bench-kube-<random> and are removed at
the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import docker  # noqa: E402
import kubernetes.client  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.protocol import ProcessProtocol  # noqa: E402

from capsule.core.spec import ContainerSpec  # noqa: E402
from capsule.engine.docker import DockerAPI  # noqa: E402
from capsule.engine.kubernetes import KubernetesAPI  # noqa: E402
from tests.support.kube_standin import KubeStandin  # noqa: E402


class Echo(ProcessProtocol):
    def __init__(self) -> None:
        self.data = b""
        self.waiting: tuple[bytes, defer.Deferred] | None = None

    def childDataReceived(self, fd, data):
        self.data += data
        if self.waiting and self.waiting[0] in self.data:
            d, self.waiting = self.waiting[1], None
            d.callback(None)

    def wait(self, text: bytes) -> defer.Deferred:
        d = defer.Deferred()
        if text in self.data:
            d.callback(None)
        else:
            self.waiting = (text, d)
        return d


def figures(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return f"  {name:<34} median {statistics.median(ms):8.1f} ms   p90 {p90:8.1f} ms   n={len(ms)}"


async def measure(api, spec, runs: int, echoes: int) -> dict[str, list[float]]:
    out = {"create+running": [], "exec to first output": [], "echo through a tty exec": []}
    containers = []
    for _ in range(runs):
        start = reactor.seconds()
        containers.append(await api.create_session_container(str(uuid.uuid4()), spec))
        out["create+running"].append(reactor.seconds() - start)
    for container in containers:
        echo = Echo()
        start = reactor.seconds()
        await api.spawn_exec(echo, container, ["sh", "-c", "printf ready; exec sleep 30"],
                             "developer", "/workspace", {}, None, tty=False)
        await echo.wait(b"ready")
        out["exec to first output"].append(reactor.seconds() - start)
    echo = Echo()
    process = await api.spawn_exec(echo, containers[0], ["cat"], "developer", "/workspace",
                                   {}, (80, 24), tty=True)
    for i in range(echoes):
        marker = f"k{i:04d}".encode()
        start = reactor.seconds()
        process.write(marker)
        await echo.wait(marker)
        out["echo through a tty exec"].append(reactor.seconds() - start)
        await task.deferLater(reactor, 0.01, lambda: None)
    process.loseConnection()
    for container in containers:
        await api.remove_container(container)
    return out


async def main(reactor_, args) -> None:
    instance = f"bench-kube-{uuid.uuid4().hex[:8]}"
    spec = ContainerSpec(image=args.image, memory="256m", cpus=0.5, network="none",
                         labels={"io.capsule.managed": "true", "io.capsule.instance": instance})
    client = docker.APIClient(version="auto", timeout=60)
    standin = KubeStandin(reactor, client)
    standin.start()
    port = reactor.listenTCP(0, standin.site, interface="127.0.0.1")
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{port.getHost().port}"
    engines = {"docker": DockerAPI(reactor, threads=4, export_threads=1, timeout=60),
               "kubernetes (stand-in)": KubernetesAPI(reactor, configuration,
                                                      namespace="bench", threads=4,
                                                      export_threads=1, timeout=60)}
    try:
        for name, api in engines.items():
            api.start()
            try:
                found = await measure(api, spec, args.runs, args.echoes)
            finally:
                api.stop()
            print(f"{name}:")
            for what, seconds in found.items():
                print(figures(what, seconds))
    finally:
        port.stopListening()
        await standin.stop()
        for c in client.containers(all=True, filters={"label": f"io.capsule.instance={instance}"}):
            client.remove_container(c["Id"], force=True, v=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--echoes", type=int, default=50)
    task.react(main, [parser.parse_args()])
