"""
Kept sessions on the real engine with a real capsule (docs/keeping.md): a
session whose grace period ends is put away (its container stopped, its
files kept), is still there after a restart of capsule, and resumes under
the same id with its files and a new shell; past its retention it goes with
its volumes; a fork of a running session has its files and is independent.
"""

from __future__ import annotations

import re
import signal

import docker
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.support.live import remove_instance_images

from .harness import WSClient, docker_client, eventually, remove_instance_containers
from .test_api import call, create, sh

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _container(session_id: str, instance: str) -> dict | None:
    found = docker_client().api.containers(all=True, filters={"label": [
        f"io.capsule.instance={instance}", f"io.capsule.session={session_id}"]})
    if not found:
        return None
    try:
        return docker_client().api.inspect_container(found[0]["Id"])
    except docker.errors.NotFound:      # removed between the two calls
        return None


def _volumes(container: dict) -> set[str]:
    return {m["Name"] for m in container["Mounts"] if m.get("Type") == "volume"
            and "agent" not in m["Name"]}


def _volume_exists(name: str) -> bool:
    try:
        docker_client().api.inspect_volume(name)
        return True
    except docker.errors.NotFound:
        return False


@pytest.fixture
def cleanup():
    """
    Stop the servers given, remove their containers, then their snapshot
    images (an image a container uses cannot be removed).
    """
    servers = []
    yield servers.append
    for server in servers:
        server.stop()
        remove_instance_containers(server.instance)
        remove_instance_images(server.instance)


@pytest_twisted.ensureDeferred
async def test_a_session_kept_at_the_end_of_its_grace_outlives_a_restart_and_resumes(
        make_server, tmp_path, cleanup):
    state = str(tmp_path / "state")
    first = make_server("--grace", "1", "--pool-size", "0", "--state-dir", state,
                        tuning={"cleanup-interval": 0.2})
    cleanup(first)
    client = await WSClient.connect(first.ws_url, binary=True)
    session_id = await client.start()
    out = await client.run("mkdir -p /workspace/proj; echo hello-$((6*7)) >"
                           " /workspace/proj/notes.txt; echo printed-$((1+1))")
    assert "printed-2" in out
    container_id = _container(session_id, first.instance)["Id"]
    await client.close()
    # Put away: stopped (its memory and CPU free: the engine runs nothing of
    # it), not removed.
    await eventually(lambda: not _container(session_id, first.instance)["State"]["Running"],
                     timeout=30)
    state_now = _container(session_id, first.instance)["State"]
    assert state_now["Pid"] == 0 and state_now["Status"] == "exited"
    await eventually(lambda: "put away" in first.log())
    status, listing = await deferToThread(call, first, "/api/sessions")
    [kept] = listing["sessions"]
    assert (kept["id"], kept["state"], kept["reason"]) == (session_id, "kept", "grace")

    await deferToThread(first.stop, sig=signal.SIGTERM)
    second = make_server("--grace", "30", "--pool-size", "0", "--state-dir", state,
                         instance=first.instance, tuning={"cleanup-interval": 0.2})
    cleanup(second)
    await eventually(lambda: "found 1 kept session(s)" in second.log())
    status, listing = await deferToThread(call, second, "/api/sessions")
    assert [(s["id"], s["state"], s["reason"]) for s in listing["sessions"]] == [
        (session_id, "kept", "grace")]
    assert listing["sessions"][0]["kept_at"] == kept["kept_at"]

    again = await WSClient.connect(second.ws_url, f"{session_id}&resume=1", binary=True)
    connected = await again.next("connected", timeout=60)
    assert connected["session_id"] == session_id
    assert connected["resumed_from"] == kept["kept_at"]
    out = await again.run("cat /workspace/proj/notes.txt; echo new-$((2+3))")
    assert "hello-42" in out and "new-5" in out
    assert _container(session_id, first.instance)["Id"] == container_id
    await again.close()
    log = first.log() + second.log()
    assert UUID.findall(log) == [], [line for line in log.splitlines() if UUID.search(line)]


