"""
A live capsule, driven from outside: C{twistd -n capsule} started as a
subprocess on a free loopback port, its containers, its log, and waiting
for what it does with a deadline.

The integration tests (C{tests/integration/harness.py}), the benchmark
(C{bench/}) and the soak script (C{bench/soak.py}) all start their servers
through L{CapsuleServer}, and speak to them with the clients of
L{tests.support.clients}.  Neither module knows pytest.

 - L{CapsuleServer}: capsule with an instance name of its own, so that it
   only ever sees (and its owner only ever removes) its own containers.
 - L{wait_for} (blocking), L{poll} and L{eventually} (on the reactor): wait
   for a condition with a deadline, and say what did not happen.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker
import docker.errors
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from tests.support.httpclient import Response, request
from capsule.tuning import ENVIRONMENT as TUNING_ENVIRONMENT

LABEL_INSTANCE = "io.capsule.instance"
LABEL_SESSION = "io.capsule.session"
DEFAULT_IMAGE = "capsule-runtime:latest"


class WaitFailed(AssertionError):
    """
    Something awaited from a live capsule did not happen (in time).
    """


# -- waiting with a deadline ------------------------------------------------------


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """
    Call C{predicate} until it returns something true, and return that;
    raise L{WaitFailed} naming C{what} after C{timeout} seconds.  Blocking:
    for threads and scripts.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


async def with_timeout(d: defer.Deferred, seconds: float, what: str | None = None):
    """
    Await C{d}, cancelling it after C{seconds}: then raise L{WaitFailed}
    naming C{what} (or Twisted's C{TimeoutError} when C{what} is not given).
    """
    d.addTimeout(seconds, reactor)
    try:
        return await d
    except defer.TimeoutError:
        if what is None:
            raise
        raise WaitFailed(f"timed out after {seconds:g} s waiting for {what}") from None


