"""
Hostile HTTP against a real twistd (issue 9): request bodies larger than
their path accepts are refused with 413 before they are read, and nothing
of them reaches the host's disk.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    """
    What the server sends until it has sent a whole response (headers and
    the body its Content-Length names), or the deadline.
    """
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = [int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                return data
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"no complete response within {timeout:g} s; got {data!r}")


def _files_under(pid: int, directory: str) -> list[str]:
    """
    The files the process has open under C{directory} (a temporary file is
    unlinked at once, so listing the directory would not show it).
    """
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(directory + "/"):
            found.append(target)
    return found


@pytest.fixture
def http_server(make_server, tmp_path):
    spool = tmp_path / "server-tmp"
    spool.mkdir()
    server = make_server("--pool-size", "0", env={"TMPDIR": str(spool)})
    server.spool = str(spool)
    return server


def _expect_413(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 413 Content Too Large"
    assert b"Connection: close" in lines
    return json.loads(body)


def test_a_huge_declared_body_is_refused_before_it_is_read(http_server):
    with socket.create_connection(("127.0.0.1", http_server.port), timeout=5) as sock:
        sock.sendall(b"POST /health HTTP/1.1\r\nHost: capsule\r\n"
                     b"Content-Length: 10000000000\r\n\r\n" + b"x" * 300_000)
        response = _read_response(sock, 10)
        assert _expect_413(response) == {
            "error": "this request may have a body of at most 0 bytes",
            "code": "body_too_large", "limit": 0}
        # While the connection is still open: nothing spooled to disk.
        assert _files_under(http_server.pid, http_server.spool) == []
        assert os.listdir(http_server.spool) == []
    assert "refused a body of 10000000000 bytes for /health (limit 0 bytes)" in http_server.log()
    assert http_server.unhandled_errors() == []
    assert http_server.health()[0] == 200


def test_a_chunked_body_is_cut_off(http_server):
    with socket.create_connection(("127.0.0.1", http_server.port), timeout=5) as sock:
        sock.sendall(b"POST /health HTTP/1.1\r\nHost: capsule\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     + b"10000\r\n" + b"y" * 0x10000 + b"\r\n")
        response = _read_response(sock, 10)
        assert _expect_413(response)["code"] == "body_too_large"
        assert _files_under(http_server.pid, http_server.spool) == []
    assert "refused a body for /health (limit 0 bytes)" in http_server.log()
    assert http_server.unhandled_errors() == []
