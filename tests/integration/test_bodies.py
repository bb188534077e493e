"""
Request bodies and uploads against a real capsule and engine: a body is
answered (401, 404, 413, 429, 503) from its headers, before capsule reads or
spools it; an upload's files appear whole or not at all, even when capsule
is killed in the middle of one.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import threading
import uuid

from tests.support.httpclient import parse

from .harness import docker_client, wait_for
from .test_api import ALICE, BOB, create, sh, tar_of, upload

ANSWER_WITHIN = 10.0


def _open_body(server, path: str, length: int, token: str | None = None,
               content_type: str = "application/json", sent: bytes = b"") -> socket.socket:
    """
    A connection that has sent a POST's headers (declaring C{length} bytes
    of body) and C{sent} of that body, and sends no more.
    """
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}",
             f"Content-Length: {length}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_WITHIN)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + sent)
    return sock


def _answer(sock: socket.socket):
    """
    (status, JSON body) of the answer on C{sock}, which must come (and the
    connection close) although the body was never sent whole.
    """
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    finally:
        sock.close()
    assert data, "no answer before the body was sent"
    response = parse(data, "POST")
    return response.status, json.loads(response.body)


def _spooled_files(pid: int) -> list[str]:
    """
    The temporary files (request bodies, unlinked as they are made) that
    process C{pid} holds open.
    """
    names = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith("(deleted)"):
            names.append(target)
    return names


def _users(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    return ("--tokens", str(tokens), "--state-dir", str(tmp_path / "state"))


def test_a_body_is_refused_from_its_headers_before_it_is_read(make_server, tmp_path):
    server = make_server(*_users(tmp_path))
    session_id = create(server, ALICE)["id"]
    nobody = str(uuid.uuid4())
    eight = 8 * 1024 * 1024
    # Ten bodies without credentials: each is answered 401 with most of it
    # unsent, and capsule holds none of them.
    socks = [_open_body(server, f"/api/sessions/{nobody}/exec", eight, sent=b"x" * 65536)
             for _ in range(10)]
    answers = [_answer(sock) for sock in socks]
    assert [(status, body["code"]) for status, body in answers] == [
        (401, "unauthenticated")] * 10
    assert _spooled_files(server.pid) == []
    # Any Authorization header, a live session: still 401 from the headers.
    status, body = _answer(_open_body(server, f"/api/sessions/{session_id}/exec", eight,
                                      token="not-a-token"))
    assert (status, body["code"]) == (401, "unauthenticated")
    # Another user's session, with that user's good token: 404.
    status, body = _answer(_open_body(server, f"/api/sessions/{session_id}/workspace",
                                      eight, token=BOB, content_type="application/x-tar"))
    assert (status, body["code"]) == (404, "session_not_found")
    # The owner's token, while an upload of hers is under way: 429 before
    # the second body is read.
    first = _open_body(server, f"/api/sessions/{session_id}/workspace", eight, token=ALICE,
                       content_type="application/x-tar", sent=b"\0" * 1024)
    try:
        status, body = _answer(_open_body(server, f"/api/sessions/{session_id}/workspace",
                                          eight, token=ALICE,
                                          content_type="application/x-tar"))
        assert (status, body["code"]) == (429, "upload_in_progress")
    finally:
        first.close()
    # Once the first went away, its slot is free again.
    wait_for(lambda: upload(server, session_id, tar_of([("a", "file", b"x", 0o644)]),
                            ALICE)[0] == 200, 20, "the upload slot to be free")
    assert "refused a body" in server.log()


def test_bodies_in_flight_per_address_and_the_spool_budget(make_server, tmp_path):
    server = make_server(*_users(tmp_path), "--upload-max-bytes", "64m",
                         "--spool-max-bytes", "64m", tuning={"bodies-per-address": 2})
    session_id = create(server, ALICE)["id"]
    mib = 1024 * 1024
    exec_path = f"/api/sessions/{session_id}/exec"
    upload = _open_body(server, f"/api/sessions/{session_id}/workspace", 60 * mib,
                        token=ALICE, content_type="application/x-tar", sent=b"\0" * 1024)
    command = _open_body(server, exec_path, mib, token=ALICE, sent=b"{")
    try:
        # A third body from the same address: 429 from its headers.
        status, body = _answer(_open_body(server, exec_path, mib, token=ALICE))
        assert (status, body["code"]) == (429, "too_many_bodies")
        command.close()
        # 60 MiB of the 64 are held: a body of 8 MiB gets 503 from its
        # headers (once capsule saw the other one go).
        answers = []

        def answered_spool_full():
            answers.append(_answer(_open_body(server, exec_path, 8 * mib, token=ALICE)))
            return answers[-1][1]["code"] != "too_many_bodies"
        wait_for(answered_spool_full, 20, "an answer other than too_many_bodies")
        status, body = answers[-1]
        assert (status, body["code"]) == (503, "spool_full")
    finally:
        upload.close()
        command.close()
    log = server.log()
    assert "too_many_bodies" in log and "spool_full" in log


def _one_big_file_tar(path, size: int):
    """
    C{path}, written as a .tar of one file C{big.bin} of C{size} zero bytes
    (one buffer in memory at a time).
    """
    class Zeros:
        def read(self, n=-1):
            return bytes(min(n, 1 << 20) if n and n > 0 else 1 << 20)
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = size
        info.mode = 0o644
        tar.addfile(info, Zeros())
    return path


def _container_of(session_id: str):
    container, = [c for c in docker_client().containers.list()
                  if c.labels.get("io.capsule.session") == session_id]
    return container


def _run(container, script: str) -> str:
    return container.exec_run(["sh", "-c", script]).output.decode()


def test_a_kill_during_an_upload_leaves_no_partial_file(make_server, tmp_path):
    size = 600 * 1024 * 1024
    server = make_server()
    session_id = create(server)["id"]
    big = _one_big_file_tar(tmp_path / "big.tar", size)
    container = _container_of(session_id)
    answers = []

    def send():
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
        try:
            sock.sendall((f"POST /api/sessions/{session_id}/workspace HTTP/1.1\r\n"
                          "Host: 127.0.0.1\r\nContent-Type: application/x-tar\r\n"
                          f"Content-Length: {big.stat().st_size}\r\n\r\n").encode())
            with big.open("rb") as body:
                sock.sendfile(body)
            answers.append(sock.recv(65536))
        except OSError as e:
            answers.append(e)
        finally:
            sock.close()
    sender = threading.Thread(target=send)
    sender.start()
    # Once tar has written part of the file, wherever it writes it: kill -9.
    sizes = "find /workspace -name big.bin -type f -exec stat -c %s {} + 2>/dev/null"
    wait_for(lambda: any(0 < int(n) < size for n in _run(container, sizes).split()), 120,
             "tar to write part of the file")
    os.kill(server.pid, signal.SIGKILL)
    server.process.wait(30)
    sender.join(60)
    # The upload did not end (no 200): the kill came in its middle.
    assert answers and not (isinstance(answers[0], bytes)
                            and answers[0].startswith(b"HTTP/1.1 200"))
    # tar sees its input end (or is left to its timeout); either way, no
    # file in /workspace is partial: big.bin is absent, or whole.
    wait_for(lambda: "tar" not in _run(container, "ps -eo comm"), 60,
             "tar to end in the container")
    listing = _run(container, "ls -A /workspace; stat -c %s /workspace/big.bin 2>/dev/null")
    names = [n for n in listing.split() if not n.isdigit()]
    assert names in ([], ["big.bin"]) or set(names) <= {".capsule-upload", "big.bin"}
    if "big.bin" in names:
        assert str(size) in listing.split()
    assert _run(container, "find /workspace -path /workspace/.capsule-upload -prune -o"
                           " -type f -print") in ("", "/workspace/big.bin\n")


def test_a_staging_directory_left_over_is_removed_by_the_next_upload(server):
    session_id = create(server)["id"]
    sh(server, session_id, "mkdir -p .capsule-upload/d && head -c 1000 /dev/zero"
                           " > .capsule-upload/d/partial")
    status, body = upload(server, session_id, tar_of([("d/whole", "file", b"ok", 0o644)]))
    assert status == 200, body
    assert sh(server, session_id, "ls -A; ls -A d")["stdout"] == "d\nwhole\n"
