"""
The exec door's attack, for the tests and the bench: execs whose output
is as costly to answer as bytes can be (16 MiB of C{0xff}, not UTF-8, and
16 MiB of C{0x01}, which JSON escapes sixfold), asked on sockets that then
read nothing; and capsule's memory sampled meanwhile.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.parse

MIB = 1024 * 1024
# 16 MiB of 0xff on stdout, 16 MiB of 0x01 on stderr.
BINARY_FLOOD = ("head -c 16777216 /dev/zero | tr '\\0' '\\377';"
                " head -c 16777216 /dev/zero | tr '\\0' '\\001' >&2")


def flood_request(script: str = BINARY_FLOOD, max_output: int = 16 * MIB, **extra) -> dict:
    return {"argv": ["sh", "-c", script], "max_output": max_output, **extra}


def stalled_exec(url: str, session_id: str, body: dict, headers: dict | None = None
                 ) -> socket.socket:
    """
    Send an exec request to the capsule at C{url} on a socket of a small
    receive buffer, and return the socket, whose caller then reads nothing
    (or only what it chooses).
    """
    parts = urllib.parse.urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    data = json.dumps(body).encode()
    lines = [f"POST /api/sessions/{session_id}/exec HTTP/1.1", f"Host: {parts.netloc}",
             "Content-Type: application/json", f"Content-Length: {len(data)}",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
    return sock


def read_status(sock: socket.socket, timeout: float = 120) -> tuple[int, dict | None]:
    """
    The status of the answer C{sock} gets, reading only its head; and, for
    an answer other than 200 (a small error), its JSON body.
    """
    sock.settimeout(timeout)
    head = bytearray()
    while b"\r\n\r\n" not in head:
        data = sock.recv(1)
        if not data:
            raise ConnectionError(f"closed before its answer's head: {bytes(head)!r}")
        head += data
    status = int(head.split(b" ", 2)[1])
    if status == 200:
        return status, None
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    body = bytearray()
    while len(body) < length:
        data = sock.recv(length - len(body))
        if not data:
            break
        body += data
    return status, json.loads(body)


def read_all(sock: socket.socket, timeout: float = 120) -> tuple[bytes, str]:
    """
    Read C{sock} to its end: what came, and how it ended (C{"closed"},
    C{"reset"} or C{"timeout"}).
    """
    sock.settimeout(timeout)
    got = bytearray()
    try:
        while True:
            data = sock.recv(1024 * 1024)
            if not data:
                return bytes(got), "closed"
            got += data
    except ConnectionResetError:
        return bytes(got), "reset"
    except socket.timeout:
        return bytes(got), "timeout"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def peak_rss_kib(pid: int, done, timeout: float, after: float = 3.0,
                 interval: float = 0.1) -> int:
    """
    The highest RSS of C{pid} seen until C{after} seconds past the moment
    C{done()} is true (or C{timeout}).
    """
    peak, deadline = rss_kib(pid), time.monotonic() + timeout
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(pid))
        if done():
            deadline = min(deadline, time.monotonic() + after)
            done = lambda: False  # noqa: E731
        time.sleep(interval)
    return max(peak, rss_kib(pid))
