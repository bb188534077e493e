"""
git through capsule's gateway, against real containers: a private
repository on an HTTPS git host on loopback (tests/support/git_server.py)
that wants a token, capsule holding that token (GITHUB_TOKEN in its
environment), a session of a profile naming the github credential cloning
https://github.com/owner/private.git and pushing to it, and the token
nowhere in the session.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.support.git_server import GitServer

from .harness import IMAGE, docker_client, free_port, session_container, wait_for
from .test_api import call


def _profiles(tmp_path) -> str:
    path = tmp_path / "profiles.toml"
    path.write_text(f'[profiles.git]\nimage = "{IMAGE}"\ncredentials = ["github"]\n')
    return str(path)


def _sh(server, session_id: str, script: str, timeout: int = 60) -> dict:
    status, body = call(server, f"/api/sessions/{session_id}/exec", "POST",
                        {"argv": ["sh", "-c", script], "timeout": timeout,
                         "max_output": 1024 * 1024})
    assert status == 200, body
    return body


def _open(server, profile: str) -> str:
    status, body = call(server, "/api/sessions", "POST", {"profile": profile})
    assert status == 201, body
    return body["id"]


# What a session finds of the door and its placeholder in its environment.
DOOR_OF = ("door=$(printf %s \"$GIT_CONFIG_KEY_3\" | sed 's/^http\\.//; s/\\/git\\/\\.extraHeader$//');"
           " placeholder=$(printf %s \"$GIT_CONFIG_VALUE_3\" | sed 's/^X-Capsule-Session: //');")
REFS = "/git/github.com/owner/private.git/info/refs?service=git-upload-pack"


@pytest.fixture
def git_setup(make_server, tmp_path):
    token = f"ghp_{uuid.uuid4().hex}"
    with GitServer(tmp_path, token) as host:
        host.create("owner/private")
        server = make_server(
            "--pool-size", "0", "--door-port", str(free_port()), "--profiles",
            _profiles(tmp_path), "--github-upstream", host.url, "--gateway-ca", str(host.ca),
            env={"GITHUB_TOKEN": token})
        wait_for(lambda: call(server, "/health")[0] == 200, 30, "capsule ready")
        yield server, host, token


def test_a_private_repository_clones_and_takes_a_push_with_a_token_the_session_never_has(
        git_setup):
    server, host, token = git_setup
    session_id = _open(server, "git")
    out = _sh(server, session_id, """
set -e
cd /workspace
git clone -q https://github.com/owner/private.git
cd private
cat README.md
head -c 3000000 /dev/urandom > big.bin
git add big.bin
git -c user.name=dev -c user.email=dev@example.invalid commit -q -m 'from the session'
git push -q origin main 2>&1
echo pushed
cat .git/config
""", timeout=90)
    assert out["exit_code"] == 0, out
    assert "a private repository" in out["stdout"]
    assert "pushed" in out["stdout"]
    # The clone's configuration keeps GitHub's URL: nothing of the door or the placeholder.
    assert "url = https://github.com/owner/private.git" in out["stdout"]
    config = out["stdout"].split("pushed", 1)[1]
    assert "/git/" not in config and "X-Capsule" not in config
    # It arrived, and the host saw the real token (and no placeholder).
    assert host.log_of("owner/private") == ["from the session", "first"]
    assert host.seen and all(auth == host.authorization and placeholder is None
                             for _, _, auth, placeholder in host.seen)
    assert {method for method, *_ in host.seen} == {"GET", "POST"}
    assert any(path.endswith("/git-receive-pack") for _, path, *_ in host.seen)
    # The pack, larger than git's post buffer, went chunked, through the gateway as it came.
    assert host.pushed_chunked

    # The token is nowhere in the session: its environment, every process's,
    # its files, its container's inspection.
    found = _sh(server, session_id, f"""
env | grep -c -F '{token}';
cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c -F '{token}';
grep -r -l -F '{token}' /home /workspace /tmp /etc /root 2>/dev/null | wc -l;
env | grep -c '^GIT_CONFIG_'
""")
    counts = found["stdout"].split()
    assert counts[:3] == ["0", "0", "0"], found
    assert int(counts[3]) >= 5
    inspected = docker_client().api.inspect_container(session_container(session_id))
    assert token not in json.dumps(inspected)
    assert "GIT_CONFIG_COUNT=4" in inspected["Config"]["Env"]
    log = server.log()
    assert token not in log
    assert "git gateway: git-receive-pack of owner/private.git for session" in log
    assert server.unhandled_errors() == []


def test_a_forged_or_ended_placeholder_and_other_paths_are_refused(git_setup):
    server, host, token = git_setup
    first = _open(server, "git")
    placeholder = _sh(server, first, DOOR_OF + ' printf %s "$placeholder"')["stdout"]
    assert len(placeholder) >= 32
    second = _open(server, "git")
    # A forged placeholder: git prints the gateway's sentence and stops (no password prompt).
    forged = _sh(server, second, """
