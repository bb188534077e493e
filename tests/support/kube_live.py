"""
Live capsules on the Kubernetes engine: a stand-in API server
(L{tests.support.kube_standin}) in this process, a kubeconfig for it, and
C{twistd -n capsule --engine kubernetes} servers (L{tests.support.live}'s
L{CapsuleServer}) that make their sessions as pods there.

The stand-in answers on this process's reactor: while a test waits for a
server (its start, its stop), the reactor must run, so those waits are
done on a thread (L{KubeCluster.start}, L{KubeCluster.stop}) and awaited.
A test's fixture makes one L{KubeCluster}, and calls L{KubeCluster.close}
at its end, whatever happened: it stops the servers (SIGKILL past a
deadline), then removes every pod, container and claim's volume the
stand-in made, and every container of the instance (by label).

Several servers of one cluster are replicas: the same C{--instance} and
namespace, each its own C{--replica} name (and its own state directory, as
pods of a Deployment have).  L{KubeCluster.kill} ends one with SIGKILL.

    cluster = KubeCluster(tmp_path)
    server = await cluster.start(cluster.server("--pool-size", "1"))
    ...
    await cluster.close()
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.support.kube_standin import KubeStandin
from tests.support.live import (DEFAULT_IMAGE, CapsuleServer, docker_client,
                                remove_instance_containers, remove_instance_volumes)


def write_kubeconfig(path: Path, url: str, namespace: str, token: str = "capsule-test"
                     ) -> Path:
    """
    Write a kubeconfig (JSON, which YAML reads) whose current context
    reaches C{url} with a bearer C{token}, in C{namespace}; return its path.
    """
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "standin", "cluster": {"server": url}}],
        "users": [{"name": "capsule", "user": {"token": token}}],
        "contexts": [{"name": "standin", "context": {
            "cluster": "standin", "user": "capsule", "namespace": namespace}}],
        "current-context": "standin",
    }
    path = Path(path)
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


class KubeCluster:
    """
    A stand-in Kubernetes API server listening on loopback, its kubeconfig,
    one namespace and one capsule instance for the servers made with
    L{server}.

    @param workdir: where the kubeconfig, the servers' logs and state go.
    @param image: the sessions' image.
    @param server_factory: makes a server (not started) from C{workdir},
        its options, C{image}, C{instance}, C{tuning}, C{env} and C{label}:
        by default L{CapsuleServer}.
    @param standin_options: given to L{KubeStandin} (C{network},
        C{runtime_classes}).
    """

    def __init__(self, workdir: Path, image: str = DEFAULT_IMAGE, server_factory=None,
                 namespace: str | None = None, instance: str | None = None,
                 **standin_options) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.image = image
        self.instance = instance or f"kube-{uuid.uuid4().hex[:10]}"
        self.namespace = namespace or f"capsule-{uuid.uuid4().hex[:10]}"
        self.servers: list[CapsuleServer] = []
        self._factory = server_factory or _default_factory
        self._docker = docker_client().api
        self.standin = KubeStandin(reactor, self._docker, **standin_options)
        self.standin.start()
        self._port = reactor.listenTCP(0, self.standin.site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self._port.getHost().port}"
        self.standin.url = self.url
        self.kubeconfig = write_kubeconfig(self.workdir / "kubeconfig", self.url,
                                           self.namespace)
        self._closed = False

    def server(self, *extra: str, replica: str | None = None, tuning: dict | None = None,
               env: dict | None = None, state_dir: str | None = None) -> CapsuleServer:
        """
        A capsule server of this cluster, not started: C{--engine
        kubernetes} with this cluster's kubeconfig, namespace and instance,
        and C{--replica} C{replica} (by default C{r0}, C{r1}... in the order
        made), with a state directory of its own unless C{state_dir}.
        """
        replica = replica or f"r{len(self.servers)}"
        state = Path(state_dir) if state_dir else self.workdir / f"state-{replica}"
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        args = ("--engine", "kubernetes", "--kubeconfig", str(self.kubeconfig),
                "--kube-namespace", self.namespace, "--replica", replica,
                "--state-dir", str(state), *extra)
        server = self._factory(self.workdir, *args, image=self.image, instance=self.instance,
                               tuning=tuning, env=env, label=f"{self.instance}-{replica}")
        server.replica = replica
        self.servers.append(server)
        return server

    async def start(self, server: CapsuleServer, timeout: float = 60) -> CapsuleServer:
        """
        Start C{server} (on a thread: the stand-in answers it meanwhile) and
        return it once it listens.
        """
        await deferToThread(server.start, timeout)
        return server

    async def stop(self, server: CapsuleServer, sig=signal.SIGTERM, timeout: float = 30):
        """
        Stop C{server} with C{sig} (on a thread); its exit code.
        """
        return await deferToThread(server.stop, sig, timeout)

    def kill(self, server: CapsuleServer) -> int | None:
        """
        End C{server} with SIGKILL, as a node lost or an OOM kill would: it
        says nothing to anyone.  Its exit code.
        """
        return server.stop(signal.SIGKILL, 10)

    # -- what the cluster holds --

    def pods(self, **labels: str) -> list[dict]:
        """
        The pods of the namespace (as stored: metadata, spec, status), those
        carrying C{labels} (C{io_capsule_session="..."} is
        C{io.capsule.session}) if given.
        """
        wanted = {k.replace("_", "."): v for k, v in labels.items()}
        return [p for p in self.standin.store.items("Pod", self.namespace)
                if all((p["metadata"].get("labels") or {}).get(k) == v
                       for k, v in wanted.items())]

    def session_pod(self, session_id: str) -> dict | None:
        """
        Session C{session_id}'s pod, found by its label (C{None}: none).
        """
        found = self.pods(io_capsule_session=session_id)
        return found[0] if found else None

    async def delete_pod(self, name: str, grace: int = 0) -> None:
        """
        Delete a pod from under whoever uses it, as C{kubectl delete pod}
        (or a node's loss) does.
        """
        pod = self.standin.store.get("Pod", self.namespace, name)
        if pod is not None:
            await self.standin.delete("Pod", pod, grace)

    async def evict(self, name: str, message: str = "The node was low on resource: memory."
                    ) -> None:
        await self.standin.evict(self.namespace, name, message)

    # -- the end --

    async def close(self) -> None:
        """
        Stop every server (a SIGTERM, SIGKILL past its deadline), then
        remove all the stand-in made (pods' containers, claims' volumes) and
        every container and volume of the instance; whatever fails.
        """
        if self._closed:
            return
        self._closed = True
        problems = []
        for server in self.servers:
            try:
                await self.stop(server)
            except Exception as e:
                problems.append(e)
                try:
                    server.stop(signal.SIGKILL, 10)
                except Exception:
                    pass
        try:
            await self.standin.stop()
        except Exception as e:
            problems.append(e)
        await self._port.stopListening()
        await deferToThread(self.sweep)
        if problems:
            raise problems[0]

    def sweep(self) -> None:
        """
        Remove, by label, every container and volume of the instance and of
        the stand-in (blocking; nothing of the reactor is used).
        """
        self.standin._thd_remove_all()
        remove_instance_containers(self.instance, self._docker)
        remove_instance_volumes(self.instance, self._docker)


def _default_factory(workdir, *args, image, instance, tuning, env, label):
    return CapsuleServer(workdir, *args, image=image, instance=instance, tuning=tuning,
                         env=env, label=label)
