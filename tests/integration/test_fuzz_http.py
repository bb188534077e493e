"""
The second round's attacks on the HTTP doors, repeated with random input at
a live capsule with users (issue 19): a login's `next` of any text never
leaves the site; a body to a session's exec or upload path, with any
credentials but its owner's, is answered from its headers before a byte of
it is read; bursts of wrong passwords run into 429s; and through it all
/health answers and the owner's session keeps working.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
import uuid

import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.httpclient import request

from .test_auth_attacks import ask, basic, burst, form_login

PASSWORD = "correct horse battery"
TOKEN = "fuzz-owner-token-" + "7" * 30

# Text a `next` could be: anything, and the shapes that fooled browsers.
nexts = st.one_of(
    st.text(max_size=60),
    st.builds(lambda a, b: a + b, st.sampled_from(
        ["/", "//", "/\\", "\\\\", "/%09/", "/%2F/", "%2F%2F", "http://", "https:", "/\t/",
         "javascript:", "/%5C", "/%0d%0a", "/.//", "///"]), st.text(max_size=30)),
)
paths = st.sampled_from(["exec", "workspace"])
authorizations = st.one_of(
    st.none(), st.just(f"Bearer {'x' * 40}"), st.text(min_size=1, max_size=60).filter(
        lambda s: s.isprintable() and "\n" not in s and "\r" not in s),
    st.builds(lambda u, p: basic(u, p)["Authorization"],
              st.sampled_from(["alice", "bob", "mallory"]), st.text(max_size=20)),
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, request):
    from .harness import CapsuleServer, remove_instance_containers
    tmp = tmp_path_factory.mktemp("fuzz-http")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    (tmp / "htpasswd").write_text(f"alice:$2y${hashed[4:]}\n")
    (tmp / "tokens").write_text(f"owner:{TOKEN}\n")
    server = CapsuleServer(tmp, "--auth", str(tmp / "htpasswd"), "--tokens", str(tmp / "tokens"),
                           "--state-dir", str(tmp / "state"), "--pool-size", "0",
                           "--grace", "300")
    server.start()
    request.addfinalizer(lambda: (server.stop(), remove_instance_containers(server.instance)))
    owner = {"Authorization": f"Bearer {TOKEN}"}
    created = request_json(server, "POST", "/api/sessions", owner, b"{}")
    return server, created["id"], owner


def request_json(server, method, path, headers, body=None):
    answer = request(server.url + path, method,
                     {"Content-Type": "application/json", **headers}, body)
    assert answer.status in (200, 201), (answer.status, answer.body[:300])
    return answer.json()


def headers_only(server, path: str, authorization: str | None, length: int) -> int:
    """
    Send a request's headers, declaring C{length} bytes of body, and none of
    the body: the status capsule answers with (0: no answer within 20 s).
    """
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}",
             "Content-Type: application/x-tar", "Connection: close"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape"))
        try:
            status_line = sock.makefile("rb").readline()
        except (TimeoutError, ConnectionError):
            return 0
    parts = status_line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(next_path=nexts)
def test_a_login_never_sends_anyone_off_the_site(fuzzed, next_path):
    server, _, _ = fuzzed
    status, headers, _ = form_login(server, "alice", PASSWORD, next_path)
    assert status in (302, 303), status
    location = headers["Location"]
    decoded = urllib.parse.unquote(location)
    assert location.startswith("/") and not decoded.startswith(("//", "/\\")), location
    assert "\\" not in decoded and all(c.isprintable() and c != " " for c in decoded), location


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(door=paths, authorization=authorizations, own=st.booleans())
def test_a_body_nobody_may_send_is_refused_from_its_headers(fuzzed, door, authorization, own):
    server, session_id, _ = fuzzed
    target = session_id if own else str(uuid.uuid4())
    # 8 MiB declared, none sent: the answer must come from the headers alone.
    status = headers_only(server, f"/api/sessions/{target}/{door}", authorization,
                          8 * 1024 * 1024)
    assert status in (400, 401, 404, 413, 415, 429), status


def test_bursts_of_wrong_passwords_run_into_429s_and_the_owner_works_on(fuzzed):
    server, session_id, owner = fuzzed
    statuses = []
    for round_ in range(3):
        statuses += burst(30, lambda i, r=round_: form_login(
            server, "alice", f"guess {r}-{i}"))
    assert statuses.count(429) > 0
    # At most the documented guesses per user and per address got to bcrypt.
    assert sum(1 for s in statuses if s in (200, 302, 303, 401)) <= 10, statuses
    assert request(server.url + "/health").status == 200
    # The owner, from another address than the guesses' (the whole 127/8 is
    # this machine's), is not held up by them.
    status, _, body = ask(server, f"/api/sessions/{session_id}/exec", "POST",
                          {"Content-Type": "application/json", **owner},
                          b'{"argv": ["echo", "still here"]}', source="127.0.0.9")
    answer = json.loads(body)
    assert status == 200 and answer["stdout"] == "still here\n", (status, body[:300])
