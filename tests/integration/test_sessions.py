"""
End to end: a real twistd capsule, the real Docker engine, real WebSocket.
"""

import gzip
import io
import json
import tarfile

import docker
import pytest_twisted
from twisted.internet.threads import deferToThread

from .harness import (WSClient, docker_client, eventually, instance_containers,
                      session_container, sleep)


def container_of(session_id):
    try:
        return docker_client().containers.get(session_container(session_id))
    except docker.errors.NotFound:
        return None


@pytest_twisted.ensureDeferred
async def test_shell_round_trip(server):
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    client.type("echo $((6*7))__RDY\r")
    await client.until("42__RDY")
    out = await client.run("whoami; pwd; echo $TERM; locale charmap")
    assert out.split() == ["developer", "/workspace", "xterm-256color", "UTF-8"]
    container = container_of(session_id)
    host = container.attrs["HostConfig"]
    assert host["Memory"] == 512 * 1024 * 1024
    assert host["NanoCpus"] == 1_000_000_000
    assert host["PidsLimit"] == 256
    assert container.labels["io.capsule.session"] == session_id
    assert container.labels["io.capsule.instance"] == server.instance
    await client.close()


@pytest_twisted.ensureDeferred
async def test_resize_reaches_the_shell(server):
    client = await WSClient.connect(server.ws_url)
    await client.start(100, 30)
    assert (await client.run("stty size")).strip() == "30 100"
    client.send({"type": "resize", "cols": 132, "rows": 43})
    await sleep(0.3)
    assert (await client.run("stty size")).strip() == "43 132"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_unicode_output_arrives_intact(server):
    client = await WSClient.connect(server.ws_url)
    await client.start()
    # Several thousand multi-byte characters: chunk boundaries fall inside
    # characters, and the raw bytes must still join up exactly.
    out = await client.run("python3 -c 'print(\"é€😀\" * 3000)' 2>/dev/null || "
                           "printf 'é€😀%.0s' $(seq 3000); echo")
    assert out.strip() == "é€😀" * 3000
    await client.close()


@pytest_twisted.ensureDeferred
async def test_reconnect_keeps_shell_state(server):
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    await client.run("export CAPSULE_T=kept; cd /tmp; sleep 300 & true")
    client.drop()  # a network drop: no close handshake
    await client.closed
    again = await WSClient.connect(server.ws_url, session_id)
    connected = await again.next("connected")
    replay = connected.pop("replay")
    assert connected.pop("grace") > 0
    # Kept past the grace period (the default retention), and said so.
    assert connected.pop("on_close")["outcome"] == "kept"
    assert connected == {"type": "connected", "session_id": session_id, "resumed": True,
                         "kept": True, "profile": "shell"}
    again.send({"type": "resize", "cols": 80, "rows": 24})
    out = await again.run("echo $CAPSULE_T $PWD; jobs")
    # What the dropped connection had not been sent (the prompt that followed
    # the command, when the drop came first) is replayed, and only that.
    if replay:
        assert again.output[:replay].rstrip().endswith(b"$"), again.output[:replay]
    assert b"echo $CAPSULE_T" not in again.output[:replay]
    assert "kept /tmp" in out
    assert "sleep 300" in out
    await again.close()


@pytest_twisted.ensureDeferred
async def test_output_while_away_is_replayed(server):
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    client.type("sleep 1; echo made-while-away\r")
    await client.close()
    await sleep(2)
    again = await WSClient.connect(server.ws_url, session_id)
    await again.until("made-while-away")
    await again.close()


@pytest_twisted.ensureDeferred
async def test_second_tab_takes_over(server):
    first = await WSClient.connect(server.ws_url)
    session_id = await first.start()
    second = await WSClient.connect(server.ws_url, session_id)
    await second.next("connected")
    error = await first.next("error")
    assert error["code"] == "taken_over"
    code, _ = await first.closed
    assert code == 4409
    assert "developer" in await second.run("whoami")
    await second.close()


@pytest_twisted.ensureDeferred
async def test_export_contains_files_made_in_the_session(server):
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    await client.run("mkdir -p sub && echo 'hello export' > sub/hello.txt")
    status, headers, body = await deferToThread(server.get, f"/api/export/{session_id}")
    assert status == 200
    assert headers["Content-Type"] == "application/gzip"
    assert f'filename="capsule-{session_id[:8]}-workspace-' in headers["Content-Disposition"]
    assert headers["Content-Disposition"].endswith('.tar.gz"')
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(body))) as tar:
        member = tar.extractfile("workspace/sub/hello.txt")
        assert member.read() == b"hello export\n"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_exit_ends_the_session_and_removes_its_container(server):
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert container_of(session_id) is not None
    client.type("exit 3\r")
    assert await client.next("exit") == {
        "type": "exit", "exit_code": 3, "message": "the shell exited with code 3"}
    code, _ = await client.closed
    assert code == 1000
    await eventually(lambda: container_of(session_id) is None)
    again = await WSClient.connect(server.ws_url, session_id)
    assert (await again.next("error"))["code"] == "session_not_found"
    assert (await again.closed)[0] == 4404


@pytest_twisted.ensureDeferred
async def test_expiry_removes_the_container(make_server):
    # (Where sessions are kept, they are put away instead: tests/integration/test_keep.py.)
    server = make_server("--grace", "1", "--retention", "0", tuning={"cleanup-interval": 0.2})
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    await client.close()
    await eventually(lambda: container_of(session_id) is None, timeout=15)
    assert "expired" in server.log()
    again = await WSClient.connect(server.ws_url, session_id)
    error = await again.next("error")
    assert error["code"] == "session_not_found"
    assert "does not exist" in error["message"]


@pytest_twisted.ensureDeferred
async def test_health(server):
    status, headers, body = await deferToThread(server.get, "/health")
    health = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert health["status"] == "ok"
    assert health["docker"] is True and health["image"] is True
    assert health["sessions"] == 0
    assert health["version"]
    client = await WSClient.connect(server.ws_url)
    await client.start()
    _, _, body = await deferToThread(server.get, "/health")
    assert json.loads(body)["sessions"] == 1
    await client.close()


@pytest_twisted.ensureDeferred
async def test_page_is_served(server):
    status, headers, body = await deferToThread(server.get, "/")
    assert status == 200 and b"<html" in body.lower()
    assert headers["Content-Type"].startswith("text/html")
