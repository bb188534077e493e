"""
The session API against the real engine: a session created by the API and
used over the WebSocket; exec's output, exit codes, timeout and cap; an
upload and an export that round-trip a workspace; malicious archives
refused with nothing written; ownership with users; every documented route
answering.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import tarfile
import time
import uuid

import pytest

from capsule.web.openapi import ROUTES
from tests.support.clients import BlockingTerminal
from tests.support.httpclient import request

from .harness import docker_client, instance_containers, wait_for

ALICE, BOB = "alice-token-" + "1" * 30, "bob-token-" + "2" * 30


def call(server, path: str, method: str = "GET", body=None, token: str | None = None,
         content_type: str | None = None, raw: bool = False):
    """
    (status, JSON or bytes) of one request to C{server}.
    """
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["Content-Type"] = content_type or "application/json"
    status, _, payload = request(server.url + path, method, headers, data, timeout=120)
    if raw:
        return status, payload
    return status, json.loads(payload) if payload else None


def create(server, token=None) -> dict:
    status, body = call(server, "/api/sessions", "POST", {"cols": 100, "rows": 30}, token)
    assert status == 201, body
    return body


def execute(server, session_id: str, token=None, **request) -> dict:
    status, body = call(server, f"/api/sessions/{session_id}/exec", "POST", request, token)
    assert status == 200, body
    return body


def sh(server, session_id: str, script: str, **request) -> dict:
    return execute(server, session_id, argv=["sh", "-c", script], **request)


def tar_of(entries, compress: bool = True) -> bytes:
    """
    (name, kind, extra, mode): kind file (extra: contents), dir, symlink or
    hardlink (extra: target).
    """
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, extra, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = 1_700_000_000
            info.uid = info.gid = 0
            data = None
            if kind == "file":
                info.size = len(extra)
                data = io.BytesIO(extra)
            else:
                info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                             "hardlink": tarfile.LNKTYPE}[kind]
                info.linkname = extra or ""
            tar.addfile(info, data)
    return gzip.compress(out.getvalue()) if compress else out.getvalue()


def upload(server, session_id: str, data: bytes, token=None):
    return call(server, f"/api/sessions/{session_id}/workspace", "POST", data, token,
                content_type="application/gzip" if data[:2] == b"\x1f\x8b"
                else "application/x-tar")


def test_a_session_created_by_the_api_opens_over_the_websocket(server):
    session = create(server)
    session_id = session["id"]
    assert session["url"] == f"/?session_id={session_id}"
    assert (session["status"], session["client_attached"]) == ("detached", False)
    sh(server, session_id, "echo made-by-exec > /workspace/note")
    terminal = BlockingTerminal(server.ws_url, session_id)
    try:
        assert terminal.next("connected")["session_id"] == session_id
        terminal.run("cat note; stty size", "made-by-exec")
        terminal.run("stty size", "30 100")
        status, body = call(server, f"/api/sessions/{session_id}")
        assert (status, body["status"], body["client_attached"]) == (200, "running", True)
    finally:
        terminal.close()
    assert [s["id"] for s in call(server, "/api/sessions")[1]["sessions"]] == [session_id]
    status, body = call(server, f"/api/sessions/{session_id}", "DELETE")
    assert (status, body) == (200, {"id": session_id, "ended": True})
    wait_for(lambda: not [c for c in instance_containers(server.instance)
                          if c["Labels"].get("io.capsule.session") == session_id],
             30, "the session's container to be removed")
    assert call(server, f"/api/sessions/{session_id}")[0] == 404


def test_exec_output_exit_codes_stdin_env_and_cwd(server):
    session_id = create(server)["id"]
    body = sh(server, session_id, 'cat; echo "$GREETING"; pwd; id -un; echo oops >&2; exit 7',
              stdin="from stdin\n", env={"GREETING": "h\u00e9llo"}, cwd="/tmp")
    assert body["stdout"] == "from stdin\nh\u00e9llo\n/tmp\ndeveloper\n"
    assert (body["stderr"], body["exit_code"], body["timed_out"]) == ("oops\n", 7, False)
    assert body["truncated"] == {"stdout": False, "stderr": False}
    assert execute(server, session_id, argv=["true"])["exit_code"] == 0
    missing = execute(server, session_id, argv=["no-such-program"])
    assert missing["exit_code"] == 127 and "no-such-program" in missing["stderr"]
    # Output that is not UTF-8 arrives as base64, every byte of it.
    body = sh(server, session_id, r"printf 'a\377b'")
    assert (body["stdout"], body["stdout_encoding"], body["stderr_encoding"]) == (
        "Yf9i", "base64", "utf-8")


def test_exec_in_a_cwd_that_cannot_be_entered_is_a_400(server):
    session_id = create(server)["id"]
    for cwd, why in [("/nonexistent", "no such file or directory"),
                     ("/etc/passwd", "not a directory")]:
        status, body = call(server, f"/api/sessions/{session_id}/exec", "POST",
                            {"argv": ["pwd"], "cwd": cwd})
        assert (status, body) == (400, {
            "error": f"cwd {cwd}: the command cannot be run there ({why})",
            "code": "bad_cwd"})
    assert sh(server, session_id, "exit 126")["exit_code"] == 126
    assert sh(server, session_id, "pwd", cwd="/tmp")["stdout"] == "/tmp\n"


def test_exec_timeout_kills_the_command_and_what_it_started(server):
    session_id = create(server)["id"]
    started = time.monotonic()
    body = sh(server, session_id, "sleep 300 & sleep 301; echo never", timeout=1)
    assert time.monotonic() - started < 30
    assert (body["timed_out"], body["exit_code"], body["stdout"]) == (True, 137, "")
    left = sh(server, session_id, "ps -eo args | grep -c '^sleep 30[01]' || true")
    assert left["stdout"] == "0\n"
    assert sh(server, session_id, "sleep 0.2", timeout=5)["timed_out"] is False


def test_exec_output_cap_drops_the_rest_and_never_splits_a_character(server):
    session_id = create(server)["id"]
    body = sh(server, session_id, "head -c 20000000 /dev/zero | tr '\\0' a; echo done >&2",
              max_output=1000)
    assert (len(body["stdout"]), body["stdout"][:3]) == (1000, "aaa")
    assert body["truncated"] == {"stdout": True, "stderr": False}
    assert (body["stderr"], body["exit_code"]) == ("done\n", 0)
    body = sh(server, session_id, "printf '\\303\\251\\303\\251\\303\\251'", max_output=5)
    assert (body["stdout"], body["truncated"]["stdout"]) == ("\u00e9\u00e9", True)


def test_upload_then_export_round_trips_the_workspace(server):
    session_id = create(server)["id"]
    entries = [("proj", "dir", None, 0o755), ("proj/run.sh", "file", b"#!/bin/sh\necho hi\n",
                                               0o755),
               ("proj/secret.txt", "file", b"private\n", 0o600),
               ("proj/empty", "dir", None, 0o700),
               ("proj/link", "symlink", "run.sh", 0o777),
               ("proj/same", "hardlink", "proj/run.sh", 0o755),
               ("proj/setuid", "file", b"x", 0o4755),
               ("top.txt", "file", "\u00e9t\u00e9\n".encode(), 0o644)]
    status, body = upload(server, session_id, tar_of(entries))
    assert status == 200, body
    assert body == {"entries": 8, "files": 4, "directories": 2, "links": 2,
                    "bytes": len(b"#!/bin/sh\necho hi\n") + 8 + 1 + len("\u00e9t\u00e9\n".encode()),
                    "compressed": True}
    assert sh(server, session_id, "./proj/run.sh")["stdout"] == "hi\n"
    owners = sh(server, session_id, "stat -c '%U %a %n' proj/run.sh proj/setuid proj/empty")
    assert owners["stdout"] == ("developer 755 proj/run.sh\ndeveloper 755 proj/setuid\n"
                                "developer 700 proj/empty\n")
    status, exported = call(server, f"/api/export/{session_id}", raw=True)
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(exported))) as tar:
        found = {m.name: m for m in tar.getmembers()}
        assert found["workspace/proj/run.sh"].mode & 0o7777 == 0o755
        assert tar.extractfile("workspace/proj/run.sh").read() == b"#!/bin/sh\necho hi\n"
        assert found["workspace/proj/secret.txt"].mode & 0o7777 == 0o600
        assert tar.extractfile("workspace/proj/secret.txt").read() == b"private\n"
        assert found["workspace/proj/empty"].isdir()
        assert found["workspace/proj/empty"].mode & 0o7777 == 0o700
        assert found["workspace/proj/link"].issym()
        assert found["workspace/proj/link"].linkname == "run.sh"
        # One of the two names of the same file is a hard link to the other.
        pair = {found["workspace/proj/same"].type, found["workspace/proj/run.sh"].type}
        assert pair == {tarfile.LNKTYPE, tarfile.REGTYPE}
        assert tar.extractfile("workspace/top.txt").read() == "\u00e9t\u00e9\n".encode()
        assert found["workspace/top.txt"].uid == 1000
        assert found["workspace/top.txt"].mtime == 1_700_000_000


@pytest.mark.parametrize("bad, entry", [
    (("../escape", "file", b"x", 0o644), "../escape"),
    (("/tmp/absolute", "file", b"x", 0o644), "/tmp/absolute"),
    (("out", "symlink", "/tmp", 0o777), "out"),
    (("up", "symlink", "../../tmp", 0o777), "up"),
    (("hard", "hardlink", "/etc/passwd", 0o644), "hard"),
    (("hard", "hardlink", "../../etc/passwd", 0o644), "hard"),
])
def test_a_malicious_archive_is_refused_and_nothing_is_written(server, bad, entry):
    session_id = create(server)["id"]
    data = tar_of([("canary", "file", b"first\n", 0o644), bad,
                   ("after", "file", b"last\n", 0o644)], compress=False)
    status, body = upload(server, session_id, data)
    assert (status, body["code"], body["entry"]) == (400, "unsafe_entry", entry)
    listing = sh(server, session_id, "ls -A /workspace; ls /tmp/absolute 2>&1 || true")
    assert listing["stdout"] == "ls: cannot access '/tmp/absolute': No such file or directory\n"


def test_an_archive_cut_short_is_refused_and_nothing_is_written(server):
    session_id = create(server)["id"]
    plain = tar_of([("one", "file", b"1" * 3000, 0o644), ("two", "file", b"2" * 3000, 0o644),
                    ("three", "file", b"3" * 3000, 0o644)], compress=False)
    at_an_entry_end = plain[:plain.index(b"2" * 3000) + 3072]  # one and two, whole
    packed = gzip.compress(plain)
    for data in [at_an_entry_end, gzip.compress(at_an_entry_end), packed[:len(packed) // 2],
                 packed[:-4]]:
        status, body = upload(server, session_id, data)
        assert (status, body["code"]) == (400, "bad_archive"), len(data)
        assert body["error"].startswith(("the archive is truncated or corrupt: ",
                                         "the archive cannot be read: ")), body
    assert sh(server, session_id, "ls -A /workspace")["stdout"] == ""
    status, body = upload(server, session_id, packed)
    assert (status, body["files"]) == (200, 3)


def test_uploads_that_are_not_archives_or_too_large(make_server):
    server = make_server("--upload-max-bytes", "10k")
    session_id = create(server)["id"]
    status, body = upload(server, session_id, b"just text, not a tar" * 40)
    assert (status, body["code"]) == (400, "not_an_archive")
    status, body = upload(server, session_id, tar_of([("big", "file", b"x" * 20000, 0o644)],
                                                     compress=False))
    assert (status, body["code"]) == (413, "body_too_large")
    assert sh(server, session_id, "ls -A /workspace")["stdout"] == ""


def test_with_users_another_users_session_is_a_404(make_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    server = make_server("--tokens", str(tokens), "--state-dir", str(tmp_path / "state"))
    assert call(server, "/api/sessions", "POST", {})[0] == 401
    session_id = create(server, ALICE)["id"]
    for method, path, body in [("GET", "", None), ("DELETE", "", None),
                               ("POST", "/exec", {"argv": ["true"]})]:
        status, answer = call(server, f"/api/sessions/{session_id}{path}", method, body, BOB)
        assert (status, answer["code"]) == (404, "session_not_found"), (method, path)
    status, answer = upload(server, session_id, tar_of([("a", "file", b"x", 0o644)]), BOB)
    assert (status, answer["code"]) == (404, "session_not_found")
    # Without credentials, an upload's body is refused before it is read
    # (tests/integration/test_bodies.py sends only its headers).
    status, answer = upload(server, session_id, tar_of([("a", "file", b"x", 0o644)]))
    assert (status, answer["code"]) == (401, "unauthenticated")
    assert call(server, f"/api/export/{session_id}", token=BOB)[0] == 404
    assert call(server, "/api/sessions", token=BOB)[1]["sessions"] == []
    mine = call(server, "/api/sessions", token=ALICE)[1]
    assert (mine["user"], [s["id"] for s in mine["sessions"]]) == ("alice", [session_id])
    assert execute(server, session_id, ALICE, argv=["ls", "-A"])["stdout"] == ""


def test_every_documented_route_answers(make_server, tmp_path):
    # Recorded: a session's recording is one of the routes.
    server = make_server("--grace", "30", "--record", str(tmp_path / "casts"),
                         tuning={"cleanup-interval": 0.5})
    first, second = create(server)["id"], create(server)["id"]
    bodies = {"/api/sessions/{id}/exec": {"argv": ["true"]}, "/api/sessions": {},
              "/api/snapshots": {"session": first, "name": "every-route"}}
    # Those that end things go last, in this order: a snapshot is made
    # before it is started and deleted; the session is put away, resumed.
    last = [("/api/snapshots/{name}/sessions", "post"), ("/api/snapshots/{name}", "delete"),
            ("/api/sessions/{id}/put-away", "post"), ("/api/sessions/{id}/resume", "post"),
            ("/api/admin/drain", "post"), ("/api/admin/drain", "delete"),
            ("/api/sessions/{id}", "delete"), ("/api/admin/sessions/{id}", "delete"),
            ("/api/admin/sessions", "delete")]
    # /login and /logout are there only with users: see the next test.
    order = [r for r in ROUTES if r not in last and r[0] not in LOGIN_PATHS] + last
    assert set(order) | {r for r in ROUTES if r[0] in LOGIN_PATHS} == set(ROUTES)
    share_id = call(server, f"/api/sessions/{first}/shares", "POST", {})[1]["id"]
    preview_share = call(server, f"/api/sessions/{first}/ports/3000/shares", "POST",
                         {})[1]["id"]
    bodies["/api/sessions/{id}/ports/{port}"] = {"public": True}
    for path, method in order:
        session_id = second if path.startswith("/api/admin/sessions/") else first
        url = path.replace("{id}", session_id).replace("{port}", "3000").replace(
            "{share_id}", preview_share if "/ports/" in path else share_id).replace(
            "{name}", "every-route")
        body = bodies.get(path)
        if path.endswith("/workspace"):
            body = tar_of([("doc.txt", "file", b"x", 0o644)])
        status, _ = call(server, url, method.upper(), body, raw=True,
                         content_type="application/gzip" if path.endswith("/workspace")
                         else None)
        assert status not in (404, 405), (method, path, status)
        assert status < 500, (method, path, status)
    assert call(server, f"/api/nothing/{uuid.uuid4()}")[0] == 404


def test_the_answers_match_the_openapi_document(server):
    """
    Each answer's status is documented for its route, and its JSON body
    validates against the documented schema.
    """
    jsonschema = pytest.importorskip("jsonschema")
    from capsule.web.openapi import document
    doc = document()
    seen = []

    def check(template, method, path, body=None, content_type="application/json"):
        status, headers, data = request(server.url + path, method,
                                        {"Content-Type": content_type} if body is not None
                                        else {}, body, timeout=120)
        kind = headers.get("content-type")
        answer = doc["paths"][template][method.lower()]["responses"].get(str(status))
        assert answer is not None, (method, template, status, data[:200])
        content = answer.get("content", {})
        if kind == "application/json" and content:
            schema = {**content[kind]["schema"], "components": doc["components"]}
            jsonschema.validate(json.loads(data), schema,
                                cls=jsonschema.Draft202012Validator)
        seen.append((method, template, status))
        return data

    session_id = json.loads(check("/api/sessions", "POST", "/api/sessions", b'{"cols": 100}'))[
        "id"]
    for body in (b'{"profile": "nope"}', b'{"cols": "x"}', b"[" * 5000):
        check("/api/sessions", "POST", "/api/sessions", body)
    check("/api/sessions", "POST", "/api/sessions", b"{}", "text/plain")
    check("/api/sessions", "GET", "/api/sessions")
    check("/api/profiles", "GET", "/api/profiles")
    check("/api/sessions/{id}", "GET", f"/api/sessions/{session_id}")
    check("/api/sessions/{id}", "GET", f"/api/sessions/{uuid.uuid4()}")
    for body in [{"argv": ["echo", "hi"]}, {"argv": []}, {"argv": ["pwd"], "cwd": "/nope"},
                 {"argv": ["sleep", "5"], "timeout": 0.5}, {"argv": ["true"], "max_output": 0}]:
        check("/api/sessions/{id}/exec", "POST", f"/api/sessions/{session_id}/exec",
              json.dumps(body).encode())
    upload = f"/api/sessions/{session_id}/workspace"
    check("/api/sessions/{id}/workspace", "POST", upload,
          tar_of([("f", "file", b"x", 0o644)]), "application/gzip")
    check("/api/sessions/{id}/workspace", "POST", upload, b"garbage" * 100,
          "application/x-tar")
    check("/api/export/{id}", "GET", f"/api/export/{session_id}")
    check("/api/sessions/{id}", "DELETE", f"/api/sessions/{session_id}")
    check("/api/sessions/{id}", "DELETE", f"/api/sessions/{session_id}")
    assert [status for _, _, status in seen] == [
        201, 400, 400, 400, 415, 200, 200, 200, 404, 200, 400, 400, 200, 200, 200, 400, 200,
        200, 404]


LOGIN_PATHS = ("/login", "/logout")


def test_the_documented_login_routes_answer_with_users(make_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\n")
    server = make_server("--tokens", str(tokens), "--state-dir", str(tmp_path / "state"))
    routes = [r for r in ROUTES if r[0] in LOGIN_PATHS]
    assert sorted(routes) == [("/login", "get"), ("/login", "post"), ("/logout", "post")]
    for path, method in routes:
        status, _ = call(server, path, method.upper(),
                         b"username=alice&password=wrong" if method == "post" else None,
                         raw=True, content_type="application/x-www-form-urlencoded")
        assert status not in (404, 405), (method, path, status)
        assert status < 500, (method, path, status)


def _chunked(server, path: str, chunks):
    status, _, body = request(server.url + path, "POST",
                              {"Content-Type": "application/x-tar",
                               "Transfer-Encoding": "chunked"}, iter(chunks), timeout=60)
    return status, json.loads(body)


def test_a_chunked_upload_is_counted_as_it_is_read(make_server):
    server = make_server("--upload-max-bytes", "64k")
    session_id = create(server)["id"]
    data = tar_of([("chunked.txt", "file", b"y" * 30000, 0o644)], compress=False)
    status, body = _chunked(server, f"/api/sessions/{session_id}/workspace",
                            [data[i:i + 4096] for i in range(0, len(data), 4096)])
    assert (status, body["files"], body["bytes"]) == (200, 1, 30000)
    big = tar_of([("big.txt", "file", b"z" * 100000, 0o644)], compress=False)
    status, body = _chunked(server, f"/api/sessions/{session_id}/workspace",
                            [big[i:i + 4096] for i in range(0, len(big), 4096)])
    assert (status, body["code"]) == (413, "body_too_large")
    assert sh(server, session_id, "ls -A /workspace")["stdout"] == "chunked.txt\n"
    assert "refused a body for /api/sessions/" in server.log()


def test_an_upload_tar_cannot_write_is_a_422_with_its_words(server):
    session_id = create(server)["id"]
    sh(server, session_id, "mkdir locked && chmod 555 locked")
    status, body = upload(server, session_id, tar_of([("locked/x", "file", b"x" * 300000, 0o644),
                                                      ("fine", "file", b"ok", 0o644)]))
    assert (status, body["code"]) == (422, "unpack_failed")
    assert "locked/x" in body["error"] and "Permission denied" in body["error"]
    assert sh(server, session_id, "cat fine; ls -A locked")["stdout"] == "ok"


def zeros_tar(path):
    """
    C{path}, written as a .tar of two files of 200 MiB of zeros (one
    buffer in memory at a time): an upload that takes tar a while.
    """
    class Zeros:
        def read(self, size=-1):
            return bytes(min(size, 1 << 20) if size and size > 0 else 1 << 20)
    with tarfile.open(path, "w") as tar:
        for i in range(2):
            info = tarfile.TarInfo(f"zeros{i}")
            info.size = 200 * 1024 * 1024
            tar.addfile(info, Zeros())
    return path


def wait_for_unpacking(session_id: str) -> None:
    """
    Wait until tar unpacks an upload in the container of C{session_id}.
    """
    container, = [c for c in docker_client().containers.list()
                  if c.labels.get("io.capsule.session") == session_id]
    wait_for(lambda: any("tar -x" in " ".join(p) for p in container.top()["Processes"]),
             60, "tar to unpack the upload")


def test_capsule_stops_promptly_while_an_upload_unpacks(make_server, tmp_path):
    import threading

    server = make_server()
    session_id = create(server)["id"]
    big = zeros_tar(tmp_path / "big.tar")
    answers = []

    def send():
        with big.open("rb") as body:
            try:
                answers.append(request(
                    f"{server.url}/api/sessions/{session_id}/workspace", "POST",
                    {"Content-Type": "application/x-tar",
                     "Content-Length": str(big.stat().st_size)}, body, timeout=120).status)
            except (http.client.HTTPException, ConnectionError) as e:
                answers.append(e)
    sender = threading.Thread(target=send)
    sender.start()
    wait_for_unpacking(session_id)
    # The harness fails the stop if capsule is not gone within its deadline.
    server.stop()
    sender.join(30)
    assert answers and answers[0] != 200


def test_an_exec_or_upload_in_a_session_ended_meanwhile_says_so(server, tmp_path):
    import threading

    def in_thread(function):
        answers = []
        thread = threading.Thread(target=lambda: answers.append(function()))
        thread.start()
        return thread, answers

    session_id = create(server)["id"]
    thread, answers = in_thread(lambda: call(server, f"/api/sessions/{session_id}/exec", "POST",
                                             {"argv": ["sleep", "300"], "timeout": 400}))
    wait_for(lambda: sh(server, session_id, "pgrep -x sleep || true")["stdout"], 30,
             "the command to run")
    assert call(server, f"/api/sessions/{session_id}", "DELETE")[0] == 200
    thread.join(60)
    status, body = answers[0]
    assert (status, body["code"]) == (404, "session_not_found")
    assert body["error"] == (f"session {session_id} ended while the command ran: the session"
                             " was ended through the API")

    session_id = create(server)["id"]
    big = zeros_tar(tmp_path / "big.tar")
    thread, answers = in_thread(lambda: call(server, f"/api/sessions/{session_id}/workspace",
                                             "POST", big.read_bytes(),
                                             content_type="application/x-tar"))
    wait_for_unpacking(session_id)
    assert call(server, f"/api/sessions/{session_id}", "DELETE")[0] == 200
    thread.join(60)
    status, body = answers[0]
    assert (status, body["code"]) == (404, "session_not_found")
    assert body["error"].startswith(f"session {session_id} ended while the upload ran")


def test_the_url_of_a_session_created_by_the_api_opens_it_in_chromium(server):
    import os
    import shutil
    chromium = (os.environ.get("CAPSULE_CHROMIUM") or shutil.which("chromium")
                or shutil.which("chromium-browser"))
    if chromium is None:
        pytest.skip("no chromium on this machine")
    sync_api = pytest.importorskip("playwright.sync_api")
    session = create(server)
    sh(server, session["id"], "echo api-made-this > /workspace/marker")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + session["url"])
            page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
            assert page.get_attribute("#session", "title") == session["id"]
            page.locator(".xterm-helper-textarea").focus()
            page.keyboard.type("cat marker | tr a-z A-Z")
            page.keyboard.press("Enter")
            page.wait_for_function(
                "() => /API-MADE-THIS/.test(document.querySelector('.xterm-rows').innerText)",
                timeout=15000)
            assert call(server, f"/api/sessions/{session['id']}")[1]["client_attached"] is True
            assert errors == []
        finally:
            browser.close()
