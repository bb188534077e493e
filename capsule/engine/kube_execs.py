"""
The execs of the Kubernetes engine (L{capsule.engine.kubernetes}): a
process in a session's pod over the pods/exec WebSocket (L{PodExecs.spawn_exec},
streamed by the reactor through L{capsule.engine.kube_exec}, authenticated
as the REST client is), a command run to completion, and the workspace
export (C{tar} in the pod, its output written on the export pool).

L{PodExecs} is a base of L{capsule.engine.kubernetes.KubernetesAPI}: it
uses that class's reactor, configuration, thread pools and calls.
"""

from __future__ import annotations

from typing import Callable
from urllib.parse import urlencode, urlsplit

import urllib3.util
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from capsule.core.errors import ContainerGone, DockerError
from capsule.engine.command import OutputCollector
from capsule.engine.kube_exec import ExecClientFactory, ExecStream
from capsule.engine.kube_pods import CONTAINER, Unsupported


def exec_argv(argv, workdir: str | None, env: dict[str, str]) -> list[str]:
    """
    C{argv} run in C{workdir} with C{env} added: pods/exec has neither, so
    a shell sets them and then becomes the program.
    """
    argv = list(argv)
    if not workdir and not env:
        return argv
    program = ["env", *[f"{k}={v}" for k, v in env.items()], *argv] if env else argv
    return ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", workdir or ".", *program]


class PodExecs:
    """
    The execs of L{capsule.engine.kubernetes.KubernetesAPI} (its base).
    """

    def spawn_exec(self, process_protocol, container_id: str, argv, user: str,
                   workdir: str, env: dict[str, str], size: tuple[int, int] | None,
                   tty: bool = True) -> Deferred:
        return Deferred.fromCoroutine(self._spawn_exec(
            process_protocol, container_id, argv, user, workdir, env, size, tty))

    async def _spawn_exec(self, process_protocol, container_id, argv, user, workdir, env,
                          size, tty):
        if user not in self._exec_users:
            raise Unsupported(f"an exec as {user!r}: a pod's execs run as its user")
        query = [("command", a) for a in exec_argv(argv, workdir, env)] + [
            ("container", CONTAINER), ("stdin", "true"), ("stdout", "true"),
            ("stderr", "false" if tty else "true"), ("tty", "true" if tty else "false")]
        path = (f"/api/v1/namespaces/{self.namespace}/pods/{container_id}/exec?"
                + urlencode(query))
        headers = await self._call(self._thd_headers)
        stream = ExecStream(self._reactor, container_id, process_protocol, tty)
        factory = ExecClientFactory(stream, self._ws_url(path), headers)
        try:
            await self._endpoint().connect(factory)
        except Exception as e:
            raise self._unavailable(e) from None
        stream.upgraded.addTimeout(self._timeout, self._reactor)
        await stream.upgraded
        if tty and size is not None:
            stream.resize(*size)
        return stream

    def _thd_headers(self) -> dict[str, str]:
        configuration = self._thd_configuration()
        hook = getattr(configuration, "refresh_api_key_hook", None)
        if hook is not None:
            hook(configuration)
        headers = {"User-Agent": "capsule"}
        token = configuration.get_api_key_with_prefix("authorization")
        if token:
            headers["Authorization"] = token
        elif configuration.username or configuration.password:
            headers.update(urllib3.util.make_headers(
                basic_auth=f"{configuration.username}:{configuration.password}"))
        return headers

    def _ws_url(self, path: str) -> str:
        url = urlsplit(self.host)
        scheme = "wss" if url.scheme == "https" else "ws"
        return f"{scheme}://{url.netloc}{url.path.rstrip('/')}{path}"

    def _endpoint(self):
        url = urlsplit(self.host)
        https = url.scheme == "https"
        endpoint = HostnameEndpoint(self._reactor, url.hostname,
                                    url.port or (443 if https else 80), timeout=self._timeout)
        if not https:
            return endpoint
        return wrapClientTLS(self._tls_options(url.hostname), endpoint)

    def _tls_options(self, hostname: str):
        """
        The exec streams' TLS options, made once per configuration: their
        files (client certificate, key, authority) are read then, not at
        each exec on the reactor thread.
        """
        configuration = self._configuration
        cached = getattr(self, "_tls_cache", None)
        if cached is not None and cached[0] is configuration:
            return cached[1]
        client_certificate = None
        if configuration.cert_file and configuration.key_file:
            with open(configuration.cert_file, "rb") as c, open(configuration.key_file,
                                                                  "rb") as k:
                client_certificate = ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
        if not configuration.verify_ssl:
            options = ssl.CertificateOptions(
                verify=False, **({"privateKey": client_certificate.privateKey.original,
                                  "certificate": client_certificate.original}
                                 if client_certificate else {}))
        else:
            trust = None
            if configuration.ssl_ca_cert:
                with open(configuration.ssl_ca_cert, "rb") as f:
                    trust = ssl.Certificate.loadPEM(f.read())
            options = ssl.optionsForClientTLS(
                getattr(configuration, "tls_server_name", None) or hostname,
                trustRoot=trust, clientCertificate=client_certificate)
        self._tls_cache = (configuration, options)
        return options

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
        timer = None

        def cut() -> None:
            collector.cut = True
            stream.abort()

        if timeout is not None:
            timer = self._reactor.callLater(timeout, cut)
        failed = None
        try:
            if callable(stdin):
                await stdin(stream)
            elif stdin:
                stream.write(stdin)
            stream.close_input()
        except Exception:
            failed = Failure()
            stream.abort()
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
        C{path} as a tar archive, made by C{tar} in the pod (as C{kubectl
        cp} does): each chunk of its output is given to C{write} on an
        export thread, and the stream is paused meanwhile.
        """
        return Deferred.fromCoroutine(self._export(container_id, path, write))

    async def _export(self, container_id, path, write):
        parent, _, name = path.rstrip("/").rpartition("/")
        exporter = _Exporter(self._reactor, self._export_pool, write)
        try:
            stream = await self.spawn_exec(
                exporter, container_id, ["tar", "-C", parent or "/", "-cf", "-", name or "."],
                "", "", {}, None, tty=False)
        except ContainerGone:
            raise ContainerGone(f"{path} cannot be exported: the session's pod is gone"
                                ) from None
        stream.close_input()
        code = await exporter.done
        if code != 0:
            raise DockerError(f"exporting {path} failed (tar exited with {code}):"
                              f" {exporter.errors[:300].decode('utf-8', 'replace')}")


class _Exporter(OutputCollector):
    """
    An export's process protocol: stdout to C{write} on the export pool,
    one chunk at a time (the stream paused meanwhile); stderr kept.
    """

    def __init__(self, reactor, pool, write) -> None:
        super().__init__(0)
        self._reactor, self._pool, self._write = reactor, pool, write
        self._queue = Deferred()
        self._queue.callback(None)
        self.errors = b""
        self.failure: Failure | None = None
        self.done = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self.errors = (self.errors + data)[:4096]
            return
        if fd != 1 or self.failure is not None:
            return
        self.transport.pauseProducing()

        def write(_):
            return deferToThreadPool(self._reactor, self._pool, self._write, data)

        def written(result):
            if isinstance(result, Failure):
                self.failure = result
                self.transport.abort()
            else:
                self.transport.resumeProducing()
        self._queue.addCallback(write)
        self._queue.addBoth(written)

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)

        def finish(_):
            if self.failure is not None:
                self.done.errback(self.failure)
            else:
                self.done.callback(code)
        self._queue.addCallback(finish)
