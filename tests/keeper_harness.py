"""
capsule-keeper (docker/keeper/capsule-keeper.c) built for this machine and
driven through pipes, without Docker: a relay is run with the command line
capsule gives it (L{capsule.core.keeper.keeper_argv}) and its frames are read from
its stdout, as capsule reads them from an exec.

Two builds: a plain one, and one with AddressSanitizer and
UndefinedBehaviorSanitizer where the compiler has them.  The sanitized
keepers stop at their first report (C{halt_on_error}) and write it to a log
of the test's own (the keeper server's stderr is /dev/null); a test after
which any report is there fails.

The test modules take the fixtures with C{from tests.keeper_harness import
keeper, relay}.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import select
import shutil
import signal
import socket as _socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from capsule.core.keeper import FrameReader, encode_input, keeper_argv, parse_ports

SOURCE = Path(__file__).resolve().parents[1] / "docker" / "keeper" / "capsule-keeper.c"
CC = shutil.which("cc") or shutil.which("gcc")

# An ended session's keeper lingers 200 ms instead of 10 minutes.
CFLAGS = ["-Wall", "-Wextra", "-Werror", "-DLINGER_MS=200"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer", "-g", "-O1"]
# GCC's shared UBSan runtime writes to stderr whatever log_path says (the
# keeper server's stderr is /dev/null); its static one does not.  Tried in
# this order, the first whose reports reach the log is used.
RUNTIMES = [["-static-libasan", "-static-libubsan"], []]

PREAMBLE = re.compile(rb"\x1b_capsule-keeper;offset=(\d+);dropped=(\d+)\x1b\\")


# Does what it is told: nothing wrong, a signed overflow, a use after free.
_PROBE = """
#include <limits.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv)
{
    int big = INT_MAX - (argc > 2);  /* not known when compiled */
    char *p = calloc(1, 4);
    if (argc > 1 && !strcmp(argv[1], "ub")) big += atoi("1");
    free(p);
    if (argc > 1 && !strcmp(argv[1], "asan")) big += p[atoi("0")];
    return big == 0;
}
"""
REPORTS = {"ub": "runtime error: signed integer overflow", "asan": "heap-use-after-free"}


@functools.cache
def _build_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="capsule-keeper-build-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def sanitizer_env(logs: Path) -> dict[str, str]:
    """
    Sanitizer settings for a sanitized build: stop at the first report,
    written to C{logs}.
    """
    return {"ASAN_OPTIONS": f"halt_on_error=1:detect_leaks=1:log_path={logs}/asan",
            "UBSAN_OPTIONS": f"halt_on_error=1:print_stacktrace=1:log_path={logs}/ubsan"}


@functools.cache
def sanitizer_flags() -> tuple[list[str] | None, str]:
    """
    The compiler flags of the sanitized build, or C{None} and why there is
    none here: a tiny program is built with them and must run cleanly, and
    report a signed overflow and a use after free into the log.
    """
    if CC is None:
        return None, "no C compiler"
    probe = _build_dir() / "probe.c"
    probe.write_text(_PROBE)
    whys = []
    for i, runtime in enumerate(RUNTIMES):
        flags = SANITIZE + runtime
        binary = _build_dir() / f"probe{i}"
        built = subprocess.run([CC, *flags, "-o", str(binary), str(probe)],
                               capture_output=True, text=True)
        if built.returncode != 0:
            whys.append(f"{CC} {' '.join(flags)} fails: {built.stderr.strip()[-300:]}")
            continue
        for what in ("", "ub", "asan"):
            logs = Path(tempfile.mkdtemp(dir=_build_dir()))
            ran = subprocess.run([str(binary), *([what] if what else [])], capture_output=True,
                                 text=True, env={**os.environ, **sanitizer_env(logs)})
            logged = "".join(path.read_text(errors="replace") for path in logs.iterdir())
            if what == "" and (ran.returncode != 0 or logged):
                whys.append(f"a program built with {' '.join(flags)} does not run cleanly"
                            f" here: {(ran.stderr + logged).strip()[-300:]}")
                break
            if what and (ran.returncode == 0 or REPORTS[what] not in logged):
                whys.append(f"with {' '.join(flags)}, a {what} error is not reported into"
                            f" log_path (status {ran.returncode},"
                            f" stderr {ran.stderr.strip()[:200]!r})")
                break
        else:
            return flags, ""
    return None, "; ".join(whys)


@functools.cache
def build(sanitized: bool) -> Path:
    binary = _build_dir() / ("capsule-keeper-sanitized" if sanitized else "capsule-keeper")
    flags = [*CFLAGS, *(sanitizer_flags()[0] if sanitized else ["-O2"])]
    subprocess.run([CC, *flags, "-o", str(binary), str(SOURCE)], check=True)
    return binary


_TRACER_LOST = re.compile(r"==\d+==Unable to get registers from thread \d+\.")


@dataclass
class Keeper:
    """
    One build of capsule-keeper, and where its sanitizer reports go.
    """

    binary: Path
    sanitized: bool
    logs: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.sanitized:
            env.update(sanitizer_env(self.logs))
        return env

    def run(self, *args: str, timeout: float = 10) -> subprocess.CompletedProcess:
        """
        Run capsule-keeper with C{args} to its end.
        """
        return subprocess.run([str(self.binary), *args], env=self.env(), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)

    def reports(self) -> list[str]:
        """
        The sanitizer's findings.  A report that only says LeakSanitizer
        could not stop a thread is left out: it is what LeakSanitizer
        prints when the process it checks at exit is killed under it (a
        test's SIGKILL racing the leak check), not a finding about the
        keeper.
        """
        found = []
        for path in sorted(self.logs.iterdir()):
            text = path.read_text(errors="replace")
            lines = [line for line in text.splitlines() if line.strip()]
            if lines and all(_TRACER_LOST.fullmatch(line) for line in lines):
                continue
            found.append(f"{path.name}:\n{text}")
        return found


@pytest.fixture(params=[False, True], ids=["plain", "sanitized"])
def keeper(request, tmp_path):
    if CC is None:
        pytest.skip("no C compiler to build capsule-keeper")
    if request.param and sanitizer_flags()[0] is None:
        pytest.skip(f"no sanitized build: {sanitizer_flags()[1]}")
    logs = tmp_path / "sanitizer-logs"
    logs.mkdir()
    k = Keeper(build(request.param), request.param, logs)
    yield k
    reports = k.reports()
    if reports:
        pytest.fail("sanitizer reports:\n" + "\n".join(reports), pytrace=False)


def kill_keepers(socket: str) -> None:
    """
    Kill every keeper of C{socket}.  A keeper server is a daemon of its
    own: it is found by the socket path only it and its relays have in
    their command lines.
    """
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if socket.encode() in f.read().split(b"\0"):
                        os.kill(int(entry), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def socket_path() -> tuple[str, str]:
    """
    A new directory (short: a socket's path has a small limit) and the path
    of a keeper socket in it.
    """
    directory = tempfile.mkdtemp(prefix="ck-", dir="/tmp")
    return directory, os.path.join(directory, "s")


class Relay:
    """
    C{capsule-keeper -r} with its frames read from its stdout.

    @ivar output: the payloads of its C{o} frames, preamble included.
    @ivar frames: C{(type, payload length)} of each frame, in order.
    @ivar ports: what each C{P} frame said (L{capsule.core.keeper.parse_ports}).
    """

    def __init__(self, keeper: Keeper, command: list[str], socket: str | None = None,
                 offset: int = 0, buffer: int = 1024 * 1024,
                 options: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        """
        Run the relay as capsule does (L{keeper_argv}), or with C{options}
        in place of the options capsule gives.
        """
        self.dir = None
        if socket is None:
            self.dir, socket = socket_path()
        self.socket = socket
        argv = keeper_argv(tuple(command), offset, buffer, socket, program=str(keeper.binary))
        if options is not None:
            argv = [str(keeper.binary), *options, socket, "--", *command]
        self.process = subprocess.Popen(argv, env={**keeper.env(), **(env or {})},
                                        stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.reader = FrameReader()
        self.output = bytearray()
        self.frames: list[tuple[bytes, int]] = []
        self.ports: list = []
        self.status: int | None = None
        self.ended = False

    def send(self, data: bytes) -> None:
        self.send_raw(encode_input(data))

    def send_raw(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def _read(self, left: float) -> None:
        fd = self.process.stdout.fileno()
        if select.select([fd], [], [], max(left, 0))[0]:
            data = os.read(fd, 1 << 20)
            if not data:
                self.ended = True
                return
            for kind, payload in self.reader.feed(data):
                self.frames.append((kind, len(payload)))
                if kind == b"o":
                    self.output += payload
                elif kind == b"x":
                    self.status = struct.unpack(">I", payload)[0]
                elif kind == b"P":
                    self.ports.append(parse_ports(payload))

    def until(self, marker: bytes, since: int = 0, timeout: float = 10) -> int:
        """
        Read frames until C{marker} is in the output after C{since}; return
        where it ends.
        """
        deadline = time.monotonic() + timeout
        while True:
            at = self.output.find(marker, since)
            if at >= 0:
                return at + len(marker)
            left = deadline - time.monotonic()
            if left <= 0 or self.status is not None or self.ended:
                raise AssertionError(f"no {marker!r} within {timeout} s (status {self.status},"
                                     f" ended {self.ended}); output ends"
                                     f" {bytes(self.output[-200:])!r}")
            self._read(left)

    def until_ports(self, check, timeout: float = 10):
        """
        Read frames until a C{P} frame's L{ListeningPorts} passes C{check};
        return it.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for found, problem in self.ports[seen:]:
                assert problem is None, problem
                if check(found):
                    return found
            seen = len(self.ports)
            left = deadline - time.monotonic()
            if left <= 0 or self.ended:
                raise AssertionError(f"no such ports within {timeout} s: {self.ports[-3:]}")
            self._read(left)

    def preamble(self, timeout: float = 10) -> tuple[int, int, int]:
        """
        Read until the preamble is whole: its offset, its dropped count and
        where the output after it begins.
        """
        end = self.until(b"\x1b\\", timeout=timeout)
        found = PREAMBLE.fullmatch(bytes(self.output[:end]))
        assert found, f"no preamble at the start of {bytes(self.output[:200])!r}"
        return int(found.group(1)), int(found.group(2)), end

    def wait(self, timeout: float = 10) -> tuple[int, str]:
        """
        Read frames until the relay has exited; its exit status and stderr.
        """
        deadline = time.monotonic() + timeout
        while not self.ended:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the relay did not end within {timeout} s")
            self._read(left)
        code = self.process.wait(max(deadline - time.monotonic(), 0.1))
        return code, self.process.stderr.read().decode("utf-8", "replace")

    def stop(self) -> None:
        """
        End the relay as capsule does, by closing its stdin (it may be
        ended already); kill it only if it does not end.
        """
        try:
            self.process.stdin.close()
        except BrokenPipeError:  # input it never read
            pass
        try:
            self.wait()
        except Exception:  # it did not end, or sent what is not a frame
            self.process.kill()
            self.process.wait(10)
        self.process.stdout.close()
        self.process.stderr.close()

    def kill_server(self) -> None:
        kill_keepers(self.socket)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def relay(keeper):
    """
    C{relay(command, socket=None, offset=0, buffer=...)} starts a relay; every
    one, and the keeper servers they started, are stopped after the test.
    """
    made = []

    def make(command, **kwargs):
        made.append(Relay(keeper, command, **kwargs))
        return made[-1]

    yield make
    # The relays first, each to its own end (a sanitized one checks for
    # leaks as it exits), then the servers.
    try:
        for r in made:
            r.stop()
    finally:
        for r in made:
            r.kill_server()


def connect(path: str, timeout: float = 10) -> _socket.socket:
    """
    A client of its own on a keeper's socket, speaking the framing directly.
    """
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def hello(offset: int = 0, cols: int = 0, rows: int = 0) -> bytes:
    return b"a" + struct.pack(">IQHH", 12, offset, cols, rows)
