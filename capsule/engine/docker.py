"""
The Docker engine behind L{IDockerAPI}.

Every docker-py call runs on a dedicated, bounded L{ThreadPool} (never the
reactor's own pool, which name resolution and shutdown need), with an
explicit timeout.  Workspace exports get a pool of their own, so a long
export cannot starve session starts, and so does the health check (C{ping},
C{image_exists}), so a burst of session starts queued on the main pool
cannot make C{/health} report Docker as down.  Methods that run on a worker
thread are named C{_thd_...}.

The one thing not done through docker-py is streaming an exec: that upgrade
is performed on a Twisted protocol (see L{capsule.engine.exec_process}), so the
terminal's bytes are read by the reactor with no thread per session.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Callable
from urllib.parse import urlsplit

import docker
import docker.errors
import requests.exceptions
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from capsule.engine.command import OutputCollector
from capsule.core.errors import ContainerGone, DockerError, DockerUnavailable, ImageMissing
from capsule.engine.exec_process import ExecStreamProtocol, exec_start_request
from capsule.engine.forks import Forks
from capsule.engine.snapshots import KeptContainers
from capsule.core.interfaces import IDockerAPI
from capsule.core.keeper import SECRET_LABEL, parse_secret
from capsule.core.spec import ContainerSpec
from capsule.core.counting import Uncounted
from capsule.core.diskuse import DiskUsage, Mount

_log = Logger()


def container_name() -> str:
    """
    A new session container's name: random, unrelated to its session's id
    (which lets whoever knows it into the session, and which the
    container's label C{io.capsule.session} holds).
    """
    return f"capsule-{uuid.uuid4().hex}"


DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
# How long to wait for Docker to report an exec's exit code after its stream
# closed (the code can lag behind the end of the stream).
EXIT_CODE_WAIT = 2.0
# Docker's detach keys for execs with a TTY: made unlikely to be typed.
DETACH_KEYS = "ctrl-],ctrl-@,ctrl-],ctrl-@"
EXIT_CODE_POLL = 0.05
# Workers for ping and image_exists: /health runs one probe at a time (see
# capsule.web.site.HealthResource); the second serves any other caller at once.
HEALTH_THREADS = 2
# Bytes of a workspace's archive read from Docker at a time.
EXPORT_CHUNK = 256 * 1024


# The image's group whose members may sudo without a password.
SUDO_GROUP = "capsule-sudo"
# Writable places of a --read-only-root container: volumes live as long as
# the container (and are exported from it), tmpfs is memory.
READ_ONLY_VOLUMES = ("/workspace", "/home/developer")
READ_ONLY_TMPFS = {"/tmp": "rw,exec,nosuid,nodev,size=512m",
                   "/run": "rw,noexec,nosuid,nodev,size=16m"}


def docker_host_endpoint(reactor, host: str):
    """
    The client endpoint for a Docker host URL, for streaming execs.

    @raise DockerError: for hosts whose connection the reactor cannot own.
    """
    url = urlsplit(host)
    if url.scheme == "unix":
        return UNIXClientEndpoint(reactor, url.path, timeout=10)
    if url.scheme in ("tcp", "http"):
        if os.environ.get("DOCKER_TLS_VERIFY") or url.scheme == "https":
            raise DockerError(
                f"capsule cannot stream terminals over a TLS-protected Docker host ({host});"
                " use the engine's unix socket or a local TCP port"
            )
        return HostnameEndpoint(reactor, url.hostname or "localhost", url.port or 2375, timeout=10)
    raise DockerError(
        f"capsule needs a unix:// or tcp:// Docker host, got {host!r};"
        " set DOCKER_HOST accordingly"
    )


class OneStream(Factory):
    """
    The factory of one exec stream's connection to the engine: quiet, so
    that each exec does not log "Starting factory" and "Stopping factory".
    """

    noisy = False

    def __init__(self, stream) -> None:
        self._stream = stream

    def buildProtocol(self, addr):
        return self._stream


@implementer(IDockerAPI)
class DockerAPI(KeptContainers, Forks):
    """
    @param host: the Docker host URL (default: C{$DOCKER_HOST}, else the
        local unix socket).
    @param threads: the size of the pool for Docker calls.
    @param export_threads: the size of the pool for workspace exports.
        The health check has a pool of its own of L{HEALTH_THREADS}.
    @param timeout: the timeout of each Docker call, in seconds.
    @param metrics: what its calls are counted into (L{capsule.ops.metrics});
        by default nothing.

    @ivar storage_quota: whether the storage driver limits a container's
        size when asked (C{storage_opt} C{size}): C{None} until a container
        with a disk limit was created, then what the engine answered.
    """

    def __init__(self, reactor, host: str | None = None, threads: int = 16,
                 export_threads: int = 4, timeout: float = 60.0, metrics=None) -> None:
        self._reactor = reactor
        self.metrics = metrics if metrics is not None else Uncounted()
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
        self._endpoint = docker_host_endpoint(reactor, self.host)
        self._timeout = timeout
        self._max_connections = threads + export_threads + HEALTH_THREADS
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="capsule-docker")
        self._export_pool = ThreadPool(minthreads=0, maxthreads=export_threads,
                                       name="capsule-export")
        self._health_pool = ThreadPool(minthreads=0, maxthreads=HEALTH_THREADS,
                                       name="capsule-health")
        self._client_lock = threading.Lock()
        self._client: docker.APIClient | None = None
        self.storage_quota: bool | None = None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._pool.start()
        self._export_pool.start()
        self._health_pool.start()

    def stop(self) -> None:
        self._pool.stop()
        self._export_pool.stop()
        self._health_pool.stop()

    # -- the thread side ---------------------------------------------------

    def _thd_client(self) -> docker.APIClient:
        with self._client_lock:
            if self._client is None:
                # version="auto" asks the engine which API it speaks, so
                # capsule works with old and new engines alike.
                self._client = docker.APIClient(
                    base_url=self.host, version="auto", timeout=self._timeout,
                    max_pool_size=self._max_connections,
                )
            return self._client

    def _thd_call(self, function: Callable, *args, **kwargs):
        try:
            return function(self._thd_client(), *args, **kwargs)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            self._thd_forget_client()
            raise self._unavailable(e) from None
        except docker.errors.DockerException as e:
            if not isinstance(e, docker.errors.APIError):
                # Raised by version negotiation when the engine is down.
                self._thd_forget_client()
                raise self._unavailable(e) from None
            raise

    def _thd_forget_client(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _unavailable(self, error: Exception) -> DockerUnavailable:
        return DockerUnavailable(
            f"cannot reach the Docker engine at {self.host} ({_short(error)}):"
            " is dockerd running? Start it (for example `sudo systemctl start docker`)"
            " and make sure capsule's user may use it."
        )

    def _call(self, function: Callable, *args, **kwargs) -> Deferred:
        return self.metrics.docker_call(deferToThreadPool(
            self._reactor, self._pool, self._thd_call, function, *args, **kwargs))

    def _health_call(self, function: Callable) -> Deferred:
        return self.metrics.docker_call(deferToThreadPool(
            self._reactor, self._health_pool, self._thd_call, function))

    # -- IDockerAPI ----------------------------------------------------

    def ping(self) -> Deferred:
        return self._health_call(lambda client: client.version())

    def container_sizes(self, labels: dict[str, str]) -> Deferred:
        def _thd(client) -> dict[str, int]:
            found = client.containers(
                size=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})
            return {c["Id"]: int(c.get("SizeRw") or 0) for c in found}
        return self._call(_thd)

    def disk_usage(self, labels: dict[str, str], volumes: bool = False) -> Deferred:
        def _thd(client) -> DiskUsage:
            wanted = {"label": [f"{k}={v}" for k, v in labels.items()]}
            found = client.containers(size=True, filters=wanted)
            sizes = {}
            if volumes:
                # Only the engine's /system/df knows volumes' sizes; "type"
                # spares engines of API 1.42 and later the images' and the
                # build cache's (older ones ignore it, and do all).
                df = client._result(client._get(client._url("/system/df"), params={
                    "type": ["volume"]}), True)
                for volume in df.get("Volumes") or []:
                    size = (volume.get("UsageData") or {}).get("Size", -1)
                    if isinstance(size, int) and size >= 0:
                        sizes[volume["Name"]] = size
            return DiskUsage(
                layers={c["Id"]: int(c.get("SizeRw") or 0) for c in found},
                mounts={c["Id"]: tuple(Mount(m["Name"], m.get("Destination") or "")
                                       for m in c.get("Mounts") or []
                                       if m.get("Type") == "volume" and m.get("Name"))
                        for c in found},
                volumes=sizes)
        return self._call(_thd)

    def info(self) -> Deferred:
        return self._call(lambda client: client.info())

    def image_exists(self, image: str) -> Deferred:
        def _thd(client):
            try:
                client.inspect_image(image)
            except docker.errors.ImageNotFound:
                return False
            return True
        return self._health_call(_thd)

    def create_session_container(self, session_id: str, spec: ContainerSpec) -> Deferred:
        return self._call(self._thd_create_session_container, session_id, spec)

    def _thd_create_session_container(self, client, session_id: str,
                                      spec: ContainerSpec) -> str:
        container_id = self._thd_create_container(client, session_id, spec)
        self._thd_start_new(client, container_id)
        return container_id

    def _thd_create_container(self, client, session_id: str, spec: ContainerSpec) -> str:
        """
        Create (not start) a session's container; fire with its id.
        """
        quota = spec.disk is not None and self.storage_quota is not False
        try:
            container = self._thd_create(client, session_id, spec, quota)
        except docker.errors.APIError as e:
            if not (quota and _refuses_storage_opt(e)):
                raise DockerError(
                    f"Docker could not create the session container: {_short(e)}") from None
            # The storage driver cannot limit a container's size (overlay2
            # needs xfs mounted with pquota): the disk watcher does instead.
            if self.storage_quota is None:
                _log.info("the storage driver cannot limit container sizes ({reason});"
                          " --disk is enforced by watching each session's size",
                          reason=_short(e))
            self.storage_quota = False
            try:
                container = self._thd_create(client, session_id, spec, False)
            except docker.errors.APIError as e:
                raise DockerError(
                    f"Docker could not create the session container: {_short(e)}") from None
        else:
            if quota:
                self.storage_quota = True
        return container["Id"]

    @staticmethod
    def _thd_start_new(client, container_id: str) -> None:
        """
        Start a container just made; remove it (and its anonymous volumes)
        if it does not start.
        """
        try:
            client.start(container_id)
        except Exception as e:
            try:
                client.remove_container(container_id, force=True, v=True)
            except docker.errors.DockerException:
                pass
            raise DockerError(f"Docker could not start the session container: {_short(e)}") from None

    @staticmethod
    def _thd_create(client, session_id: str, spec: ContainerSpec, quota: bool) -> dict:
        host_config = client.create_host_config(
            mem_limit=spec.memory,
            memswap_limit=spec.memory,
            nano_cpus=int(spec.cpus * 1e9),
            cpu_shares=spec.cpu_shares,
            pids_limit=spec.pids,
            oom_score_adj=spec.oom_score_adj,
            storage_opt={"size": spec.disk} if quota else None,
            init=True,
            cap_drop=["ALL"],
            cap_add=spec.capabilities() or None,
            security_opt=None if spec.allow_sudo else ["no-new-privileges:true"],
            group_add=[SUDO_GROUP] if spec.allow_sudo else None,
            network_mode=spec.network,
            read_only=spec.read_only_root or None,
            tmpfs=dict(READ_ONLY_TMPFS) if spec.read_only_root else None,
            runtime=spec.runtime,
            mounts=[docker.types.Mount(target, name, type="volume",
                                       labels=dict(spec.volume_labels))
                    for name, target in spec.volumes] or None,
        )
        try:
            return client.create_container(
                spec.image,
                command=list(spec.command),
                # Docker's DNS tells the name to the network's other sessions.
                name=container_name(),
                hostname=spec.hostname,
                user=spec.user,
                working_dir=spec.workdir,
                environment={**spec.environment, **spec.secrets},
                labels=dict(spec.labels),
                host_config=host_config,
                volumes=list(READ_ONLY_VOLUMES) if spec.read_only_root else None,
                detach=True,
            )
        except docker.errors.ImageNotFound:
            raise ImageMissing(
                f"the session image {spec.image} is missing: build it with `make image`"
                " (docker/build-image.sh SESSION_IMAGE AGENT_IMAGE), or start capsule with"
                " --image (or --agent-image, or the profile's image) naming an image that exists"
            ) from None

    def inspect_network(self, name: str) -> Deferred:
        def _thd(client):
            try:
                return _network(client.inspect_network(name))
            except docker.errors.NotFound:
                return None
        return self._call(_thd)

    def network_addresses(self, name: str) -> Deferred:
        """
        The addresses of the containers on the network C{name}: fires with
        C{{address: container id}} (empty when there is no such network).
        """
        def _thd(client):
            try:
                found = client.inspect_network(name)
            except docker.errors.NotFound:
                return {}
            addresses = {}
            for container_id, endpoint in (found.get("Containers") or {}).items():
                for key in ("IPv4Address", "IPv6Address"):
                    address = (endpoint.get(key) or "").split("/")[0]
                    if address:
                        addresses[address] = container_id
            return addresses
        return self._call(_thd)

    def ensure_network(self, name: str, options: dict[str, str],
                       labels: dict[str, str], internal: bool = False) -> Deferred:
        def _thd(client):
            try:
                return _network(client.inspect_network(name)), False
            except docker.errors.NotFound:
                pass
            try:
                client.create_network(name, driver="bridge", options=dict(options),
                                      labels=dict(labels), check_duplicate=True,
                                      internal=internal)
            except docker.errors.APIError as e:
                # Another capsule made it first: use theirs.
                if e.status_code != 409:
                    raise DockerError(
                        f"Docker could not create the network {name}: {_short(e)}") from None
                return _network(client.inspect_network(name)), False
            return _network(client.inspect_network(name)), True
        return self._call(_thd)

    def set_cpu_shares(self, container_id: str, shares: int) -> Deferred:
        def _thd(client):
            try:
                client.update_container(container_id, cpu_shares=shares)
            except docker.errors.NotFound:
                return False
            return True
        return self._call(_thd)

    def remove_container(self, container_id: str) -> Deferred:
        def _thd(client):
            try:
                client.remove_container(container_id, force=True, v=True)
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as e:
                # A removal already under way counts as done.
                if e.status_code == 409 and "already in progress" in str(e):
                    return True
                raise
            return True
        return self._call(_thd)

    # -- replicas: one host is one server ----------------------------------

    def renew_replica(self, replica: str, seconds: float) -> Deferred:
        return succeed(None)

    def drop_replica(self, replica: str) -> Deferred:
        return succeed(False)

    def live_replicas(self) -> Deferred:
        return succeed(set())

    def container_holder(self, container_id: str) -> Deferred:
        return succeed(None)

    def claim_container(self, container_id: str, replica: str, holder: str | None = None,
                        annotations: dict[str, str] | None = None,
                        labels: dict[str, str] | None = None) -> Deferred:
        return succeed(True)

    def list_containers(self, labels: dict[str, str]) -> Deferred:
        def _thd(client):
            found = client.containers(
                all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]}
            )
            return [
                {
                    "id": c["Id"],
                    "name": (c.get("Names") or ["?"])[0].lstrip("/"),
                    "labels": c.get("Labels") or {},
                    "state": c.get("State"),
                }
                for c in found
            ]
        return self._call(_thd)

    def container_state(self, container_id: str) -> Deferred:
        def _thd(client):
            try:
                return client.inspect_container(container_id)["State"]
            except docker.errors.NotFound:
                return None
        return self._call(_thd)

    def keeper_address(self, container_id: str) -> Deferred:
        def _thd(client):
            try:
                return keeper_address(client.inspect_container(container_id))
            except docker.errors.NotFound:
                raise ContainerGone("the session's container no longer exists") from None
        return self._call(_thd)

    def exec_resize(self, exec_id: str, cols: int, rows: int) -> Deferred:
        return self._call(lambda client: client.exec_resize(exec_id, height=rows, width=cols))

    def _exec_inspect(self, exec_id: str) -> Deferred:
        def _thd(client):
            try:
                return client.exec_inspect(exec_id)
            except docker.errors.NotFound:
                return None
        return self._call(_thd)

    def spawn_exec(self, process_protocol, container_id: str, argv, user: str,
                   workdir: str, env: dict[str, str], size: tuple[int, int] | None,
                   tty: bool = True) -> Deferred:
        return Deferred.fromCoroutine(self._spawn_exec(
            process_protocol, container_id, argv, user, workdir, env, size, tty))

    async def _spawn_exec(self, process_protocol, container_id, argv, user, workdir, env,
                          size, tty):
        def _thd_create(client):
            try:
                created = client.exec_create(
                    container_id, list(argv), stdin=True, tty=tty, user=user,
                    workdir=workdir, environment=dict(env),
                    # Docker holds back input that starts its detach keys
                    # (ctrl-p, ctrl-q by default: a bare ctrl-p, bash's
                    # previous-history, would wait for the next key). Make
                    # them a sequence no one types.
                    detach_keys=DETACH_KEYS,
                )
            except docker.errors.NotFound:
                raise ContainerGone("the session's container no longer exists") from None
            except docker.errors.APIError as e:
                if e.status_code == 409:
                    raise ContainerGone(
                        f"the session's container is not running: {_short(e)}"
                    ) from None
                raise
            return created["Id"], client.api_version

        exec_id, api_version = await self._call(_thd_create)
        stream = ExecStreamProtocol(
            exec_id,
            exec_start_request(api_version, exec_id, tty),
            process_protocol,
            on_closed=self._exec_stream_closed,
            resize=self.exec_resize,
            tty=tty,
        )
        try:
            await self._endpoint.connect(OneStream(stream))
        except Exception as e:
            raise self._unavailable(e) from None
        stream.upgraded.addTimeout(self._timeout, self._reactor)
        await stream.upgraded
        if tty and size is not None:
            cols, rows = size
            stream.resize(cols, rows)
        return stream

    def _exec_stream_closed(self, stream: ExecStreamProtocol, reason: Failure) -> None:
        d = Deferred.fromCoroutine(self._exit_status(stream.exec_id))
        d.addErrback(lambda f: (
            _log.warn("could not learn how exec {exec_id} ended: {error}",
                      exec_id=stream.exec_id, error=f.getErrorMessage()),
            None)[1])
        d.addCallback(lambda code: stream.process_protocol.processEnded(
            Failure(ProcessDone(0)) if code == 0 else Failure(ProcessTerminated(exitCode=code))
        ))

    async def _exit_status(self, exec_id: str) -> int | None:
        """
        The exit code of a finished exec; C{None} if it cannot be known
        (its container is gone, or it is still running after
        L{EXIT_CODE_WAIT} seconds).
        """
        waited = 0.0
        while True:
            info = await self._exec_inspect(exec_id)
            if info is None:
                return None
            if not info.get("Running"):
                return info.get("ExitCode")
            if waited >= EXIT_CODE_WAIT:
                return None
            await task.deferLater(self._reactor, EXIT_CODE_POLL, lambda: None)
            waited += EXIT_CODE_POLL

    def run_command(self, container_id: str, argv, user: str, workdir: str,
                    env: dict[str, str], stdin=b"", max_output: int = 1024 * 1024,
                    timeout: float | None = None) -> Deferred:
        return Deferred.fromCoroutine(self._run_command(
            container_id, argv, user, workdir, env, stdin, max_output, timeout))

    async def _run_command(self, container_id, argv, user, workdir, env, stdin, max_output,
                           timeout):
        collector = OutputCollector(max_output)
        stream = await self.spawn_exec(collector, container_id, argv, user, workdir, env,
                                       None, tty=False)
        transport = stream.transport
        timer = None

        def cut() -> None:
            # Docker cannot kill an exec: stop waiting for it, and let it go.
            collector.cut = True
            transport.abortConnection()

        if timeout is not None:
            timer = self._reactor.callLater(timeout, cut)
        failed = None
        try:
            if callable(stdin):
                await stdin(transport)
            elif stdin:
                stream.write(stdin)
            # The end of the input: a half-close, which Docker passes on
            # as the end of the command's stdin.
            if not transport.disconnected:
                transport.loseWriteConnection()
        except Exception:
            failed = Failure()
            transport.abortConnection()
        try:
            result = await collector.done
        finally:
            if timer is not None and timer.active():
                timer.cancel()
        if failed is not None:
            failed.raiseException()
        return result

    def export_workspace(self, container_id: str, path: str,
                         write: Callable[[bytes], None]) -> Deferred:
        """
        Stream C{path}'s tar from the container to C{write}, called on an
        export thread with each chunk (it may raise to stop the export).
        Docker holds the container's lock while the stream is open, so the
        stream's connection is closed as soon as the export ends, whether it
        read everything or not: never left for the garbage collector.
        """
        def _thd_export():
            def _thd_open(client):
                response = client._get(client._url("/containers/{0}/archive", container_id),
                                       params={"path": path}, stream=True)
                try:
                    client._raise_for_status(response)
                except BaseException:
                    response.close()
                    raise
                return response
            try:
                response = self._thd_call(_thd_open)
            except docker.errors.NotFound:
                raise ContainerGone(
                    f"{path} cannot be exported: the session's container is gone"
                ) from None
            try:
                for chunk in response.iter_content(EXPORT_CHUNK):
                    write(chunk)
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError) as e:
                raise self._unavailable(e) from None
            finally:
                response.close()
        return deferToThreadPool(self._reactor, self._export_pool, _thd_export)


def keeper_address(info: dict) -> tuple[str | None, bytes | None]:
    """
    From a container's C{docker inspect}: its address on a network of its
    own (none when it shares the host's or another container's namespace,
    or has no network) and its keeper's secret.
    """
    mode = (info.get("HostConfig") or {}).get("NetworkMode") or ""
    networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
    address = None
    if mode not in ("host", "none") and not mode.startswith("container:"):
        address = next((n.get("IPAddress") for n in networks.values() if n.get("IPAddress")),
                       None)
    labels = (info.get("Config") or {}).get("Labels") or {}
    return address, parse_secret(labels.get(SECRET_LABEL))


def _network(found: dict) -> dict:
    """
    What capsule needs of a network's C{docker network inspect}.
    """
    ipam = (found.get("IPAM") or {}).get("Config") or []
    return {
        "id": found["Id"],
        "name": found["Name"],
        "driver": found.get("Driver"),
        "internal": bool(found.get("Internal")),
        "options": dict(found.get("Options") or {}),
        "labels": dict(found.get("Labels") or {}),
        "subnets": [c["Subnet"] for c in ipam if c.get("Subnet")],
        "gateways": [c["Gateway"] for c in ipam if c.get("Gateway")],
    }


def _refuses_storage_opt(error: docker.errors.APIError) -> bool:
    """
    Whether the engine refused a create because its storage driver cannot
    limit a container's size ("--storage-opt is supported only for overlay
    over xfs with 'pquota' mount option", "Storage Opt is not supported").
    """
    text = str(error.explanation or error).lower()
    return error.status_code in (400, 500) and ("storage-opt" in text or "storage opt" in text)


def _short(error: Exception) -> str:
    if isinstance(error, docker.errors.APIError) and error.explanation:
        text = str(error.explanation)
    else:
        text = str(error) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
