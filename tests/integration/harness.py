"""
A real capsule server in a subprocess, and a real WebSocket client.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import docker
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("CAPSULE_TEST_IMAGE", "capsule-runtime:latest")
LABEL_INSTANCE = "io.capsule.instance"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker_client() -> docker.DockerClient:
    return docker.from_env(timeout=60)


def instance_containers(instance: str) -> list[dict]:
    """
    The containers (running or not) of a capsule instance, as Docker's
    summaries: listing does not race with removals, unlike inspecting.
    """
    return docker_client().api.containers(
        all=True, filters={"label": f"{LABEL_INSTANCE}={instance}"})


def remove_instance_containers(instance: str) -> int:
    found = instance_containers(instance)
    api = docker_client().api
    for c in found:
        try:
            api.remove_container(c["Id"], force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if "already in progress" not in str(e):
                raise
    return len(found)


class CapsuleServer:
    """
    C{twistd -n capsule} on a free loopback port, with its own instance name
    so that it only ever sees its own containers.
    """

    def __init__(self, tmp_path: Path, *extra: str, env: dict | None = None,
                 instance: str | None = None) -> None:
        self.port = free_port()
        self.instance = instance or f"test-{uuid.uuid4().hex[:10]}"
        self.log_path = tmp_path / f"capsule-{self.instance}-{self.port}.log"
        self.args = [
            str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=",
            f"--logfile={self.log_path}", "capsule",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--instance", self.instance, "--image", IMAGE, "--memory", "512m",
            "--cpus", "1", *extra,
        ]
        # A server that hangs can then be made to show every thread's stack.
        self.env = {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 30) -> "CapsuleServer":
        self._output = open(self.log_path.with_suffix(".out"), "wb")
        self.process = subprocess.Popen(self.args, env=self.env, cwd=ROOT,
                                        stdout=self._output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"capsule exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"capsule did not listen within {timeout} s:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int | None:
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
            raise RuntimeError(f"capsule did not stop within {timeout} s of {sig!r}:\n"
                               f"{self.log()[-6000:]}") from None

    def log(self) -> str:
        text = ""
        for path in (self.log_path.with_suffix(".out"), self.log_path):
            try:
                text += path.read_text(errors="replace")
            except FileNotFoundError:
                pass
        return text

    def get(self, path: str) -> tuple[int, dict, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def unhandled_errors(self) -> list[str]:
        return [line for line in self.log().splitlines()
                if "Unhandled" in line or "Traceback" in line]


class ClientProtocol(WebSocketClientProtocol):
    def onConnect(self, response):
        self.factory.client._protocol = self
        self.factory.client.binary = response.protocol == "capsule.binary.v1"

    def onOpen(self):
        self.factory.client._opened.callback(self.factory.client)

    def onMessage(self, payload, isBinary):
        self.factory.client._received(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        client = self.factory.client
        if not client._opened.called:
            client._opened.errback(ConnectionError(f"closed before open: {code} {reason}"))
        client.close_code, client.close_reason = code, reason
        client.closed.callback((code, reason))


class WSClient:
    """
    A real WebSocket client speaking capsule's JSON protocol.
    """

    def __init__(self, auto_ack: bool = True) -> None:
        self._protocol = None
        self.auto_ack = auto_ack
        self.binary = False
        # Binary protocol: the offset just past the last output byte.
        self.received = 0
        self._opened = defer.Deferred()
        self.closed = defer.Deferred()
        self.close_code = self.close_reason = None
        self.messages = defer.DeferredQueue()
        self.output = b""
        self.all_messages: list = []

    @classmethod
    async def connect(cls, url: str, session_id: str | None = None, origin=None,
                      binary: bool = False, offset: int | None = None,
                      auto_ack: bool = True) -> "WSClient":
        client = cls(auto_ack)
        query = []
        if session_id is not None:
            query.append(f"session_id={session_id}")
        if offset is not None:
            query.append(f"offset={offset}")
        if query:
            url = f"{url}?{'&'.join(query)}"
        factory = WebSocketClientFactory(
            url, origin=origin, protocols=["capsule.binary.v1"] if binary else None)
        factory.protocol = ClientProtocol
        factory.client = client
        factory.setProtocolOptions(autoPingInterval=None)
        host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
        await TCP4ClientEndpoint(reactor, host, int(port), timeout=10).connect(factory)
        await with_timeout(client._opened, 10)
        return client

    def _received(self, payload, is_binary):
        message = payload if is_binary else json.loads(payload)
        self.all_messages.append(message)
        if is_binary:
            self.output += payload
            self.received += len(payload)
            if self.auto_ack:
                self.ack()
        elif message.get("type") == "output":
            self.output += base64.b64decode(message["data"])
        elif message.get("type") == "connected" and "offset" in message:
            self.received = message["offset"]
        self.messages.put(message)

    def ack(self, offset: int | None = None) -> None:
        # Not once closing: raising inside dataReceived would make Twisted
        # abort the connection and drop frames still being written.
        if self._protocol.state != WebSocketProtocol.STATE_OPEN:
            return
        self.send({"type": "ack", "offset": self.received if offset is None else offset})

    def send(self, message) -> None:
        self.send_raw(json.dumps(message).encode())

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        self._protocol.sendMessage(payload, isBinary=binary)

    def type(self, text: str) -> None:
        self.send({"type": "input", "data": text})

    async def next(self, kind: str | None = None, timeout: float = 20) -> dict:
        """
        The next message (of C{kind}, skipping output), or fail on timeout.
        """
        while True:
            message = await with_timeout(self.messages.get(), timeout)
            if kind is None or (isinstance(message, dict) and message.get("type") == kind):
                return message
            if kind == "binary" and isinstance(message, bytes):
                return message

    async def start(self, cols=80, rows=24, timeout: float = 30) -> str:
        self.send({"type": "resize", "cols": cols, "rows": rows})
        message = await self.next("connected", timeout)
        return message["session_id"]

    async def until(self, pattern: bytes | str, timeout: float = 20) -> re.Match:
        """
        Wait until the output so far matches C{pattern}; return the match.
        """
        if isinstance(pattern, str):
            pattern = pattern.encode()
        regex = re.compile(pattern, re.S)
        deadline = reactor.seconds() + timeout
        while True:
            found = regex.search(self.output)
            if found:
                return found
            remaining = deadline - reactor.seconds()
            if remaining <= 0 or self.closed.called:
                raise AssertionError(
                    f"no {pattern!r} in output: {self.output[-2000:]!r}")
            try:
                await with_timeout(self.messages.get(), remaining)
            except defer.TimeoutError:
                pass

    async def run(self, command: str, timeout: float = 20) -> str:
        """
        Run a shell command and return what it printed (between markers).
        """
        marker = uuid.uuid4().hex[:8]
        self.output = b""
        self.type(f"echo {marker}B; {command}; echo {marker}E\r")
        found = await self.until(rf"{marker}B\r\n(.*?){marker}E\r\n".encode(), timeout)
        return found.group(1).decode("utf-8", "replace")

    async def close(self, code: int = 1000) -> None:
        if not self.closed.called:
            self._protocol.sendClose(code)
            await with_timeout(self.closed, 10)

    def drop(self) -> None:
        """
        Vanish without a close handshake, as a network drop does.
        """
        self._protocol.transport.abortConnection()


async def with_timeout(d: defer.Deferred, seconds: float):
    d.addTimeout(seconds, reactor)
    return await d


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def eventually(predicate, timeout: float = 20, interval: float = 0.2):
    """
    Poll C{predicate} (run on a thread: it may call Docker) until true.
    """
    from twisted.internet.threads import deferToThread
    deadline = reactor.seconds() + timeout
    while True:
        value = await deferToThread(predicate)
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"{predicate} did not become true within {timeout} s")
        await sleep(interval)
