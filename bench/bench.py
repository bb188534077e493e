#!/usr/bin/env python3
"""
capsule's benchmark: what a visitor feels, next to the physical floor.

    make bench                     # the full run (a few minutes)
    make bench ARGS=--quick        # a reduced run, for smoke-testing
    .venv/bin/python bench/bench.py --help

It starts ``twistd -n capsule`` itself (on a free loopback port, with an
instance name ``bench-<random>`` of its own), speaks real WebSocket to it, and
measures, in one run:

1. connect -> usable shell (open a WebSocket, resize, ``connected``, then
   ``echo $((6*7))__RDY`` until ``42__RDY`` comes back): cold (``--pool-size
   0``) and warm (``--pool-size 2``, the pool full before each session);
2. keystroke echo round trip at bash's prompt (``x``, then a backspace, keys
   10 ms apart), binary and JSON protocols, timed with a blocking client on
   each side (websocket-client for capsule; the Twisted clients' figures go
   in the notes);
3. output throughput of ``head -c N /dev/zero | base64`` until a final marker,
   binary and JSON (medians of several runs: the PTY's rate wanders), with
   where the machine's CPU went meanwhile (``bench/cpuwatch.py``);
4. many concurrent sessions: time until all are usable, and capsule's RSS
   before, during and after;
5. a flood to a slow reader (binary with slow acks, JSON with TCP
   backpressure only): capsule's RSS, then how fast capsule notices the
   client left and removes the container once the grace period is over;
6. the floors, with docker-py and Twisted and no capsule: container
   create+start+exec, plain exec, the same many at once, and the raw exec
   stream's throughput and echo (read through capsule's own exec-start
   upgrade, ``capsule.exec_process.ExecStreamProtocol``).

Each capsule figure is measured in turn with its floor, so that a change in
the machine's load hits both alike.  ``--capsule-arg`` passes options to every
capsule started (``--capsule-arg=--coalesce-ms=0``).

It prints one Markdown table (each figure, its floor, the ratio, the target)
on stdout; progress goes to stderr.  Whatever happens (failure, Ctrl-C), it
stops the capsule servers it started and removes every container of its
instance and every floor container it made (labelled
``io.capsule.bench.run=<random>``).

The client runs in the same machine as capsule and dockerd: its own CPU time
competes with theirs, and the notes under the table say how much it used.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import docker
import docker.errors
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.python.threadpool import ThreadPool

from capsule.docker_api import docker_host_endpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpuwatch import CpuWatch, describe as describe_cpu  # noqa: E402
from capsule.exec_process import ExecStreamProtocol, exec_start_request

ROOT = Path(__file__).resolve().parents[1]
BINARY_PROTOCOL = "capsule.binary.v1"
LABEL_INSTANCE = "io.capsule.instance"
LABEL_SESSION = "io.capsule.session"
LABEL_BENCH = "io.capsule.bench"
LABEL_BENCH_RUN = "io.capsule.bench.run"

# What a session container gets: capsule's defaults, passed to capsule
# explicitly and used as they are for the floor containers.
MEMORY, CPUS, PIDS = "4g", 2.0, 256
USER, WORKDIR, HOSTNAME = "developer", "/workspace", "capsule"
ENVIRONMENT = {"TERM": "xterm-256color", "LANG": "en_US.UTF-8"}
SIZE = (80, 24)

READY_INPUT = b"echo $((6*7))__RDY\r"
READY_MARK = b"42__RDY"
END_MARK = b"T2END"
OUTPUT_PREFIX = b'{"type":"output","data":"'

# Targets (see the table).
TARGET_WARM = 1.5
TARGET_COLD = 1.15
TARGET_BINARY = 0.85
TARGET_JSON = 0.50
TARGET_ECHO_P50_MS = 1.0
TARGET_ECHO_P99_MS = 2.0
TARGET_RSS_PER_SESSION_MB = 1.0
TARGET_FLOOD_MB = 20.0
TARGET_GONE_AFTER_GRACE_S = 2.0

# Seconds between a key's echo and the next key in the echo tests.
KEY_GAP = 0.01
# Seconds of calm before each connect measurement.
QUIET = 0.2
# Threads for the concurrent floor's Docker calls: as many as capsule's default.
FLOOR_THREADS = 16

FULL = dict(sessions=10, keystrokes=500, throughput_bytes=100_000_000, repeats=5,
            concurrent=50, flood_seconds=20.0)
QUICK = dict(sessions=3, keystrokes=100, throughput_bytes=20_000_000, repeats=2,
             concurrent=10, flood_seconds=5.0)

# What --only may select: the measurements whose phase names start so.
ONLY = ("connect", "echo", "throughput", "concurrent", "flood")

_reactor = None  # the running reactor, set by amain()


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# -- small async helpers ------------------------------------------------------


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(_reactor, seconds, lambda: None)


async def with_timeout(d: defer.Deferred, seconds: float, what: str):
    d.addTimeout(seconds, _reactor)
    try:
        return await d
    except defer.TimeoutError:
        raise BenchError(f"timed out after {seconds:g} s waiting for {what}") from None


async def poll(predicate, timeout: float, interval: float, what: str):
    """
    Await C{predicate()} (a coroutine function) until it returns something
    true; fail after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        await sleep(interval)


def ms(seconds: float) -> float:
    return seconds * 1000.0


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values) -> dict:
    return {"n": len(values), "min": min(values), "median": statistics.median(values),
            "p90": percentile(values, 90), "p50": percentile(values, 50),
            "p99": percentile(values, 99), "max": max(values)}


# -- terminal output: counted, with a short tail to look for markers ---------


class Output:
    """
    Counts terminal bytes and keeps only a short tail, in which waiters look
    for a marker among the bytes received since they started waiting.
    """

    TAIL = 4096

    def __init__(self) -> None:
        self.total = 0
        self.chunks = 0
        self._buf = bytearray()
        self._buf_start = 0
        self._waiters: list = []
        self._lost: str | None = None

    def feed(self, data: bytes) -> None:
        before = self.total
        self.total += len(data)
        self.chunks += 1
        self._buf += data
        if self._waiters:
            self._check(before)
        if len(self._buf) > 2 * self.TAIL:
            cut = len(self._buf) - self.TAIL
            del self._buf[:cut]
            self._buf_start += cut

    def _find(self, marker: bytes, since: int, before: int) -> bool:
        start = max(since, before - len(marker) + 1, self._buf_start) - self._buf_start
        return self._buf.find(marker, start) >= 0

    def _check(self, before: int) -> None:
        waiting, self._waiters = self._waiters, []
        for marker, since, d in waiting:
            if self._find(marker, since, before):
                d.callback(self.total)
            else:
                self._waiters.append((marker, since, d))

    def tail(self, size: int = 300) -> bytes:
        return bytes(self._buf[-size:])

    def wait_for(self, marker: bytes, timeout: float, since: int | None = None) -> defer.Deferred:
        """
        Fire with the byte count once C{marker} appears in what was received
        after C{since} (default: from now on).
        """
        since = self.total if since is None else since
        if self._find(marker, since, since):
            return defer.succeed(self.total)
        if self._lost is not None:
            return defer.fail(BenchError(f"no {marker!r}: {self._lost}"))
        d = defer.Deferred()
        entry = (marker, since, d)
        self._waiters.append(entry)

        def timed_out():
            if entry in self._waiters:
                self._waiters.remove(entry)
                d.errback(BenchError(
                    f"no {marker!r} within {timeout:g} s; output ended with {self.tail()!r}"))

        call = _reactor.callLater(timeout, timed_out)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    def lost(self, why: str) -> None:
        self._lost = why
        waiting, self._waiters = self._waiters, []
        for marker, _, d in waiting:
            d.errback(BenchError(f"no {marker!r}: {why}; output ended with {self.tail()!r}"))


