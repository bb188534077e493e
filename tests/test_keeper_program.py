"""
capsule-keeper itself (docker/keeper/capsule-keeper.c), compiled for this
machine and run without Docker: the relay's frames on a pipe, as capsule
reads them from an exec.
"""

import os
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from capsule.keeper import FrameReader, encode_input

SOURCE = Path(__file__).resolve().parents[1] / "docker" / "keeper" / "capsule-keeper.c"
CC = shutil.which("cc") or shutil.which("gcc")

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler to build capsule-keeper")


@pytest.fixture(scope="module")
def keeper(tmp_path_factory):
    binary = tmp_path_factory.mktemp("keeper") / "capsule-keeper"
    # An ended session's keeper lingers 200 ms instead of 10 minutes.
    subprocess.run([CC, "-O2", "-Wall", "-Werror", "-DLINGER_MS=200", "-o", str(binary),
                    str(SOURCE)], check=True)
    return binary


class Relay:
    """
    C{capsule-keeper -r} with its frames read from its stdout.
    """

    def __init__(self, keeper: Path, command: list[str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="ck-", dir="/tmp")  # short: a socket path
        self.socket = os.path.join(self.dir, "s")
        self.process = subprocess.Popen(
            [str(keeper), "-r", "-o", "0", self.socket, "--", *command],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.reader = FrameReader()
        self.output = bytearray()
        self.frames: list[tuple[bytes, int]] = []
        self.status: int | None = None

    def send(self, data: bytes) -> None:
        self.process.stdin.write(encode_input(data))
        self.process.stdin.flush()

    def until(self, marker: bytes, since: int = 0, timeout: float = 10) -> int:
        """
        Read frames until C{marker} is in the output after C{since}; return
        where it ends.
        """
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while True:
            at = self.output.find(marker, since)
            if at >= 0:
                return at + len(marker)
            left = deadline - time.monotonic()
            if left <= 0 or self.status is not None:
                raise AssertionError(f"no {marker!r} within {timeout} s (status {self.status});"
                                     f" output ends {bytes(self.output[-200:])!r}")
            if select.select([fd], [], [], left)[0]:
                data = os.read(fd, 1 << 20)
                if not data:
                    raise AssertionError(f"the relay ended before {marker!r}")
                for kind, payload in self.reader.feed(data):
                    self.frames.append((kind, len(payload)))
                    if kind == b"o":
                        self.output += payload
                    elif kind == b"x":
                        self.status = struct.unpack(">I", payload)[0]

    def close(self) -> None:
        # The keeper server is a daemon of its own: stop it by the socket
        # path only it has in its command line.
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if self.socket.encode() in f.read().split(b"\0"):
                            os.kill(int(entry), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass
        self.process.kill()
        self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def relay(keeper):
    made = []

    def make(command):
        made.append(Relay(keeper, command))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_every_flood_is_delivered_whole_and_at_once(relay):
    """
    A flood is sent in held-back batches; what is held when the flood stops
    must still go out, without waiting for more output.  Each round waits
    for input that is sent only once the round's marker has arrived.
    """
    rounds = 200
    r = relay(["sh", "-c", f"stty -echo; i=0; while [ $i -lt {rounds} ]; do i=$((i+1));"
                           " head -c 60000 /dev/zero | base64; echo MARK$i.; read x; done;"
                           " echo ALLDONE"])
    since = 0
    for i in range(1, rounds + 1):
        since = r.until(f"MARK{i}.".encode(), since)
        r.send(b"go\n")
    r.until(b"ALLDONE", since)
    body = bytes(r.output).replace(b"\r\n", b"\n")
    assert body.count(b"A" * 76 + b"\n") == rounds * (60000 // 57)
    assert [kind for kind, _ in r.frames if kind != b"o"] in ([], [b"x"])


def test_a_flood_goes_out_in_large_frames(relay):
    r = relay(["sh", "-c", "stty -echo; head -c 5000000 /dev/zero | base64; echo END.; read x"])
    r.until(b"END.", timeout=30)
    sizes = [size for kind, size in r.frames if kind == b"o"]
    assert max(sizes) > 16 * 1024
    assert sum(sizes) / len(sizes) > 8 * 1024, f"{len(sizes)} frames"


def test_a_small_reply_is_not_held(relay):
    """
    Interactive output (an echo) goes out at once, also right after a flood:
    the reply comes with no more output after it to push it out.
    """
    r = relay(["sh", "-c", "head -c 1000000 /dev/zero | base64; echo END.;"
                           " while read line; do echo got:$line.; done"])
    since = r.until(b"END.", timeout=30)
    for i in range(20):
        r.send(f"k{i}\n".encode())
        since = r.until(f"got:k{i}.".encode(), since, timeout=5)
