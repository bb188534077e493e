"""
The Anthropic credential gateway end to end: a real twistd capsule, the real
engine, a claude session of the agent image (CAPSULE_TEST_AGENT_IMAGE), and
a fake Messages API on loopback as the upstream (tests/support/fake_anthropic.py).

Claude Code in the session answers with the fake's text; the fake saw the
real key; the session never had it (environment, docker inspect, files,
the environment of every process); forged and ended placeholders are
refused; an answer arrives piece by piece.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import uuid

import pytest

from capsule.engine.network import FENCED_NETWORK
from tests.support.fake_anthropic import FakeAnthropic

from .harness import docker_client, free_port, session_container, wait_for
from .test_api import call

AGENT_IMAGE = os.environ.get("CAPSULE_TEST_AGENT_IMAGE")

needs_agent = pytest.mark.skipif(
    not AGENT_IMAGE and not os.environ.get("CAPSULE_REQUIRE_DOCKER"),
    reason="set CAPSULE_TEST_AGENT_IMAGE to the agent image (make image)")


# The claude profile's sessions are fenced (its egress is a list): they run
# on capsule's fenced network, and reach the door at its gateway.
CLAUDE_NETWORK = FENCED_NETWORK


def _gateway_ip(network: str = "capsule") -> str:
    return docker_client().networks.get(network).attrs["IPAM"]["Config"][0]["Gateway"]


@pytest.fixture
def gateway(make_server, tmp_path):
    key = f"sk-ant-test-{uuid.uuid4().hex}"
    text = f"Hello from the fake, {uuid.uuid4().hex[:8]}."
    fake = FakeAnthropic(text=text, key=key, pieces=3).start()
    door_port = free_port()
    server = make_server(
        "--pool-size", "0", "--agent-image", AGENT_IMAGE, "--door-port", str(door_port),
        "--anthropic-upstream", fake.url, "--state-dir", str(tmp_path / "state"),
        "--grace", "120", env={"ANTHROPIC_API_KEY": key})
    yield server, fake, key, text, door_port
    fake.stop()


def _create(server, profile="claude") -> str:
    status, body = call(server, "/api/sessions", "POST",
                        {"cols": 100, "rows": 30, "profile": profile})
    assert status == 201, body
    return body["id"]


def _sh(server, session_id, script, timeout=60, env=None):
    status, body = call(server, f"/api/sessions/{session_id}/exec", "POST",
                        {"argv": ["bash", "-c", script], "timeout": timeout, "env": env or {}})
    assert status == 200, body
    return body


def _door_request(door: str, token: str | None, body: dict, timeout=30):
    host, port = door.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    connection.request("POST", "/anthropic/v1/messages", json.dumps(body), headers)
    return connection, connection.getresponse()


@needs_agent
def test_claude_code_uses_the_gateway_and_never_holds_the_key(gateway):
    server, fake, key, text, door_port = gateway
    session_id = _create(server)
    environment = _sh(server, session_id, "env")["stdout"]
    told = dict(line.split("=", 1) for line in environment.splitlines() if "=" in line)
    door = f"http://{_gateway_ip(CLAUDE_NETWORK)}:{door_port}"
    assert told["CAPSULE_DOOR"] == door
    assert told["ANTHROPIC_BASE_URL"] == f"{door}/anthropic"
    placeholder = told["ANTHROPIC_AUTH_TOKEN"]
    assert placeholder.startswith("capsule-") and placeholder != key
    assert "ANTHROPIC_API_KEY" not in told

    # Claude Code, through the gateway, prints the fake's answer.
    answer = _sh(server, session_id, 'cd /workspace && claude -p "say hi"', timeout=120,
                 env={"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})
    assert text in answer["stdout"], answer
    messages = [r for r in fake.requests if r.path.startswith("/v1/messages")]
    assert messages, [r.path for r in fake.requests]
    for seen in fake.requests:
        # The fake saw the real key, never the placeholder.
        assert seen.headers.get("x-api-key") == key
        assert placeholder not in json.dumps(seen.headers)
        assert "authorization" not in seen.headers

    # The session never had the key: not in its container's description...
    container = docker_client().containers.get(session_container(session_id))
    assert key not in json.dumps(container.attrs)
    # ...its files, nor the environment of any of its processes.
    found = _sh(server, session_id, f"""
        grep -rIl -- '{key}' /home /workspace /tmp 2>/dev/null | head -5
        for e in /proc/[0-9]*/environ; do cat "$e" 2>/dev/null; echo; done \
            | tr '\\0' '\\n' | grep -c -- '{key}'
        for e in /proc/[0-9]*/environ; do cat "$e" 2>/dev/null; echo; done \
            | tr '\\0' '\\n' | grep -c ANTHROPIC_AUTH_TOKEN
    """, timeout=60)
    lines = found["stdout"].split()
    assert lines[:1] == ["0"], found
    assert int(lines[1]) >= 1, found  # the processes' environments were read
    # Its use is counted, by user (none here) and by session.
    status, usage = call(server, "/api/admin/usage")
    assert status == 200
    assert usage["sessions"][session_id]["requests"] >= 1
    assert usage["sessions"][session_id]["output_tokens"] >= 7
    assert usage["users"][""]["requests"] >= 1
    status, metrics = call(server, "/metrics", raw=True)
    assert b'capsule_anthropic_requests_total{user=""}' in metrics
    assert session_id.encode() not in metrics and key.encode() not in metrics
    assert key not in server.log()


@needs_agent
def test_forged_and_ended_placeholders_are_refused(gateway):
    server, fake, key, text, door_port = gateway
    session_id = _create(server)
    # From inside the session: a forged placeholder.
    forged = _sh(server, session_id, 'curl -s -w " %{http_code}" -H "Authorization: Bearer'
                 ' capsule-forged" -H "content-type: application/json" -d "{}"'
                 ' "$ANTHROPIC_BASE_URL/v1/messages"')["stdout"]
    body, _, status = forged.rpartition(" ")
    assert status == "401", forged
    assert json.loads(body)["error"]["type"] == "authentication_error"
    # The session's own placeholder works; once it ended, it does not.
    placeholder = _sh(server, session_id, "printf %s \"$ANTHROPIC_AUTH_TOKEN\"")["stdout"]
    door = f"http://{_gateway_ip(CLAUDE_NETWORK)}:{door_port}"
    connection, response = _door_request(door, placeholder, {"model": "m", "max_tokens": 5})
    assert response.status == 200 and text in json.loads(response.read())["content"][0]["text"]
    connection.close()
    assert call(server, f"/api/sessions/{session_id}", "DELETE")[0] in (200, 204)
    wait_for(lambda: call(server, f"/api/sessions/{session_id}")[0] == 404, 30,
             "the session ended")
    connection, response = _door_request(door, placeholder, {"model": "m", "max_tokens": 5})
    answer = json.loads(response.read())
    assert response.status == 401 and answer["code"] == "placeholder_refused", answer
    connection.close()
    assert len([r for r in fake.requests if r.method == "POST"]) == 1


@needs_agent
def test_an_answer_arrives_in_pieces(gateway):
    server, fake, key, text, door_port = gateway
    session_id = _create(server)
    placeholder = _sh(server, session_id, "printf %s \"$ANTHROPIC_AUTH_TOKEN\"")["stdout"]
    fake.gate = threading.Event()
    door = f"http://{_gateway_ip(CLAUDE_NETWORK)}:{door_port}"
    connection, response = _door_request(
        door, placeholder, {"model": "m", "max_tokens": 5, "stream": True})
    try:
        assert response.status == 200
        assert response.getheader("content-type").startswith("text/event-stream")
        # The fake holds the rest of its answer until the first event is
        # read here: a gateway that waited for the whole answer would time
        # this read out.
        first = b""
        while b"\n\n" not in first:
            first += response.read1(65536)
        assert b"message_start" in first and b"message_stop" not in first
        fake.gate.set()
        rest = response.read()
        assert b"message_stop" in rest and text.split()[0].encode() in rest
    finally:
        fake.gate.set()
        connection.close()


def test_a_session_found_after_a_restart_keeps_its_placeholder(make_server, tmp_path):
    key = f"sk-ant-test-{uuid.uuid4().hex}"
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[profiles.brokered]\ncredentials = ["anthropic"]\n')
    fake = FakeAnthropic(text="after the restart", key=key).start()
    door_port = free_port()
    options = ("--pool-size", "0", "--door-port", str(door_port), "--profiles", str(profiles),
               "--anthropic-upstream", fake.url, "--state-dir", str(tmp_path / "state"),
               "--grace", "120")
    try:
        first = make_server(*options, env={"ANTHROPIC_API_KEY": key})
        session_id = _create(first, "brokered")
        placeholder = _sh(first, session_id, "printf %s \"$ANTHROPIC_AUTH_TOKEN\"")["stdout"]
        first.stop()
        second = make_server(*options, instance=first.instance, env={"ANTHROPIC_API_KEY": key})
        wait_for(lambda: "found 1 session(s) of an earlier run" in second.log(), 30,
                 "the session found again")
        door = f"http://{_gateway_ip()}:{door_port}"
        connection, response = _door_request(door, placeholder, {"model": "m"})
        answer = json.loads(response.read())
        connection.close()
        assert response.status == 200, answer
        assert answer["content"][0]["text"] == "after the restart"
        assert fake.requests[-1].headers["x-api-key"] == key
    finally:
        fake.stop()