async def poll(check, timeout: float, what: str, interval: float = 0.1):
    """
    Call C{check} (which returns a value, a Deferred or a coroutine) until
    its result is true, and return that; raise L{WaitFailed} naming C{what}
    after C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if reactor.seconds() >= deadline:
            raise WaitFailed(f"timed out after {timeout:g} s waiting for {what}")
        await sleep(interval)


async def eventually(predicate, timeout: float = 20, interval: float = 0.2,
                     what: str | None = None):
    """
    L{poll} C{predicate} on a thread (it may call Docker or read a log).
    """
    return await poll(lambda: deferToThread(predicate), timeout,
                      what or _describe(predicate), interval)


def _describe(predicate) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)


# -- Docker -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker_client() -> docker.DockerClient:
    return docker.from_env(timeout=60)


def instance_containers(instance: str, api: docker.APIClient | None = None) -> list[dict]:
    """
    The containers (running or not) of a capsule instance, as Docker's
    summaries: listing does not race with removals, unlike inspecting.
    """
    api = api or docker_client().api
    return api.containers(all=True, filters={"label": f"{LABEL_INSTANCE}={instance}"})


def session_container(session_id: str, api: docker.APIClient | None = None) -> str:
    """
    The id of session C{session_id}'s container, found by its label (its
    name says nothing of the session).

    @raise docker.errors.NotFound: no container has that label.
    """
    api = api or docker_client().api
    found = api.containers(all=True, filters={"label": f"{LABEL_SESSION}={session_id}"})
    if not found:
        raise docker.errors.NotFound(f"no container of session {session_id}")
    return found[0]["Id"]


def remove_container(api: docker.APIClient, container_id: str) -> None:
    """
    Remove a container and its volumes; one already gone or being removed
    is fine.
    """
    try:
        api.remove_container(container_id, force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as e:
        if "already in progress" not in str(e):
            raise


def remove_instance_containers(instance: str, api: docker.APIClient | None = None) -> int:
    """
    Remove every container of C{instance}; return how many there were.

    A server killed while it made containers leaves the engine finishing
    those requests: while a sweep finds some, another follows a second later.
    """
    api = api or docker_client().api
    removed = 0
    for _ in range(10):
        found = instance_containers(instance, api)
        for c in found:
            remove_container(api, c["Id"])
        removed += len(found)
        if not found:
            break
        time.sleep(1)
    return removed


def remove_instance_images(instance: str, api: docker.APIClient | None = None) -> int:
    """
    Remove every image of C{instance} (snapshots: their labels carry it);
    return how many.
    """
    api = api or docker_client().api
    found = api.images(filters={"label": f"{LABEL_INSTANCE}={instance}"})
    for image in found:
        # An untagged one (a fork's, once its tag went) is listed as
        # <none>:<none>, which is no reference: by its id.
        tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
        for tag in tags or [image["Id"]]:
            try:
                api.remove_image(tag, force=True)
            except docker.errors.NotFound:
                pass
    return len(found)


def remove_instance_volumes(instance: str, api: docker.APIClient | None = None) -> int:
    """
    Remove every volume of C{instance} (agent volumes: the claude
    profile's sessions have one, even without users); return how many.
    """
    api = api or docker_client().api
    found = api.volumes(filters={"label": f"io.capsule.instance={instance}"}).get(
        "Volumes") or []
    for volume in found:
        try:
            api.remove_volume(volume["Name"], force=True)
        except docker.errors.APIError:
            pass
    return len(found)


# -- the server -----------------------------------------------------------------------


class CapsuleServer:
    """
    C{twistd -n capsule} on a free loopback port, with its own instance name
    so that it only ever sees its own containers.

    @param workdir: where its log files go.
    @param extra: capsule's options (limits, pool size, grace...).
    @param tuning: capsule's tuning knobs by name (C{{"cleanup-interval":
        0.2}}, see L{capsule.tuning}), given in C{$CAPSULE_TUNING}.
    @param label: names its log files (default: the instance).
    @param own_session: start it in a process session of its own, so that
        a Ctrl-C at the terminal reaches only its owner, who then stops it.
    """

    def __init__(self, workdir: Path, *extra: str, image: str = DEFAULT_IMAGE,
                 instance: str | None = None, label: str | None = None,
                 env: dict | None = None, own_session: bool = False,
                 tuning: dict | None = None) -> None:
        self.port = free_port()
        self.instance = instance or f"test-{uuid.uuid4().hex[:10]}"
        self.label = label or self.instance
        self.log_path = Path(workdir) / f"capsule-{self.label}-{self.port}.log"
        self.out_path = self.log_path.with_suffix(".out")
        self.args = [
            str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=",
            f"--logfile={self.log_path}", "capsule",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--instance", self.instance, "--image", image,
            # The test servers share the engine's capsule network and run
            # at once: none fences it for all (a test of the firewall
            # says --firewall manage, on a network of its own).
            "--firewall", "off", *extra,
        ]
        # A server that hangs can then be made to show every thread's stack.
        self.env = {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}
        if tuning:
            self.env[TUNING_ENVIRONMENT] = ",".join(
                f"{name}={str(value).lower() if isinstance(value, bool) else value}"
                for name, value in tuning.items())
        self.own_session = own_session
        self.process: subprocess.Popen | None = None
        self._log_offset = 0
        self._api: docker.APIClient | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pool_size(self) -> int:
        """
        The warm pool's size it was started with.
        """
        value = 2  # capsule's default
        for i, arg in enumerate(self.args):
            if arg == "--pool-size":
                value = int(self.args[i + 1])
            elif arg.startswith("--pool-size="):
                value = int(arg.split("=", 1)[1])
        return value

    def start(self, timeout: float = 30) -> "CapsuleServer":
        """
        Start it and return once its port accepts connections.
        """
        with open(self.out_path, "wb") as out:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT,
                                            start_new_session=self.own_session)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"capsule exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"capsule did not listen within {timeout:g} s:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int | None:
        """
        Send C{sig} and wait for the process to end; return its exit code.
        One that does not end in time is made to dump its threads' stacks
        into its log, killed, and reported with the end of that log.
        """
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            # faulthandler dumps the stacks on SIGABRT: say where it hung.
            self.process.send_signal(signal.SIGABRT)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            raise RuntimeError(f"capsule did not stop within {timeout:g} s of {sig!r}:\n"
                               f"{self.log()[-6000:]}") from None

    def remove_containers(self) -> int:
        """
        Remove every container of its instance; return how many there were.
        """
        return remove_instance_containers(self.instance)

    def finish(self, workdir: Path | None = None) -> None:
        """
        Stop it, then remove its instance's containers and C{workdir},
        whatever the stop did (a benchmark's or a test's last word).
        """
        try:
            self.stop()
        finally:
            self.remove_containers()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)

    def containers(self) -> list[dict]:
        if self._api is None:
            self._api = docker_client().api
        return instance_containers(self.instance, self._api)

    # -- its log --

    def log(self) -> str:
        text = ""
        for path in (self.out_path, self.log_path):
            try:
                text += path.read_text(errors="replace")
            except FileNotFoundError:
                pass
        return text

    def new_log(self) -> str:
        """
        What the log file gained since the last call.
        """
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        self._log_offset += len(data)
        return data.decode("utf-8", "replace")

    def unhandled_errors(self) -> list[str]:
        return [line for line in self.log().splitlines()
                if "Unhandled" in line or "Traceback" in line]

    def problems(self) -> list[str]:
        """
        Lines of its log that speak of a failure or a warning.
        """
        words = ("Traceback", "Unhandled", "#error", "#critical", "#warn")
        return [line for line in self.log().splitlines() if any(w in line for w in words)]

    # -- HTTP and the process --

    def get(self, path: str) -> Response:
        return request(self.url + path)

    def health(self) -> tuple[int, dict]:
        status, _, body = self.get("/health")
        return status, json.loads(body or b"{}")

    def settled(self) -> bool:
        """
        Whether no session is live, no container is being removed, and the
        warm pool holds what it wants (its size, or more just after a burst).
        """
        _, body = self.health()
        pool = body.get("pool", {})
        # While sessions are taken fast, the pool holds more than its size.
        wanted = pool.get("target", self.pool_size)
        if body.get("sessions") != 0 or pool.get("ready", 0) != wanted:
            return False
        return len(self.containers()) == wanted

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for capsule (pid {self.pid})")
