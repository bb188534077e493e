"""
Attacks on users, against a live capsule with --auth and the real engine
(issue 19): password guesses sent in parallel, a login's `next` that leaves
the site, a --trusted-proxy range that holds the sessions' own network,
the admin API and /metrics from loopback, and a login cookie that outlives
a password change.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import re
import subprocess
import sys
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest

from .harness import IMAGE, docker_client, free_port, wait_for

PASSWORDS = {"alice": "correct horse battery", "bob": "tr0ub4dor&3", "carol": "carol's own"}
ADMIN_TOKEN = "admin-token-" + "9" * 30


def htpasswd_line(user: str, password: str, cost: int = 4) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()
    return f"{user}:$2y${hashed[4:]}\n"


@pytest.fixture
def passwords(tmp_path):
    path = tmp_path / "htpasswd"
    # alice's hash costs what a real one does (htpasswd -B -C 10): her
    # guesses take a while on capsule's bcrypt threads.
    path.write_text(htpasswd_line("alice", PASSWORDS["alice"], 10)
                    + "".join(htpasswd_line(u, PASSWORDS[u]) for u in ("bob", "carol")))
    return path


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def ask(server, path: str, method: str = "GET", headers: dict | None = None,
        body: bytes | None = None, source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """
    One request from the loopback address C{source} (the whole 127/8 is this
    machine's): (status, headers, body).
    """
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60,
                                            source_address=(source, 0))
    try:
        connection.request(method, path, body=body,
                           headers={"Connection": "close", **(headers or {})})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def form_login(server, user: str, password: str, next_path: str = "/",
               source: str = "127.0.0.1"):
    body = urllib.parse.urlencode({"username": user, "password": password,
                                   "next": next_path}).encode()
    return ask(server, "/login", "POST", {
        "Content-Type": "application/x-www-form-urlencoded", "Origin": server.url}, body,
        source)


def burst(count: int, attempt) -> list[int]:
    """
    The statuses of C{count} attempts sent at once, each from a thread of
    its own: C{attempt(i)} makes the C{i}th.
    """
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda i: attempt(i)[0], range(count)))


def test_parallel_password_guesses_are_throttled(make_server, passwords, tmp_path):
    server = make_server("--auth", str(passwords), "--state-dir", str(tmp_path / "state"),
                         "--pool-size", "0")
    statuses = []
    with ThreadPoolExecutor(1) as aside:
        for round in range(3):
            # While the guesses run, bob logs in from another address.
            bob = aside.submit(ask, server, "/api/sessions",
                               headers=basic("bob", PASSWORDS["bob"]), source="127.0.0.2")
            statuses += burst(60, lambda i: ask(server, "/api/sessions",
                                                headers=basic("alice", f"hunter2 {round}.{i}")))
            assert bob.result()[0] == 200, round
    failed, throttled = statuses.count(401), statuses.count(429)
    assert failed + throttled == len(statuses) == 180, statuses
    # 5 failures per user per minute (a token comes back every 12 s while
    # the bursts run: a margin of 2).
    assert failed <= 7, (failed, throttled)
    # alice's bucket is empty: her own password is not tried now.
    status, headers, body = ask(server, "/api/sessions",
                                headers=basic("alice", PASSWORDS["alice"]))
    assert status == 429 and int(headers["Retry-After"]) > 0
    assert json.loads(body)["code"] == "throttled"
    # The login form is the same door: carol's guesses from another address.
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda i: form_login(server, "carol", f"hunter2 {i}",
                                                     source="127.0.0.3"), range(40)))
    statuses = [status for status, _, _ in answers]
    assert statuses.count(401) <= 7 and statuses.count(429) >= 33, statuses
    # The form says which limit it met.
    said = {re.search(rb'role="alert">([^<]*)<', body).group(1) for _, _, body in answers}
    assert b"Too many logins at once: try again in 1 s." in said, said
    assert form_login(server, "carol", PASSWORDS["carol"], source="127.0.0.3")[0] == 429
    # Nobody else waits: bob, from his own address, is in.
    assert ask(server, "/api/sessions", headers=basic("bob", PASSWORDS["bob"]),
               source="127.0.0.2")[0] == 200
    log = server.log()
    assert "hunter2" not in log and PASSWORDS["alice"] not in log
    # Refusals of a burst are logged at a bounded rate, not once each.
    assert log.count("too many failed logins") < 20


@pytest.mark.parametrize("next_path", [
    "/%09/evil.example/phish", "/\t/evil.example/phish", "/%5Cevil.example", "//evil.example",
    "/%2F/evil.example", "https://evil.example/", "/\n/evil.example", "/ /evil.example",
])
def test_login_goes_back_to_this_site_only(make_server, passwords, tmp_path, next_path):
    server = make_server("--auth", str(passwords), "--state-dir", str(tmp_path / "state"),
                         "--pool-size", "0")
    status, _, body = ask(server, "/login?next=" + urllib.parse.quote(next_path, safe="/%:"))
    assert status == 200 and b'name="next" value="/"' in body, body
    status, headers, _ = form_login(server, "bob", PASSWORDS["bob"], next_path)
    assert (status, headers["Location"]) == (303, "/")
    # A path of the site still comes back.
    status, headers, _ = form_login(server, "bob", PASSWORDS["bob"], "/?session_id=x")
    assert (status, headers["Location"]) == (303, "/?session_id=x")


def session_subnet() -> str:
    """
    The subnet of capsule's own network (made by any capsule that started).
    """
    network = docker_client().networks.get("capsule")
    return network.attrs["IPAM"]["Config"][0]["Subnet"]


def test_a_trusted_proxy_range_holding_the_sessions_is_refused_at_start(make_server,
                                                                        passwords, tmp_path):
    # A capsule has made the network (the other tests' servers too).
    make_server("--auth", str(passwords), "--state-dir", str(tmp_path / "a"), "--pool-size", "0")
    wait_for(lambda: "capsule" in [n.name for n in docker_client().networks.list()], 30,
             "capsule's network")
    subnet = ipaddress.ip_network(session_subnet())
    wider = subnet.supernet(new_prefix=max(8, subnet.prefixlen - 4))
    port = free_port()
    log = tmp_path / "refused.log"
    twistd = str(Path(sys.executable).with_name("twistd"))
    done = subprocess.run(
        [twistd, "-n", "--pidfile=", f"--logfile={log}", "capsule",
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--image", IMAGE,
         "--instance", f"refused-{port}", "--state-dir", str(tmp_path / "b"), "--pool-size", "0",
         "--user-header", "X-Forwarded-User", "--trusted-proxy", "127.0.0.1/32",
         "--trusted-proxy", str(wider)], capture_output=True, text=True, timeout=120)
    text = log.read_text()
    assert (f"--trusted-proxy {wider} holds addresses of the sessions' network capsule"
            f" ({subnet}): any"
            " session could name any user in X-Forwarded-User" in text), text
    assert "capsule is ready" not in text
    assert done.returncode != 0, text


def test_loopback_is_not_admin_with_users(make_server, passwords, tmp_path):
    server = make_server("--auth", str(passwords), "--state-dir", str(tmp_path / "a"),
                         "--pool-size", "0", "--admin-token", ADMIN_TOKEN,
                         "--admin-user", "carol")
    status, _, body = ask(server, "/api/admin/sessions")
    assert status == 401 and json.loads(body)["code"] == "unauthenticated"
    assert ask(server, "/api/admin/sessions", "DELETE")[0] == 401
    assert ask(server, "/api/admin/sessions",
               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})[0] == 200
    assert ask(server, "/api/admin/sessions", headers=basic("carol", PASSWORDS["carol"]))[0] \
        == 200
    assert ask(server, "/api/admin/sessions", headers=basic("bob", PASSWORDS["bob"]))[0] == 403
    # The operator may say that loopback is admin all the same.
    opted = make_server("--auth", str(passwords), "--state-dir", str(tmp_path / "b"),
                        "--pool-size", "0", "--admin-loopback")
    assert ask(opted, "/api/admin/sessions")[0] == 200
    # Through a proxy on this machine (any forwarding header) it is not loopback,
    # for the admin API and /metrics alike.
    for name in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        assert ask(opted, "/api/admin/sessions", headers={name: "203.0.113.9"})[0] == 403, name
        assert ask(opted, "/metrics", headers={name: "203.0.113.9"})[0] == 403, name
    assert ask(opted, "/metrics")[0] == 200


def test_a_password_change_ends_the_logins_of_the_old_one(make_server, passwords, tmp_path):
    server = make_server("--auth", str(passwords), "--state-dir", str(tmp_path / "state"),
                         "--pool-size", "0")
    cookies = {}
    for user in ("bob", "carol"):
        status, headers, _ = form_login(server, user, PASSWORDS[user])
        assert status == 303
        cookies[user] = {"Cookie": re.match(r"capsule_session=([^;]*)",
                                            headers["Set-Cookie"]).group(0)}
        assert ask(server, "/api/sessions", headers=cookies[user])[0] == 200
    # bob's password changes (as htpasswd -B FILE bob does it).
    text = passwords.read_text()
    bob_line = next(line for line in text.splitlines(True) if line.startswith("bob:"))
    passwords.write_text(text.replace(bob_line, htpasswd_line("bob", "a new password")))
    status, _, body = ask(server, "/api/sessions", headers=cookies["bob"])
    assert status == 401 and json.loads(body)["code"] == "unauthenticated"
    assert ask(server, "/api/sessions", headers=cookies["carol"])[0] == 200
    wait_for(lambda: "ended a login of bob: the password it was made with changed in"
             in server.log(), 10, "the log line")
    # The new password logs in again.
    assert form_login(server, "bob", "a new password")[0] == 303