# -- a WebSocket terminal (capsule) -------------------------------------------


class _WSProtocol(WebSocketClientProtocol):
    def onConnect(self, response):
        term = self.factory.term
        term.protocol = self
        term.binary = response.protocol == BINARY_PROTOCOL

    def onOpen(self):
        # Autobahn means to set TCP_NODELAY but tries before its options are
        # in place, so it never does: set it, as browsers do.
        self.transport.setTcpNoDelay(True)
        self.factory.term.opened.callback(None)

    def onMessage(self, payload, isBinary):
        self.factory.term.message(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.factory.term.on_close(code, reason)


class WSTerm:
    """
    One capsule session from the client's side.  Binary protocol: output is
    acknowledged as a browser does (once 64 KiB are unacknowledged, or 50 ms
    after the last output), unless C{auto_ack} is off.
    """

    ACK_BYTES = 64 * 1024
    ACK_DELAY = 0.05

    def __init__(self, want_binary: bool, auto_ack: bool = True) -> None:
        self.want_binary = want_binary
        self.binary = False
        self.auto_ack = auto_ack
        self.protocol = None
        self.out = Output()
        self.opened = defer.Deferred()
        self.connected = defer.Deferred()
        self.exited = defer.Deferred()
        self.closed = defer.Deferred()
        self.session_id: str | None = None
        self.received = 0  # binary: offset just past the last output byte
        self.acked = 0
        self._ack_timer = None
        self.errors: list[dict] = []
        self.close_code = None

    @classmethod
    async def open(cls, port: int, binary: bool, auto_ack: bool = True,
                   timeout: float = 30) -> "WSTerm":
        term = cls(binary, auto_ack)
        url = f"ws://127.0.0.1:{port}/ws"
        factory = WebSocketClientFactory(url, protocols=[BINARY_PROTOCOL] if binary else None)
        factory.protocol = _WSProtocol
        factory.term = term
        factory.setProtocolOptions(utf8validateIncoming=False, autoPingInterval=0,
                                   openHandshakeTimeout=timeout, closeHandshakeTimeout=5)
        await TCP4ClientEndpoint(_reactor, "127.0.0.1", port, timeout=timeout).connect(factory)
        await with_timeout(term.opened, timeout, "the WebSocket handshake")
        if binary and not term.binary:
            raise BenchError("capsule did not accept the binary subprotocol")
        return term

    # -- frames in --

    def message(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            self.out.feed(payload)
            self.received += len(payload)
            if self.auto_ack:
                self._maybe_ack()
            return
        if payload.startswith(OUTPUT_PREFIX):
            self.out.feed(base64.b64decode(payload[len(OUTPUT_PREFIX):-2]))
            return
        message = json.loads(payload)
        kind = message.get("type")
        if kind == "connected":
            self.session_id = message["session_id"]
            self.received = self.acked = message.get("offset", 0)
            if not self.connected.called:
                self.connected.callback(message)
        elif kind == "output":
            self.out.feed(base64.b64decode(message["data"]))
        elif kind == "exit":
            if not self.exited.called:
                self.exited.callback(message.get("exit_code"))
        elif kind == "dropped":
            self.received = max(self.received, message.get("offset", 0))
        elif kind == "error":
            self.errors.append(message)

    def on_close(self, code, reason) -> None:
        self.close_code = code
        if self._ack_timer is not None and self._ack_timer.active():
            self._ack_timer.cancel()
        why = f"the WebSocket closed ({code} {reason}; errors {self.errors})"
        self.out.lost(why)
        for d in (self.opened, self.connected, self.exited):
            if not d.called:
                d.errback(BenchError(why))
        if not self.closed.called:
            self.closed.callback(code)

    def _maybe_ack(self) -> None:
        if self.received - self.acked >= self.ACK_BYTES:
            self.ack()
        elif self._ack_timer is None:
            self._ack_timer = _reactor.callLater(self.ACK_DELAY, self.ack)

    # -- frames out --

    @property
    def is_open(self) -> bool:
        return (self.protocol is not None and not self.closed.called
                and self.protocol.state == WebSocketProtocol.STATE_OPEN)

    def _send_text(self, message: dict) -> None:
        if self.is_open:
            self.protocol.sendMessage(json.dumps(message).encode(), isBinary=False)

    def ack(self) -> None:
        if self._ack_timer is not None:
            if self._ack_timer.active():
                self._ack_timer.cancel()
            self._ack_timer = None
        if self.binary and self.received > self.acked:
            self.acked = self.received
            self._send_text({"type": "ack", "offset": self.received})

    def resize(self, cols: int, rows: int) -> None:
        self._send_text({"type": "resize", "cols": cols, "rows": rows})

    def send_input(self, data: bytes) -> None:
        if not self.is_open:
            return
        if self.binary:
            self.protocol.sendMessage(data, isBinary=True)
        else:
            self._send_text({"type": "input", "data": data.decode("utf-8")})

    @property
    def transport(self):
        return self.protocol.transport

    async def exit(self, timeout: float = 20) -> None:
        """
        End the shell and wait for capsule's C{exit} frame and close.
        """
        if self.closed.called:
            return
        self.send_input(b"exit\r")
        try:
            await with_timeout(self.exited, timeout, "the exit frame")
            await with_timeout(self.closed, 10, "the close after exit")
        except BenchError:
            self.drop()
            raise

    def drop(self) -> None:
        if self.protocol is not None and not self.closed.called:
            self.protocol.transport.abortConnection()


async def ws_session(port: int, binary: bool, auto_ack: bool = True, timeout: float = 60):
    """
    Open a session and wait until it is usable: the connect -> usable shell
    measurement.  Returns the terminal and the milliseconds it took.
    """
    t0 = time.perf_counter()
    term = await WSTerm.open(port, binary, auto_ack, timeout)
    try:
        term.resize(*SIZE)
        await with_timeout(term.connected, timeout, "connected")
        since = term.out.total
        term.send_input(READY_INPUT)
        await term.out.wait_for(READY_MARK, timeout, since)
    except BaseException:
        term.drop()
        raise
    return term, ms(time.perf_counter() - t0)


# -- a raw Docker exec terminal (the floor) ------------------------------------


class _FloorShell(ProcessProtocol):
    def __init__(self, out: Output) -> None:
        self.out = out
        self.ended = defer.Deferred()

    def childDataReceived(self, childFD, data):
        self.out.feed(data)

    def processEnded(self, reason):
        self.out.lost("the exec stream closed")
        if not self.ended.called:
            self.ended.callback(None)


class RawExecTerm:
    """
    A tty exec read by the reactor through capsule's own exec-start upgrade
    (no docker-py socket, no thread): what capsule itself cannot beat.
    """

    def __init__(self) -> None:
        self.out = Output()
        self.shell = _FloorShell(self.out)
        self.stream: ExecStreamProtocol | None = None

    @classmethod
    async def open(cls, bench: "Bench", container_id: str, argv=("bash", "-l"),
                   pool=None) -> "RawExecTerm":
        term = cls()
        api = bench.api

        def create():
            created = api.exec_create(container_id, list(argv), stdin=True, tty=True, user=USER,
                                      workdir=WORKDIR, environment=dict(ENVIRONMENT))
            return created["Id"], api.api_version

        if pool is None:
            exec_id, version = await deferToThread(create)
        else:
            exec_id, version = await deferToThreadPool(_reactor, pool, create)
        stream = ExecStreamProtocol(
            exec_id, exec_start_request(version, exec_id), term.shell,
            on_closed=lambda s, reason: term.shell.processEnded(reason),
            resize=lambda eid, cols, rows: deferToThread(api.exec_resize, eid,
                                                         height=rows, width=cols))
        await connectProtocol(bench.docker_endpoint, stream)
        await with_timeout(stream.upgraded, 30, "the exec-start upgrade")
        stream.resize(*SIZE)
        term.stream = stream
        return term

    def send_input(self, data: bytes) -> None:
        self.stream.write(data)

    async def exit(self, timeout: float = 10) -> None:
        self.stream.write(b"exit\r")
        try:
            await with_timeout(self.shell.ended, timeout, "the floor shell's end")
        except BenchError:
            self.stream.loseConnection()


# -- lean terminals for the echo measurement ------------------------------------
#
# A keystroke's round trip is a fraction of a millisecond, and a Python
# event-loop client adds its own overhead to each one (Autobahn's frame
# handling, the reactor's turns): more than a browser's native WebSocket
# does.  So the echo table figures use the leanest client that can be had
# for each side alike: a blocking socket read and written on a thread of its
# own, with websocket-client for capsule and the exec-start upgrade for the
# floor.  The same measurement through the Twisted clients is kept in the
# notes.


class LeanExecTerm:
    """
    A tty exec on a blocking socket (the floor).
    """

    def __init__(self, host: str, api, container_id: str) -> None:
        exec_id = api.exec_create(container_id, ["bash", "-l"], stdin=True, tty=True, user=USER,
                                  workdir=WORKDIR, environment=dict(ENVIRONMENT))["Id"]
        if host.startswith("unix://"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(host[len("unix://"):])
        else:
            address = host.split("://", 1)[-1].rsplit(":", 1)
            self.sock = socket.create_connection((address[0], int(address[1])), timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(30)
        self.sock.sendall(exec_start_request(api.api_version, exec_id))
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(65536)
            if not data:
                raise BenchError("Docker closed the exec stream before it started")
            head += data
        status, self.pending = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in status.split(b"\r\n", 1)[0] + b" ":
            raise BenchError(f"exec start refused: {status[:200]!r}")
        api.exec_resize(exec_id, height=SIZE[1], width=SIZE[0])

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        data = self.sock.recv(65536)
        if not data:
            raise BenchError("the exec stream closed")
        return data

    def drain(self) -> None:
        self.pending = b""
        self.sock.settimeout(0.2)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            pass
        self.sock.settimeout(30)

    def close(self) -> None:
        try:
            self.sock.sendall(b"exit\r")
        except OSError:
            pass
        self.sock.close()


class LeanWSTerm:
    """
    A capsule session through websocket-client on a blocking socket.
    """

    def __init__(self, port: int, binary: bool) -> None:
        import websocket  # websocket-client

        self.binary = binary
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/ws", timeout=30,
            subprotocols=[BINARY_PROTOCOL] if binary else None,
            sockopt=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        if binary and self.ws.subprotocol != BINARY_PROTOCOL:
            raise BenchError("capsule did not accept the binary subprotocol")
        self.received = self.acked = 0
        self.ws.send(json.dumps({"type": "resize", "cols": SIZE[0], "rows": SIZE[1]}))
        while True:
            opcode, payload = self.ws.recv_data()
            message = json.loads(payload) if opcode == 1 else {}
            if message.get("type") == "connected":
                self.received = self.acked = message.get("offset", 0)
                break

    def send(self, data: bytes) -> None:
        if self.binary:
            self.ws.send_binary(data)
        else:
            self.ws.send(json.dumps({"type": "input", "data": data.decode()}))

    def recv(self) -> bytes:
        while True:
            opcode, payload = self.ws.recv_data()
            if opcode == 2:
                self.received += len(payload)
                if self.received - self.acked >= WSTerm.ACK_BYTES:
                    self.acked = self.received
                    self.ws.send(json.dumps({"type": "ack", "offset": self.received}))
                return payload
            if opcode == 1:
                message = json.loads(payload)
                if message.get("type") == "output":
                    return base64.b64decode(message["data"])
                if message.get("type") == "exit":
                    raise BenchError(f"the session ended: {message}")
            if opcode == 8:
                raise BenchError("capsule closed the WebSocket")

    def drain(self) -> None:
        import websocket

        self.ws.settimeout(0.2)
        try:
            while True:
                self.recv()
        except websocket.WebSocketTimeoutException:
            pass
        self.ws.settimeout(30)

    def close(self) -> None:
        try:
            self.send(b"exit\r")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                self.ws.recv_data()
        except Exception:
            pass
        self.ws.close()


def lean_keystrokes(make_term, count: int, gap: float = KEY_GAP) -> list[float]:
    """
    In a thread: open a terminal, wait until the shell is ready, then time
    C{count} keystrokes as L{Bench.keystrokes} does.
    """
    term = make_term()
    try:
        seen = b""

        def until(marker: bytes) -> None:
            nonlocal seen
            deadline = time.monotonic() + 30
            while marker not in seen:
                if time.monotonic() > deadline:
                    raise BenchError(f"no {marker!r}; output ended with {seen[-300:]!r}")
                seen = seen[-4096:] + term.recv()
            seen = seen[seen.index(marker) + len(marker):]

        term.send(READY_INPUT)
        until(READY_MARK)
        time.sleep(0.3)  # the prompt after the marker, as readline redraws it
        term.drain()
        seen = b""
        keys = ((b"x", b"x"), (b"\x7f", b"\x08"))
        times = []
        for i in range(count + count % 2):
            key, echo = keys[i % 2]
            t0 = time.perf_counter()
            term.send(key)
            until(echo)
            times.append(ms(time.perf_counter() - t0))
            if gap:
                time.sleep(gap)
        return times
    finally:
        term.close()


# -- a capsule server -----------------------------------------------------------


class Server:
    def __init__(self, bench: "Bench", label: str, *extra: str) -> None:
        self.bench = bench
        self.label = label
        self.port = free_port()
        self.log_path = bench.tmp / f"capsule-{label}-{self.port}.log"
        self.out_path = self.log_path.with_suffix(".out")
        self.pool_size = 0
        if "--pool-size" in extra:
            self.pool_size = int(extra[list(extra).index("--pool-size") + 1])
        twistd = Path(sys.executable).with_name("twistd")
        self.args = [
            str(twistd), "-n", "--pidfile=", f"--logfile={self.log_path}", "capsule",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--instance", bench.instance, "--image", bench.image,
            "--memory", MEMORY, "--cpus", f"{CPUS:g}", "--pids", str(PIDS),
            *bench.args.capsule_arg, *extra,
        ]
        self.process: subprocess.Popen | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    async def start(self, timeout: float = 60) -> "Server":
        say(f"starting capsule ({self.label}): {' '.join(self.args[4:])}")
        with open(self.out_path, "wb") as out:
            # A session of its own: a Ctrl-C at the terminal reaches the
            # bench, which then stops capsule in order.
            self.process = subprocess.Popen(self.args, cwd=ROOT, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.bench.processes.append(self.process)

        async def healthy():
            if self.process.poll() is not None:
                raise BenchError(f"capsule exited with {self.process.returncode}: "
                                 f"{self.log_text()[-2000:]}")
            try:
                status, body = await self.health()
            except Exception:
                return False
            return status == 200 and body.get("docker") and body.get("image")

        await poll(healthy, timeout, 0.1, f"capsule ({self.label}) to answer /health")
        await self.settle()
        return self

    async def health(self):
        def get():
            url = f"http://127.0.0.1:{self.port}/health"
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read() or b"{}")
        return await deferToThread(get)

    async def settle(self, timeout: float = 90) -> None:
        """
        Wait until no session is live, no container is being removed, and
        the warm pool is full.
        """
        async def settled():
            _, body = await self.health()
            if body.get("sessions") != 0 or body.get("pool", {}).get("ready", 0) != self.pool_size:
                return False
            containers = await self.bench.instance_containers()
            return len(containers) == self.pool_size

        await poll(settled, timeout, 0.1, f"capsule ({self.label}) to settle")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise BenchError("no VmRSS")

    def log_text(self) -> str:
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

    def problems(self) -> list[str]:
        return [line for line in self.log_text().splitlines()
                if any(word in line for word in ("Traceback", "Unhandled", "#error", "#critical",
                                                 "#warn"))]

    async def stop(self, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            await sleep(0.05)
        if self.process.poll() is None:
            say(f"capsule ({self.label}) did not stop within {timeout:g} s: killing it")
            self.process.kill()
            self.process.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the bench ---------------------------------------------------------------------


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.p = dict(QUICK if args.quick else FULL)
        for key in self.p:
            value = getattr(args, key, None)
            if value is not None:
                self.p[key] = value
        self.run_id = uuid.uuid4().hex[:10]
        self.instance = f"bench-{self.run_id}"
        self.image = args.image
        self.host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self.api = docker.APIClient(base_url=self.host, version="auto", timeout=60,
                                    max_pool_size=FLOOR_THREADS + 4)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"capsule-{self.instance}-"))
        self.docker_endpoint = None
        self.processes: list[subprocess.Popen] = []
        self.servers: list[Server] = []
        self.results: dict = {}
        self.failures: dict[str, str] = {}
        self.notes: list[str] = []
        self.other_containers = 0
        self.finished = False
        self.load_before = self.load_after = None
        self.engine_version = "?"

    # -- docker helpers --

    async def instance_containers(self) -> list[dict]:
        return await deferToThread(self.api.containers, all=True,
                                   filters={"label": f"{LABEL_INSTANCE}={self.instance}"})

    async def session_containers(self, session_id: str) -> list[dict]:
        return await deferToThread(self.api.containers, all=True,
                                   filters={"label": f"{LABEL_SESSION}={session_id}"})

    def _thd_make_floor_container(self) -> str:
        api = self.api
        host_config = api.create_host_config(mem_limit=MEMORY, memswap_limit=MEMORY,
                                             nano_cpus=int(CPUS * 1e9), pids_limit=PIDS,
                                             init=True)
        container = api.create_container(
            self.image, command=["sleep", "infinity"], name=f"bench-floor-{uuid.uuid4()}",
            hostname=HOSTNAME, user=USER, working_dir=WORKDIR, environment=dict(ENVIRONMENT),
            labels={LABEL_BENCH: "1", LABEL_BENCH_RUN: self.run_id},
            host_config=host_config, detach=True)
        api.start(container["Id"])
        return container["Id"]

    def _thd_remove(self, container_id: str) -> None:
        try:
            self.api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if "already in progress" not in str(e):
                raise

    async def remove(self, container_id: str) -> None:
        await deferToThread(self._thd_remove, container_id)

    # -- phases --

    async def phase(self, name: str, coroutine_function, *args):
        """
        Run one measurement; a failure is recorded (and shown in the table),
        and the bench goes on with the next one.
        """
        if self.args.only and not any(name.startswith(kind) for kind in self.args.only):
            return None
        say(f"--- {name}")
        try:
            return await coroutine_function(*args)
        except Exception as e:
            message = str(e) or type(e).__name__
            self.failures[name] = message
            say(f"{name} FAILED: {message}")
            return None

    async def run(self) -> None:
        self.docker_endpoint = docker_host_endpoint(_reactor, self.host)
        others = await deferToThread(self.api.containers)
        self.other_containers = len(others)
        self.load_before = os.getloadavg()
        say(f"instance {self.instance}, image {self.image}, "
            f"{'quick' if self.args.quick else 'full'} run: {self.p}; logs in {self.tmp}")
        if others:
            say(f"{len(others)} other running container(s) on this engine compete for the CPU")
        # Each capsule figure is measured next to its floor, alternately,
        # so that a change in the machine's load hits both alike.
        await self.with_server("cold", ["--pool-size", "0"], self.cold_suite)
        await self.with_server("warm", ["--pool-size", "2"], self.warm_suite)
        await self.with_server("flood", ["--pool-size", "0", "--grace", "1",
                                         "--cleanup-interval", "0.2"], self.flood_suite)
        self.load_after = os.getloadavg()

    async def with_server(self, label: str, extra, suite) -> None:
        server = Server(self, label, *extra)
        self.servers.append(server)
        try:
            await server.start()
            await suite(server)
        except Exception as e:
            self.failures[f"capsule ({label})"] = str(e) or type(e).__name__
            say(f"capsule ({label}) FAILED: {e}")
        finally:
            await server.stop()
            left = await self.instance_containers()
            for c in left:
                await self.remove(c["Id"])
            problems = server.problems()
            if problems:
                self.notes.append(f"capsule ({label}) logged {len(problems)} warning/error line(s),"
                                  f" first: `{problems[0][:200]}`")
                say(f"capsule ({label}) log problems:\n  " + "\n  ".join(problems[:10]))
            if left:
                self.notes.append(f"{len(left)} container(s) of capsule ({label}) were still"
                                  " there after it stopped (removed by the bench)")

    # -- the suites --

    async def cold_suite(self, server: Server) -> None:
        await self.phase("connect, cold", self.connect_cold, server)

    async def warm_suite(self, server: Server) -> None:
        floor_container = await deferToThread(self._thd_make_floor_container)
        try:
            await self.phase("connect, warm", self.connect_warm, server, floor_container)
            await self.phase("echo", self.echo, server, floor_container)
            await self.phase("throughput: generator alone", self.generator, floor_container)
            await self.phase("throughput", self.throughput_rounds, server, floor_container)
        finally:
            await self.remove(floor_container)
        await self.phase("concurrent floor", self.floor_concurrent, server)
        await self.phase("concurrent sessions", self.capsule_concurrent, server)

    async def flood_suite(self, server: Server) -> None:
        for binary in (True, False):
            name = "binary" if binary else "json"
            await self.phase(f"flood ({name})", self.capsule_flood, server, binary)

    # -- connect -> usable shell --

    async def connect_cold(self, server: Server) -> None:
        floor, capsule = [], []
        for i in range(self.p["sessions"]):
            await self.quiet(server)
            floor.append(await self.floor_create_start_exec())
            await self.quiet(server)
            capsule.append(await self.capsule_connect(server))
            say(f"cold #{i + 1}: capsule {capsule[-1]:.0f} ms, floor create+start+exec"
                f" {floor[-1]:.0f} ms")
        await server.settle()
        self.results["floor_cold"] = summary(floor)
        self.results["cold"] = summary(capsule)

    async def connect_warm(self, server: Server, container_id: str) -> None:
        floor, capsule = [], []
        for i in range(self.p["sessions"]):
            await self.quiet(server)
            floor.append(await self.floor_plain_exec(container_id))
            # The pool is full again (and no removal is under way): each
            # session measures a warm start.
            await self.quiet(server)
            capsule.append(await self.capsule_connect(server))
            say(f"warm #{i + 1}: capsule {capsule[-1]:.0f} ms, floor plain exec"
                f" {floor[-1]:.0f} ms")
        await server.settle()
        self.results["floor_exec"] = summary(floor)
        self.results["warm"] = summary(capsule)

    async def quiet(self, server: Server) -> None:
        """
        Before each measurement: capsule has finished removing containers
        and refilling its pool, then a moment of calm.
        """
        await server.settle()
        await sleep(QUIET)

    async def capsule_connect(self, server: Server) -> float:
        term, elapsed = await ws_session(server.port, binary=True)
        await term.exit()
        return elapsed

    async def floor_create_start_exec(self) -> float:
        t0 = time.perf_counter()
        container_id = await deferToThread(self._thd_make_floor_container)
        try:
            term = await RawExecTerm.open(self, container_id)
            since = term.out.total
            term.send_input(READY_INPUT)
            await term.out.wait_for(READY_MARK, 60, since)
            elapsed = ms(time.perf_counter() - t0)
            await term.exit()
        finally:
            await self.remove(container_id)
        return elapsed

    async def floor_plain_exec(self, container_id: str) -> float:
        t0 = time.perf_counter()
        term = await RawExecTerm.open(self, container_id)
        since = term.out.total
        term.send_input(READY_INPUT)
        await term.out.wait_for(READY_MARK, 30, since)
        elapsed = ms(time.perf_counter() - t0)
        await term.exit()
        return elapsed

    # -- keystroke echo --

    async def echo(self, server: Server, container_id: str) -> None:
        """
        The lean clients first (the table's figures), then the Twisted ones
        (the notes'), each floor just before its capsule figures.
        """
        count = self.p["keystrokes"]

        async def lean(key: str, label: str, make_term) -> None:
            times = await deferToThread(lean_keystrokes, make_term, count)
            self.results[key] = result = summary(times)
            say(f"{label} echo, lean client: p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f}"
                f" ms, max {result['max']:.2f} ms over {result['n']} keystrokes"
                f" {KEY_GAP * 1000:g} ms apart")

        await lean("floor_echo", "floor (raw exec)",
                   lambda: LeanExecTerm(self.host, self.api, container_id))
        for binary in (True, False):
            name = "binary" if binary else "json"
            await server.settle()
            await lean(f"echo_{name}", f"capsule ({name})",
                       lambda: LeanWSTerm(server.port, binary))

        term = await RawExecTerm.open(self, container_id)
        try:
            await self.ready(term)
            self.results["floor_echo_twisted"] = await self.keystrokes(term, "floor (raw exec)")
            self.results["floor_echo_b2b"] = await self.keystrokes(
                term, "floor (raw exec), back to back", count=100, gap=0)
        finally:
            await term.exit()
        for binary in (True, False):
            name = "binary" if binary else "json"
            await server.settle()
            term, _ = await ws_session(server.port, binary)
            try:
                await self.ready(term)
                self.results[f"echo_{name}_twisted"] = await self.keystrokes(
                    term, f"capsule ({name})")
                if binary:
                    self.results["echo_b2b"] = await self.keystrokes(
                        term, f"capsule ({name}), back to back", count=100, gap=0)
            finally:
                await term.exit()

    # -- throughput --

    async def generator(self, container_id: str) -> None:
        term = await RawExecTerm.open(self, container_id)
        try:
            await self.ready(term)
            n = self.p["throughput_bytes"]
            since = term.out.total
            t0 = time.perf_counter()
            term.send_input(f"head -c {n} /dev/zero | base64 >/dev/null;"
                            " echo T$((1+1))END\r".encode())
            await term.out.wait_for(END_MARK, 120, since)
            elapsed = time.perf_counter() - t0
            produced = math.ceil(n / 57) * 77  # base64's 76-column lines
            self.results["generator"] = produced / elapsed / 1e6
            say(f"generator alone (to /dev/null in the container): "
                f"{self.results['generator']:.0f} MB/s")
        finally:
            await term.exit()

    async def throughput_rounds(self, server: Server, container_id: str) -> None:
        """
        Rounds of floor, binary, JSON in turn: the PTY's rate wanders by
        tens of percent from one run to the next on a busy machine, so the
        median of several interleaved runs is what is compared.
        """
        runs: dict[str, list] = {}

        def keep(key, result):
            runs.setdefault(key, []).append(result)

        for i in range(self.p["repeats"]):
            term = await RawExecTerm.open(self, container_id)
            try:
                await self.ready(term)
                keep("floor_throughput", await self.throughput(term, "floor (raw exec stream)"))
            finally:
                await term.exit(timeout=60)
            for binary in (True, False):
                name = "binary" if binary else "json"
                await server.settle()
                term, _ = await ws_session(server.port, binary)
                try:
                    await self.ready(term)
                    keep(f"throughput_{name}",
                         await self.throughput(term, f"capsule ({name})", server))
                finally:
                    await term.exit(timeout=60)
        for key, results in runs.items():
            ordered = sorted(results, key=lambda result: result["mbps"])
            self.results[key] = {
                **ordered[(len(ordered) - 1) // 2],  # the median run (the lower one if even)
                "median": statistics.median(result["mbps"] for result in results),
                "best": ordered[-1]["mbps"],
                "all": [result["mbps"] for result in results],
            }

    # -- the shared measurements --

    async def ready(self, term) -> None:
        since = term.out.total
        term.send_input(READY_INPUT)
        await term.out.wait_for(READY_MARK, 30, since)
        # Let readline finish redrawing the prompt.
        await sleep(0.3)

    async def keystrokes(self, term, label: str, count: int | None = None,
                         gap: float = KEY_GAP) -> dict:
        """
        Type C{x} and a backspace in turn at an empty prompt; each one's
        time until readline's echo (C{x}, then a C{\\b}) comes back.  Keys
        are C{gap} seconds apart (after the echo): a fast typist's pace is
        still much slower, and capsule gathers output that follows a send
        within its coalescing delay (2 ms).
        """
        keys = ((b"x", b"x"), (b"\x7f", b"\x08"))
        count = self.p["keystrokes"] if count is None else count
        count += count % 2
        times = []
        deadline = time.monotonic() + 60 + count * (gap + 0.05)
        for i in range(count):
            if time.monotonic() > deadline:
                raise BenchError(f"{label}: keystrokes took too long ({i} done)")
            key, echo = keys[i % 2]
            since = term.out.total
            t0 = time.perf_counter()
            term.send_input(key)
            await term.out.wait_for(echo, 5, since)
            times.append(ms(time.perf_counter() - t0))
            if gap:
                await sleep(gap)
        result = summary(times)
        say(f"{label} echo: p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms,"
            f" max {result['max']:.2f} ms over {count} keystrokes {gap * 1000:g} ms apart")
        return result

    async def throughput(self, term, label: str, server: Server | None = None) -> dict:
        n = self.p["throughput_bytes"]
        command = f"head -c {n} /dev/zero | base64; echo T$((1+1))END\r".encode()
        since = term.out.total
        chunks0 = term.out.chunks
        names = {os.getpid(): "bench client"}
        if server:
            names[server.pid] = "capsule"
        watch = CpuWatch(_reactor, names)
        watch.start()
        t0 = time.perf_counter()
        term.send_input(command)
        try:
            await term.out.wait_for(END_MARK, max(120, n / 1e6), since)
        finally:
            cpu = watch.stop()
        elapsed = time.perf_counter() - t0
        received = term.out.total - since
        chunks = term.out.chunks - chunks0
        result = {"bytes": received, "seconds": elapsed, "mbps": received / elapsed / 1e6,
                  "chunk": received / max(1, chunks),
                  "client_cpu": cpu["groups"].get("bench client", 0.0),
                  "server_cpu": cpu["groups"].get("capsule", 0.0) if server else None,
                  "cpu": cpu}
        say(f"{label} throughput: {received / 1e6:.1f} MB in {elapsed:.2f} s ="
            f" {result['mbps']:.1f} MB/s in {chunks} pieces of {result['chunk'] / 1024:.0f} KiB"
            f" on average (bench client CPU {result['client_cpu']:.2f} s"
            + (f", capsule CPU {result['server_cpu']:.2f} s" if server else "") + ")")
        say(f"  {label}: {describe_cpu(cpu, received / 1e6)}")
        await sleep(0.3)
        return result

    async def floor_concurrent(self, server: Server) -> None:
        """
        N containers created, started and exec'd at once through docker-py
        on a pool of capsule's size: what N visitors arriving together
        cannot beat (all cold: no pool).
        """
        n = self.p["concurrent"]
        await self.quiet(server)
        pool = ThreadPool(minthreads=0, maxthreads=FLOOR_THREADS, name="bench-floor")
        pool.start()
        ids: list[str] = []
        terms: list[RawExecTerm] = []

        async def one():
            t0 = time.perf_counter()
            container_id = await deferToThreadPool(_reactor, pool,
                                                   self._thd_make_floor_container)
            ids.append(container_id)
            term = await RawExecTerm.open(self, container_id, pool=pool)
            terms.append(term)
            since = term.out.total
            term.send_input(READY_INPUT)
            await term.out.wait_for(READY_MARK, 180, since)
            return ms(time.perf_counter() - t0)

        try:
            t0 = time.perf_counter()
            outcomes = await defer.DeferredList([defer.ensureDeferred(one()) for _ in range(n)],
                                                consumeErrors=True)
            all_usable = time.perf_counter() - t0
            times = [value for ok, value in outcomes if ok]
            failed = [value.getErrorMessage() for ok, value in outcomes if not ok]
            say(f"floor: {len(times)}/{n} containers usable after {all_usable:.2f} s")
        finally:
            await defer.DeferredList([defer.ensureDeferred(t.exit()) for t in terms],
                                     consumeErrors=True)
            await defer.DeferredList([deferToThreadPool(_reactor, pool, self._thd_remove, c)
                                      for c in ids], consumeErrors=True)
            pool.stop()
        self.results["floor_concurrent"] = {"n": n, "ok": len(times), "all_usable_s": all_usable,
                                            "times": summary(times) if times else None}
        if failed:
            raise BenchError(f"{len(failed)} floor container(s) failed: {failed[0]}")

    async def capsule_concurrent(self, server: Server) -> None:
        n = self.p["concurrent"]
        await server.settle()
        await sleep(1)
        before = server.rss_mb()
        peak = [before]
        sampler = task.LoopingCall(lambda: peak.append(server.rss_mb()))
        sampler.start(0.2)
        terms = []
        try:
            t0 = time.perf_counter()
            outcomes = await defer.DeferredList(
                [defer.ensureDeferred(ws_session(server.port, True, timeout=180))
                 for _ in range(n)], consumeErrors=True)
            all_usable = time.perf_counter() - t0
            times = []
            failed = []
            for ok, value in outcomes:
                if ok:
                    terms.append(value[0])
                    times.append(value[1])
                else:
                    failed.append(value.getErrorMessage())
            await sleep(0.5)
            during = server.rss_mb()
            _, body = await server.health()
            say(f"{len(terms)}/{n} sessions usable after {all_usable:.2f} s;"
                f" capsule RSS {before:.1f} -> {during:.1f} MB, /health sessions"
                f" {body.get('sessions')}")
            if failed:
                say(f"{len(failed)} session(s) failed, first: {failed[0]}")
        finally:
            exits = await defer.DeferredList(
                [defer.ensureDeferred(t.exit(timeout=60)) for t in terms], consumeErrors=True)
            sampler.stop()
        exit_failures = [f.getErrorMessage() for ok, f in exits if not ok]
        await server.settle(timeout=180)
        await sleep(2)
        after = server.rss_mb()
        self.results["concurrent"] = {
            "n": n, "ok": len(terms), "failed": failed, "exit_failures": exit_failures,
            "all_usable_s": all_usable, "times": summary(times) if times else None,
            "before": before, "during": during, "after": after, "peak": max(peak),
            "per_session": (during - before) / max(1, len(terms)),
        }
        say(f"capsule RSS after all {n} exited and were removed: {after:.1f} MB"
            f" (peak {max(peak):.1f} MB)")
        if failed or exit_failures:
            raise BenchError(f"{len(failed)} session(s) did not start, {len(exit_failures)}"
                             f" did not exit cleanly: {(failed + exit_failures)[0]}")

    async def capsule_flood(self, server: Server, binary: bool) -> None:
        name = "binary" if binary else "json"
        seconds = self.p["flood_seconds"]
        await server.settle()
        term, _ = await ws_session(server.port, binary, auto_ack=False)
        term.ack()
        session_id = term.session_id
        await self.ready(term)
        term.ack()
        idle_samples = []
        for _ in range(5):
            idle_samples.append(server.rss_mb())
            await sleep(0.2)
        idle = max(idle_samples)
        samples = []
        sampler = task.LoopingCall(lambda: samples.append(server.rss_mb()))
        sampler.start(0.2)
        try:
            term.send_input(b"yes $(printf 'x%.0s' {1..100})\r")
            received0 = term.out.total
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end and not term.closed.called:
                # Mostly not reading the socket at all; now and then a sip,
                # and an ack of what was read.
                term.transport.pauseProducing()
                await sleep(0.95)
                term.transport.resumeProducing()
                await sleep(0.05)
                if binary:
                    term.ack()
        finally:
            sampler.stop()
        if term.closed.called:
            raise BenchError(f"capsule closed the slow client's connection ({term.close_code})")
        got = term.out.total - received0
        peak = max(samples) if samples else idle
        server.new_log()
        # The client leaves without a word, with unread data in the pipe.
        term.transport.pauseProducing()
        t_drop = time.perf_counter()
        term.drop()
        needle = f"client left session {session_id}"
        seen = []

        async def logged():
            seen.append(server.new_log())
            return needle in "".join(seen[-2:])

        await poll(logged, 30, 0.005, "capsule to log that the client left")
        t_left = time.perf_counter() - t_drop

        async def gone():
            return not await self.session_containers(session_id)

        await poll(gone, 60, 0.05, "the flood session's container to be removed")
        t_gone = time.perf_counter() - t_drop
        await server.settle()
        await sleep(1)
        after = server.rss_mb()
        self.results[f"flood_{name}"] = {
            "seconds": seconds, "idle": idle, "peak": peak, "delta": peak - idle,
            "after": after, "client_mb": got / 1e6, "left_s": t_left, "gone_s": t_gone,
            "grace": 1.0,
        }
        say(f"flood ({name}): RSS idle {idle:.1f} MB, peak {peak:.1f} MB (+{peak - idle:.1f}),"
            f" after {after:.1f} MB; the client read {got / 1e6:.1f} MB in {seconds:g} s;"
            f" left logged after {ms(t_left):.0f} ms; container gone after {t_gone:.2f} s")

    # -- the table --

    def table(self) -> str:
        r, f = self.results, self.failures
        rows = []

        def verdict(ok: bool | None) -> str:
            return "—" if ok is None else ("ok" if ok else "**missed**")

        def failed(*names: str) -> str | None:
            for name in names:
                if name in f:
                    return f"failed: {f[name][:120]}"
            return None

        def connect_fmt(s):
            return (f"median {s['median']:.0f} (min {s['min']:.0f}, p90 {s['p90']:.0f};"
                    f" n={s['n']})")

        def connect_row(title, key, floor_key, floor_name, target, phases):
            value, floor = r.get(key), r.get(floor_key)
            if value and floor:
                ratio = value["median"] / floor["median"]
                rows.append([title, connect_fmt(value), f"{floor_name}: {connect_fmt(floor)}",
                             f"{ratio:.2f}x", f"≤ {target}x", verdict(ratio <= target)])
            else:
                rows.append([title, connect_fmt(value) if value else (failed(*phases) or "n/a"),
                             connect_fmt(floor) if floor else (failed(*phases) or "n/a"),
                             "—", f"≤ {target}x", "—"])

        connect_row("connect → usable shell, warm (pool 2), ms", "warm", "floor_exec",
                    "plain exec", TARGET_WARM,
                    ("connect, warm", "capsule (warm)"))
        connect_row("connect → usable shell, cold (pool 0), ms", "cold", "floor_cold",
                    "create+start+exec", TARGET_COLD,
                    ("connect, cold", "capsule (cold)"))

        floor_echo = r.get("floor_echo")
        for name in ("binary", "json"):
            value = r.get(f"echo_{name}")
            title = f"keystroke echo, {name.upper() if name == 'json' else name} protocol, ms"
            floor_text = (f"raw exec: p50 {floor_echo['p50']:.2f} / p99 {floor_echo['p99']:.2f}"
                          if floor_echo else (failed("echo", "capsule (warm)") or "n/a"))
            if value:
                ratio = (f"{value['p50'] / floor_echo['p50']:.1f}x / "
                         f"{value['p99'] / floor_echo['p99']:.1f}x" if floor_echo else "—")
                ok = value["p50"] <= TARGET_ECHO_P50_MS and value["p99"] <= TARGET_ECHO_P99_MS
                rows.append([title, f"p50 {value['p50']:.2f} / p99 {value['p99']:.2f}"
                             f" (max {value['max']:.1f}; n={value['n']})", floor_text, ratio,
                             f"p50 ≤ {TARGET_ECHO_P50_MS:g}, p99 ≤ {TARGET_ECHO_P99_MS:g} ms",
                             verdict(ok)])
            else:
                rows.append([title, failed("echo", "capsule (warm)") or "n/a",
                             floor_text, "—", "p50 ≤ 1, p99 ≤ 2 ms", "—"])

        def tp_fmt(value):
            return (f"median {value['median']:.1f}, best {value['best']:.1f}"
                    f" (n={len(value['all'])}, {value['bytes'] / 1e6:.0f} MB each)")

        floor_tp = r.get("floor_throughput")
        floor_tp_text = (f"raw exec stream: {tp_fmt(floor_tp)}"
                         if floor_tp else (failed("throughput", "capsule (warm)") or "n/a"))
        for name, target in (("binary", TARGET_BINARY), ("json", TARGET_JSON)):
            value = r.get(f"throughput_{name}")
            title = f"output throughput, {name.upper() if name == 'json' else name} protocol, MB/s"
            if value:
                ratio = value["median"] / floor_tp["median"] if floor_tp else None
                ratio_text = (f"{ratio:.0%} (best/best {value['best'] / floor_tp['best']:.0%})"
                              if floor_tp else "—")
                rows.append([title, tp_fmt(value), floor_tp_text, ratio_text,
                             f"≥ {target:.0%}",
                             verdict(None if ratio is None else ratio >= target)])
            else:
                rows.append([title, failed("throughput", "capsule (warm)")
                             or "n/a", floor_tp_text, "—", f"≥ {target:.0%}", "—"])

        c = r.get("concurrent")
        n = self.p["concurrent"]
        if c:
            times = c["times"]
            extra = (f"; per session median {times['median'] / 1000:.2f} s, max"
                     f" {times['max'] / 1000:.2f} s" if times else "")
            fc = r.get("floor_concurrent")
            if fc:
                floor_text = (f"{n} create+start+exec at once ({FLOOR_THREADS} threads):"
                              f" {fc['all_usable_s']:.2f}")
                ratio = f"{c['all_usable_s'] / fc['all_usable_s']:.2f}x"
            else:
                floor_text = failed("concurrent floor") or "n/a"
                ratio = "—"
            rows.append([f"{n} concurrent sessions (pool 2): all usable after, s",
                         f"{c['all_usable_s']:.2f} ({c['ok']}/{c['n']} ok{extra})",
                         floor_text, ratio, "—", verdict(None if not c["failed"] else False)])
            rows.append([f"capsule RSS with {n} sessions, MB",
                         f"before {c['before']:.1f}, during {c['during']:.1f}, after"
                         f" {c['after']:.1f} (peak {c['peak']:.1f})", "—",
                         f"{c['per_session']:.2f} MB/session",
                         f"≤ {TARGET_RSS_PER_SESSION_MB:g} MB/session",
                         verdict(c["per_session"] <= TARGET_RSS_PER_SESSION_MB)])
        else:
            text = failed("concurrent sessions", "capsule (warm)") or "n/a"
            rows.append([f"{n} concurrent sessions (pool 2): all usable after, s", text,
                         "—", "—", "—", "—"])
            rows.append([f"capsule RSS with {n} sessions, MB", text, "—", "—",
                         f"≤ {TARGET_RSS_PER_SESSION_MB:g} MB/session", "—"])

        seconds = self.p["flood_seconds"]
        for name in ("binary", "json"):
            value = r.get(f"flood_{name}")
            how = "slow acks" if name == "binary" else "TCP backpressure only"
            label = name.upper() if name == "json" else name
            if value:
                rows.append([f"flood to a slow reader ({label}, {how}, {seconds:g} s): RSS, MB",
                             f"idle {value['idle']:.1f}, peak {value['peak']:.1f}, after"
                             f" {value['after']:.1f} (client read {value['client_mb']:.1f} MB)",
                             "—", f"+{value['delta']:.1f} MB", f"≤ +{TARGET_FLOOD_MB:g} MB",
                             verdict(value["delta"] <= TARGET_FLOOD_MB)])
                rows.append([f"flood ({label}): client dropped → capsule logs it left, ms",
                             f"{ms(value['left_s']):.0f}", "—", "—", "promptly",
                             verdict(value["left_s"] <= 1.0)])
                after_grace = value["gone_s"] - value["grace"]
                rows.append([f"flood ({label}): client dropped → container gone, s"
                             f" (grace {value['grace']:g} s, sweep 0.2 s)",
                             f"{value['gone_s']:.2f} ({after_grace:.2f} after grace)", "—", "—",
                             f"≤ {TARGET_GONE_AFTER_GRACE_S:g} s after grace",
                             verdict(after_grace <= TARGET_GONE_AFTER_GRACE_S)])
            else:
                text = failed(f"flood ({name})", "capsule (flood)") or "n/a"
                rows.append([f"flood to a slow reader ({label}, {how}, {seconds:g} s)", text,
                             "—", "—", f"≤ +{TARGET_FLOOD_MB:g} MB", "—"])

        header = ["measure", "capsule", "floor", "ratio", "target", "verdict"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |"
                  for row in rows]
        return "\n".join(lines)

    def report(self) -> str:
        r = self.results
        notes = [
            f"Machine: {os.cpu_count()} CPU(s), loopback only; Docker engine"
            f" {self.engine_version}; image {self.image}; containers {MEMORY},"
            f" {CPUS:g} CPUs, {PIDS} pids. {'Quick' if self.args.quick else 'Full'} run"
            f" (instance {self.instance}).",
            "The bench client (Twisted + Autobahn, one process) shares the CPUs with capsule,"
            " dockerd and the container: its CPU time below is taken from the same cores.",
            "Floors use docker-py for create/start/exec_create and capsule's own exec-start"
            " upgrade (ExecStreamProtocol on the reactor) for the stream. Each capsule figure is"
            " measured in turn with its floor; throughput compares the medians of"
            f" {self.p['repeats']} interleaved runs (the PTY's rate varies from run to run).",
        ]
        if "generator" in r:
            notes.append(f"`head -c N /dev/zero | base64` alone, to /dev/null in the container:"
                         f" {r['generator']:.0f} MB/s of output, so generation is not the"
                         " bottleneck.")
        for name in ("floor_throughput", "throughput_binary", "throughput_json"):
            value = r.get(name)
            if value:
                runs = ", ".join(f"{mbps:.1f}" for mbps in value["all"])
                text = (f"{name.replace('_', ' ')}: runs {runs} MB/s; in the median run,"
                        f" {value['chunk'] / 1024:.0f} KiB per read or frame, bench client CPU"
                        f" {value['client_cpu']:.2f} s over {value['seconds']:.2f} s")
                if value.get("server_cpu") is not None:
                    text += (f", capsule CPU {value['server_cpu']:.2f} s"
                             f" ({value['server_cpu'] / value['seconds']:.0%} of one core)")
                if value.get("cpu"):
                    text += "; " + describe_cpu(value["cpu"], value["bytes"] / 1e6)
                notes.append(text + ".")
        twisted = [(name, r.get(key)) for name, key in (
            ("raw exec", "floor_echo_twisted"), ("capsule binary", "echo_binary_twisted"),
            ("capsule JSON", "echo_json_twisted"))]
        if all(value for _, value in twisted):
            notes.append("Echo as the table measures it (a blocking socket per client: the"
                         " exec-start upgrade for the floor, websocket-client for capsule),"
                         " and through the bench's Twisted clients (Autobahn for capsule),"
                         " whose own event-loop work adds to each round trip: "
                         + ", ".join(f"{name} p50 {value['p50']:.2f} / p99 {value['p99']:.2f} ms"
                                     for name, value in twisted) + ".")
        b2b, floor_b2b = r.get("echo_b2b"), r.get("floor_echo_b2b")
        if b2b and floor_b2b:
            notes.append(f"Echo with keys {KEY_GAP * 1000:g} ms apart vs. back to back"
                         f" (next key as soon as the echo came; 100 keys, binary, Twisted"
                         f" clients): capsule p50"
                         f" {b2b['p50']:.2f} / p99 {b2b['p99']:.2f} ms, raw exec p50"
                         f" {floor_b2b['p50']:.2f} / p99 {floor_b2b['p99']:.2f} ms.")
        if self.load_before:
            after = (f", after {self.load_after[0]:.1f}" if self.load_after else "")
            notes.append(f"Load average (1 min) before the run {self.load_before[0]:.1f}{after}"
                         f" on {os.cpu_count()} CPUs.")
        if self.other_containers:
            notes.append(f"{self.other_containers} other container(s) were running on the"
                         " engine when the bench started; they compete for the same CPUs.")
        notes += self.notes
        return self.table() + "\n\n" + "\n".join(f"- {n}" for n in notes)


# -- entry point ---------------------------------------------------------------------


def cleanup(bench: Bench) -> None:
    """
    Synchronous, after the reactor stopped (also on Ctrl-C or failure):
    stop every capsule started, remove every container of this run.
    """
    for process in bench.processes:
        if process.poll() is None:
            say(f"stopping capsule (pid {process.pid})")
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    removed = 0
    for label in (f"{LABEL_INSTANCE}={bench.instance}", f"{LABEL_BENCH_RUN}={bench.run_id}"):
        try:
            found = bench.api.containers(all=True, filters={"label": label})
        except Exception as e:
            say(f"could not list containers with {label}: {e}")
            continue
        for c in found:
            try:
                bench._thd_remove(c["Id"])
                removed += 1
            except Exception as e:
                say(f"could not remove container {c['Id'][:12]}: {e}")
    if bench.finished and not bench.failures:
        shutil.rmtree(bench.tmp, ignore_errors=True)
        say(f"cleanup: removed {removed} leftover container(s)")
    else:
        say(f"cleanup: removed {removed} leftover container(s); capsule logs kept in {bench.tmp}")


async def amain(reactor, bench: Bench):
    global _reactor
    _reactor = reactor
    try:
        bench.engine_version = (await deferToThread(bench.api.version)).get("Version", "?")
        await deferToThread(bench.api.inspect_image, bench.image)
    except Exception as e:
        say(f"no Docker engine answers at {bench.host}, or the image {bench.image} is"
            f" missing (make image): {e}")
        bench.finished = True
        raise SystemExit(2)
    started = time.monotonic()
    try:
        await bench.run()
    except Exception as e:
        bench.failures["bench"] = str(e) or type(e).__name__
        say(f"the bench failed: {bench.failures['bench']}")
    say(f"done in {time.monotonic() - started:.0f} s")
    print(bench.report(), flush=True)
    bench.finished = True
    if bench.failures:
        say(f"{len(bench.failures)} measurement(s) failed: {', '.join(bench.failures)}")
        raise SystemExit(1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Benchmark capsule against the physical floor (docker-py + Twisted)"
                    " and print one Markdown table.")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run for smoke-testing (fewer sessions, 20 MB, 10"
                             " concurrent sessions, 5 s floods)")
    parser.add_argument("--image", default=os.environ.get("CAPSULE_IMAGE", "capsule-runtime:latest"),
                        help="session image [default: %(default)s]")
    parser.add_argument("--capsule-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for every capsule started (repeatable),"
                             " e.g. --capsule-arg=--coalesce-ms=0")
    parser.add_argument("--sessions", type=int, help="connects measured per kind (≥1)")
    parser.add_argument("--keystrokes", type=int, help="keystrokes per echo test")
    parser.add_argument("--throughput-bytes", type=int, help="bytes fed to base64")
    parser.add_argument("--repeats", type=int, help="interleaved throughput runs (medians compared)")
    parser.add_argument("--concurrent", type=int, help="concurrent sessions")
    parser.add_argument("--flood-seconds", type=float, help="seconds of flood")
    parser.add_argument("--only", action="append", choices=ONLY, metavar="PHASE",
                        help="run only this kind of measurement (repeatable): "
                             + ", ".join(ONLY))
    args = parser.parse_args(argv)
    for name in ("sessions", "keystrokes", "throughput_bytes", "repeats", "concurrent"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.flood_seconds is not None and not 0 < args.flood_seconds <= 600:
        parser.error("--flood-seconds must be in (0, 600]")

    try:
        bench = Bench(args)
    except docker.errors.DockerException as e:
        say(f"no Docker engine answers: {e}")
        sys.exit(2)
    try:
        task.react(amain, (bench,))
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup(bench)
        if not bench.finished:
            say("interrupted")
            sys.exit(130)


if __name__ == "__main__":
    main()
