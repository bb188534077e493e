"""
Hostile HTTP against a real twistd (issue 9): request bodies larger than
their path accepts are refused with 413 before they are read, and nothing
of them reaches the host's disk.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import tarfile
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
        sock.sendall(b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
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
        sock.sendall(b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     + b"10000\r\n" + b"y" * 0x10000 + b"\r\n")
        response = _read_response(sock, 10)
        assert _expect_413(response)["code"] == "body_too_large"
        assert _files_under(http_server.pid, http_server.spool) == []
    assert "refused a body for /health (limit 0 bytes)" in http_server.log()
    assert http_server.unhandled_errors() == []


# -- exports (issue 9, item 5) -----------------------------------------------------


def _session_with(server, command: str):
    """
    A new session (its terminal kept open) in which C{command} has run.
    """
    from tests.support.clients import BlockingTerminal
    terminal = BlockingTerminal(server.ws_url, binary=True)
    session_id = terminal.start()
    terminal.run(command + " && echo MA''DE", "MADE", timeout=60)
    return terminal, session_id


def _export(server, session_id: str, source: str) -> socket.socket:
    """
    Ask for an export from C{source} (a loopback address); read nothing yet.
    """
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30,
                                    source_address=(source, 0))
    sock.sendall(f"GET /api/export/{session_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Connection: close\r\n\r\n".encode())
    return sock


def _read_all(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """
    Everything until the server closes, and how it closed ("eof" or "reset").
    """
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    return data, "eof"


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        size = int(size, 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2:]


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def _first_bytes(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    return sock.recv(200)


@pytest.fixture
def big_workspace(make_server):
    """
    A server with one worker for exports, and a session whose workspace
    (16 MiB of random bytes) does not fit in the sockets' buffers.
    """
    server = make_server("--pool-size", "0", tuning={"export-threads": 1})
    terminal, session_id = _session_with(
        server, "head -c 16M /dev/urandom > /workspace/big")
    yield server, session_id
    terminal.ws.close()


def test_a_client_over_its_export_limit_gets_429(big_workspace):
    server, session_id = big_workspace
    held = [_export(server, session_id, "127.0.0.2") for _ in range(2)]
    # The first runs (its answer starts), the second waits for the worker.
    assert _first_bytes(held[0], 30).startswith(b"HTTP/1.1 200 OK\r\n")
    response, how = _read_all(_export(server, session_id, "127.0.0.2"), 30)
    head, _, body = response.partition(b"\r\n\r\n")
    assert (_status(response), how) == (429, "eof")
    assert b"Retry-After: 10" in head.split(b"\r\n")
    assert json.loads(body) == {"error": "too many exports at once from 127.0.0.2 (at most 2)",
                                "code": "too_many_exports"}
    # Another client is not refused: it waits for the worker.
    other = _export(server, session_id, "127.0.0.3")
    for sock in held + [other]:
        sock.close()
    assert server.unhandled_errors() == []


def test_a_freed_worker_goes_to_another_client_first(make_server):
    server = make_server("--pool-size", "0", tuning={"export-threads": 1})
    terminal, big = _session_with(server, "head -c 16M /dev/urandom > /workspace/big")
    small_terminal, small = _session_with(server, "printf %156s x > /workspace/small")
    first = _export(server, big, "127.0.0.2")
    assert _first_bytes(first, 30).startswith(b"HTTP/1.1 200 OK\r\n")
    second = _export(server, big, "127.0.0.2")
    # The second is queued before the other client's.
    other = _export(server, small, "127.0.0.3")
    first.close()
    # The worker goes to 127.0.0.3 (no export running), not to the
    # export that asked first, whose client is not reading.
    response, how = _read_all(other, 30)
    assert (_status(response), how) == (200, "eof")
    body = _dechunk(response.partition(b"\r\n\r\n")[2])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(body))) as tar:
        assert tar.extractfile("workspace/small").read() == b" " * 155 + b"x"
    assert f"exported the workspace of session {small[:8]}" in server.log()
    second.close()
    terminal.ws.close()
    small_terminal.ws.close()
    assert server.unhandled_errors() == []


def test_an_export_over_its_size_cap_is_cut_off(make_server):
    server = make_server("--pool-size", "0", "--export-max-bytes", "1m")
    terminal, session_id = _session_with(server, "head -c 4M /dev/urandom > /workspace/big")
    response, how = _read_all(_export(server, session_id, "127.0.0.2"), 30)
    assert _status(response) == 200
    # The download fails: cut off before its end, never a complete archive.
    body = response.partition(b"\r\n\r\n")[2]
    assert len(body) <= 1024 * 1024
    assert b"Transfer-Encoding: chunked" in response.partition(b"\r\n\r\n")[0]
    assert not response.endswith(b"0\r\n\r\n")
    assert (f"export of session {session_id[:8]} cut off after" in server.log()
            and "the archive passed 1048576 bytes" in server.log())
    terminal.ws.close()
    assert server.unhandled_errors() == []


def test_an_export_over_its_time_cap_is_cut_off(make_server):
    server = make_server("--pool-size", "0", "--export-timeout", "2")
    terminal, session_id = _session_with(server, "head -c 16M /dev/urandom > /workspace/big")
    sock = _export(server, session_id, "127.0.0.2")
    assert _first_bytes(sock, 30).startswith(b"HTTP/1.1 200 OK\r\n")
    # The client reads nothing more: the export waits on it until cut off.
    deadline = time.monotonic() + 30
    while "took longer than 2 s" not in server.log():
        assert time.monotonic() < deadline, "the export was not cut off"
        time.sleep(0.1)
    rest, how = _read_all(sock, 30)
    assert not rest.endswith(b"0\r\n\r\n")
    assert f"export of session {session_id[:8]} cut off after" in server.log()
    terminal.ws.close()
    assert server.unhandled_errors() == []