@pytest_twisted.ensureDeferred
async def test_a_kept_session_past_its_retention_goes_with_its_volumes(make_server, cleanup):
    server = make_server("--grace", "30", "--pool-size", "0", "--read-only-root",
                         "--retention", "3", tuning={"cleanup-interval": 0.2})
    cleanup(server)
    session_id = (await deferToThread(create, server))["id"]
    await deferToThread(sh, server, session_id, "echo x > /workspace/x")
    container = _container(session_id, server.instance)
    volumes = _volumes(container)
    assert volumes, container["Mounts"]
    status, body = await deferToThread(call, server, f"/api/sessions/{session_id}/put-away",
                                       "POST")
    assert status == 200, body
    # Stopped, kept, then (3 s on, maybe already: a loaded machine) removed.
    assert body["state"] == "kept"
    stopped = _container(session_id, server.instance)
    assert stopped is None or not stopped["State"]["Running"]
    await eventually(lambda: _container(session_id, server.instance) is None, timeout=30)
    assert not any(_volume_exists(name) for name in volumes)
    assert "its retention" in server.log()
    assert (await deferToThread(call, server, "/api/sessions"))[1]["sessions"] == []


@pytest_twisted.ensureDeferred
async def test_a_fork_of_a_running_session_has_its_files_and_is_its_own(make_server, cleanup):
    server = make_server("--grace", "30", "--pool-size", "0", "--read-only-root")
    cleanup(server)
    source = (await deferToThread(create, server))["id"]
    await deferToThread(sh, server, source, "echo one > /workspace/f; echo home > ~/h")
    status, fork = await deferToThread(call, server, f"/api/sessions/{source}/fork", "POST")
    assert status == 201, fork
    assert fork["id"] != source
    out = (await deferToThread(sh, server, fork["id"], "cat /workspace/f ~/h"))["stdout"]
    assert out == "one\nhome\n"
    # Root beside a local overlay2 engine: the engine copied the files.
    assert "on the host in" in server.log()
    await deferToThread(sh, server, fork["id"], "echo two > /workspace/f")
    await deferToThread(sh, server, source, "echo three > ~/h")
    assert (await deferToThread(sh, server, source, "cat /workspace/f"))["stdout"] == "one\n"
    assert (await deferToThread(sh, server, fork["id"], "cat ~/h"))["stdout"] == "home\n"
    # Its copies of the volumes are its own: they go with it.
    copies = _volumes(_container(fork["id"], server.instance))
    assert copies and not copies & _volumes(_container(source, server.instance))
    status, _ = await deferToThread(call, server, f"/api/sessions/{fork['id']}", "DELETE")
    assert status in (200, 204)
    await eventually(lambda: not any(_volume_exists(name) for name in copies), timeout=30)
    assert _container(source, server.instance)["State"]["Running"]


@pytest_twisted.ensureDeferred
async def test_a_kept_sessions_owner_is_known_after_a_restart(make_server, tmp_path, cleanup):
    """
    With users, a session put away at the end of its grace period is its
    owner's after a restart of capsule, and nobody else's.
    """
    from .test_api import ALICE, BOB
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    state = str(tmp_path / "state")
    options = ("--tokens", str(tokens), "--state-dir", state, "--pool-size", "0")
    first = make_server("--grace", "1", *options, tuning={"cleanup-interval": 0.2})
    cleanup(first)
    session_id = (await deferToThread(create, first, ALICE))["id"]
    await deferToThread(sh, first, session_id, "echo mine > /workspace/m", token=ALICE)
    await eventually(lambda: "put away" in first.log(), timeout=30)
    await deferToThread(first.stop)
    second = make_server("--grace", "30", *options, instance=first.instance)
    cleanup(second)
    await eventually(lambda: "found 1 kept session(s)" in second.log())
    status, mine = await deferToThread(call, second, "/api/sessions", token=ALICE)
    assert [(s["id"], s["state"]) for s in mine["sessions"]] == [(session_id, "kept")]
    status, theirs = await deferToThread(call, second, "/api/sessions", token=BOB)
    assert theirs["sessions"] == []
    status, body = await deferToThread(call, second, f"/api/sessions/{session_id}/resume",
                                       "POST", token=BOB)
    assert (status, body["code"]) == (404, "session_not_found")
    status, body = await deferToThread(call, second, f"/api/sessions/{session_id}/resume",
                                       "POST", token=ALICE)
    assert status == 200, body
    out = await deferToThread(sh, second, session_id, "cat /workspace/m", token=ALICE)
    assert out["stdout"] == "mine\n"
