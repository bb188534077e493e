"""
`capsule-admin user add` for real: the console script writes the --auth file
of a live capsule, the user it added logs in (the form and Basic), and a
password changed or a user removed while capsule runs takes effect at once.
"""

import base64
import json
import subprocess
import sys
from pathlib import Path

from tests.support.httpclient import request

from .test_security_auth import cookie_of, login

ADMIN = str(Path(sys.executable).with_name("capsule-admin"))


def admin(*argv: str, password: str | None = None) -> str:
    done = subprocess.run([ADMIN, "user", *argv], input=password, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a_user_added_by_capsule_admin_logs_in_to_a_live_capsule(make_server, tmp_path):
    passwords = tmp_path / "htpasswd"
    said = admin("add", "alice", "--htpasswd", str(passwords), "--password-stdin",
                 password="correct horse\n")
    assert said.startswith(f"added alice to {passwords}")
    server = make_server("--auth", str(passwords), "--pool-size", "0")

    status, headers, _ = login(server.url, "alice", "correct horse")
    assert status == 303
    cookie = {"Cookie": f"capsule_session={cookie_of(headers)}"}
    status, _, body = request(server.url + "/api/sessions", headers=cookie)
    assert (status, json.loads(body)["user"]) == (200, "alice")
    assert request(server.url + "/api/sessions",
                   headers=basic("alice", "correct horse"))[0] == 200
    assert request(server.url + "/api/sessions", headers=basic("alice", "wrong"))[0] == 401

    # Another user, and a new password for alice, while capsule runs.
    admin("add", "bob", "--htpasswd", str(passwords), "--password-stdin", password="b0b\n")
    assert admin("add", "alice", "--htpasswd", str(passwords), "--password-stdin",
                 password="battery staple\n").startswith("changed the password of alice")
    assert request(server.url + "/api/sessions", headers=basic("bob", "b0b"))[0] == 200
    assert request(server.url + "/api/sessions",
                   headers=basic("alice", "battery staple"))[0] == 200
    # The login made with the old password ends with it.
    assert request(server.url + "/api/sessions", headers=cookie)[0] == 401

    admin("remove", "bob", "--htpasswd", str(passwords))
    assert request(server.url + "/api/sessions", headers=basic("bob", "b0b"))[0] == 401
    assert request(server.url + "/api/sessions",
                   headers=basic("alice", "battery staple"))[0] == 200