GIT_TERMINAL_PROMPT=0 GIT_CONFIG_VALUE_3='X-Capsule-Session: forged' \
  git ls-remote https://github.com/owner/private.git 2>&1; echo "exit $?"
""")
    assert "remote: capsule: this session's git gateway placeholder is not known" \
        in forged["stdout"], forged
    assert "exit 128" in forged["stdout"]
    assert "Username" not in forged["stdout"]
    # Its own works.
    own = _sh(server, second, "git ls-remote https://github.com/owner/private.git")
    assert own["exit_code"] == 0 and "refs/heads/main" in own["stdout"], own
    # Paths other than git's smart HTTP, with a good placeholder: refused.
    for path in ("/git/github.com/owner/private.git/HEAD",
                 "/git/github.com/owner/private.git/objects/info/packs",
                 "/git/api.github.com/user",
                 "/git/github.com/owner/private.git/info/refs"):
        refused = _sh(server, second, DOOR_OF + f"""
curl -s -o /dev/null -w '%{{http_code}}' -H "X-Capsule-Session: $placeholder" "$door{path}"
""")
        assert refused["stdout"] == "404", (path, refused)
    # The first session ends: its placeholder is refused from the second.
    status, _ = call(server, f"/api/sessions/{first}", "DELETE")
    assert status in (200, 202, 204)
    wait_for(lambda: call(server, f"/api/sessions/{first}")[0] == 404, 30, "the session ended")
    ended = _sh(server, second, DOOR_OF + f"""
curl -s -w ' %{{http_code}}' -H "X-Capsule-Session: {placeholder}" "$door{REFS}"
""")
    assert ended["stdout"].endswith(" 403"), ended
    assert "forged, or its session ended" in ended["stdout"]
    # Nothing but git's smart HTTP ever reached the host.
    assert all(path.startswith(("/owner/private.git/info/refs", "/owner/private.git/git-"))
               for _, path, *_ in host.seen)
    assert "git gateway refused GET /git/github.com/owner/private.git/HEAD" in server.log()
    assert server.unhandled_errors() == []


def test_a_large_push_and_its_clone_pass_through_without_being_held(git_setup):
    # 64 MB of incompressible data pushed through the gateway, then cloned
    # back: capsule's memory grows by far less than that (the pack is never
    # held whole, in either direction).
    server, host, token = git_setup
    session_id = _open(server, "git")
    before = server.rss_kib()
    out = _sh(server, session_id, """
set -e
cd /workspace
git clone -q https://github.com/owner/private.git
cd private
head -c 64000000 /dev/urandom > large.bin
git add large.bin
git -c user.name=dev -c user.email=dev@example.invalid commit -q -m large
start=$(date +%s%N)
git push -q origin main 2>&1
pushed=$(date +%s%N)
cd /workspace && rm -rf private
git clone -q https://github.com/owner/private.git again
cloned=$(date +%s%N)
cmp -s again/large.bin /dev/null || true
echo "push_ms=$(( (pushed - start) / 1000000 )) clone_ms=$(( (cloned - pushed) / 1000000 ))"
stat -c %s again/large.bin
""", timeout=300)
    assert out["exit_code"] == 0, out
    assert out["stdout"].split()[-1] == "64000000"
    print(" ".join(out["stdout"].split()[-3:-1]))
    assert host.log_of("owner/private") == ["large", "first"]
    grown = server.rss_kib() - before
    print(f"capsule's RSS grew by {grown} KiB")
    assert grown < 32 * 1024, f"capsule grew by {grown} KiB for a 64 MB push and clone"


def test_a_session_found_after_a_restart_still_clones(make_server, tmp_path):
    # The placeholder is the credential gateway's, derived from the key kept
    # in the state directory: capsule knows it again after a restart.
    token = f"ghp_{uuid.uuid4().hex}"
    with GitServer(tmp_path, token) as host:
        host.create("owner/private")
        options = ("--pool-size", "0", "--door-port", str(free_port()), "--profiles",
                   _profiles(tmp_path), "--github-upstream", host.url, "--gateway-ca",
                   str(host.ca), "--state-dir", str(tmp_path / "state"), "--grace", "120")
        first = make_server(*options, env={"GITHUB_TOKEN": token})
        session_id = _open(first, "git")
        first.stop()
        second = make_server(*options, instance=first.instance, env={"GITHUB_TOKEN": token})
        wait_for(lambda: "found 1 session(s) of an earlier run" in second.log(), 30,
                 "the session found again")
        out = _sh(second, session_id, "cd /workspace && git clone -q"
                  " https://github.com/owner/private.git && cat private/README.md", timeout=90)
        assert out["exit_code"] == 0, out
        assert "a private repository" in out["stdout"]
