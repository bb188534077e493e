"""
Exports under attack against a real capsule and engine (issue 19, item 4).

While Docker streams a container's archive it holds that container's lock:
a Docker call into it (an exec) waits until the stream ends.  An export
whose client reads nothing must not keep that stream open, hang the
session's execs, or, through them, hold every Docker thread so that
another client's new session waits.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import json
import re
import socket
import tarfile
import time

from tests.support.httpclient import request, request_bytes

from .harness import wait_for

# The workspace's size: more than the spool an export may fill, so that a
# client that reads nothing leaves Docker's stream with nowhere to go.
WORKSPACE_MIB = 200
SPOOL = 32 * 1024 * 1024
STALL = 5
# Generous: a new session normally opens in well under a second.
OPENS_WITHIN = 30.0


def _call(server, path: str, method: str = "GET", body=None, source: str = "127.0.0.1",
          timeout: float = 120) -> tuple[int, dict]:
    """
    (status, JSON) of one request to C{server} from C{source} (a loopback
    address).
    """
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    raw = request_bytes(method, path, headers, data, host="127.0.0.1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout,
                                  source_address=(source, 0)) as sock:
        sock.sendall(raw)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        payload = _dechunk(payload)
    return int(head.split(b" ", 2)[1]), json.loads(payload) if payload else {}


def _dechunk(body: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        at = end + 2 + size + 2


def _create(server, source: str = "127.0.0.1") -> str:
    status, body = _call(server, "/api/sessions", "POST", {}, source=source)
    assert status == 201, body
    return body["id"]


def _exec(server, session_id: str, script: str, timeout: float = 120) -> tuple[int, dict]:
    return _call(server, f"/api/sessions/{session_id}/exec", "POST",
                 {"argv": ["sh", "-c", script]}, timeout=timeout)


def _export(server, session_id: str, source: str = "127.0.0.2") -> socket.socket:
    """
    Ask for an export and read nothing: a socket whose receive buffer is
    kept small, so that it fills at once.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /api/export/{session_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Connection: close\r\n\r\n".encode())
    return sock


def _metric(server, name: str) -> float:
    _, _, body = request(server.url + "/metrics")
    found = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.M)
    return float(found.group(1)) if found else 0.0


def _workspace_server(make_server, *, spool: int = SPOOL):
    """
    A server with few Docker threads (so that the execs one session may run
    at once could hold them all), and a session with C{WORKSPACE_MIB} MiB of
    random bytes in its workspace.
    """
    server = make_server("--pool-size", "0", tuning={
        "docker-threads": 4, "export-spool-bytes": spool, "export-stall": STALL})
    session_id = _create(server)
    status, body = _exec(server, session_id,
                         f"head -c {WORKSPACE_MIB}M /dev/urandom > /workspace/big")
    assert (status, body["exit_code"]) == (200, 0), body
    return server, session_id


def test_a_stalled_export_neither_freezes_its_session_nor_the_server(make_server):
    server, session_id = _workspace_server(make_server)
    stalled = _export(server, session_id)
    wait_for(lambda: _metric(server, "capsule_exports_started_total") >= 1, 30,
             "the export to start")
    # As many execs as the session may run, which are as many as there are
    # Docker threads: each is refused at once, none waits on the container.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _exec(server, session_id, "echo hi", timeout=30),
                                range(4)))
    for status, body in answers:
        assert status == 409, body
        assert body["code"] == "export_in_progress"
        assert "export" in body["error"]
    # Another client's new session opens in its normal time (bounded
    # generously: it took a minute when the Docker threads were held).
    started = time.monotonic()
    other = _create(server, source="127.0.0.3")
    assert time.monotonic() - started < OPENS_WITHIN
    status, body = _exec(server, other, "echo other")
    assert (status, body["stdout"]) == (200, "other\n"), body
    # The stalled export is cut off, and with it Docker's stream: the
    # session's execs work again while the client still reads nothing.
    wait_for(lambda: "read nothing for" in server.log(), 60, "the stalled export to be cut")
    status, body = _exec(server, session_id, "echo back", timeout=30)
    assert (status, body["stdout"]) == (200, "back\n"), body
    assert f"export of session {session_id[:8]} cut off after" in server.log()
    assert _metric(server, "capsule_exports_stalled_total") == 1
    stalled.close()
    assert server.unhandled_errors() == []


def test_an_export_that_fits_its_spool_ends_docker_s_stream_at_once(make_server):
    # The spool holds the whole archive: Docker's stream ends although the
    # client has read nothing yet, and the client then gets it all.
    server, session_id = _workspace_server(make_server, spool=512 * 1024 * 1024)
    sock = _export(server, session_id)
    wait_for(lambda: _metric(server, "capsule_exports_started_total") >= 1, 30,
             "the export to start")

    def exec_works() -> bool:
        status, body = _exec(server, session_id, "echo free", timeout=30)
        assert status in (200, 409), body
        return status == 200
    wait_for(exec_works, 60, "an exec to work while the export's client reads nothing",
             interval=0.5)
    sock.settimeout(60)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    received = bytearray()
    while chunk := sock.recv(1 << 20):
        received += chunk
    sock.close()
    received = bytes(received)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(_dechunk(body)))) as tar:
        assert tar.getmember("workspace/big").size == WORKSPACE_MIB * 1024 * 1024
    assert f"exported the workspace of session {session_id[:8]}" in server.log()
    assert server.unhandled_errors() == []
