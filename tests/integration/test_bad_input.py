"""
Bad input gets a clear error frame; the connection stays usable where that
makes sense, and nothing else breaks.
"""

import json
import time

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from .harness import WSClient, docker_client, eventually, instance_containers, sleep


async def assert_still_usable(client):
    client.send({"type": "ping"})
    assert await client.next("pong") == {"type": "pong"}


BAD_FRAMES = [
    (b'{"type": "input", "data": ', "malformed_json", "malformed JSON"),
    (b"[" * 100000, "malformed_json", "malformed JSON"),
    (b'"just a string"', "bad_message", "JSON object"),
    (b'{"data": "x"}', "bad_message", '"type"'),
    (b'{"type": "reboot"}', "unknown_type", "reboot"),
    (b'{"type": "resize", "cols": 0, "rows": 24}', "bad_resize", "from 1 to 1000"),
    (b'{"type": "resize", "cols": -5, "rows": 24}', "bad_resize", "from 1 to 1000"),
    (b'{"type": "resize", "cols": 80.5, "rows": 24}', "bad_resize", "integer"),
    (b'{"type": "resize", "cols": 99999999999, "rows": 24}', "bad_resize", "from 1 to 1000"),
    (b'{"type": "resize", "cols": "80", "rows": 24}', "bad_resize", "integer"),
    (b'{"type": "resize", "cols": 80}', "bad_resize", '"rows"'),
    (b'{"type": "input", "data": 42}', "bad_input", "string"),
    (b'{"type": "input", "data": "\\ud800"}', "bad_input", "surrogate"),
]


@pytest_twisted.ensureDeferred
async def test_bad_frames_get_errors_and_the_connection_stays_usable(server):
    client = await WSClient.connect(server.ws_url)
    for payload, code, words in BAD_FRAMES:
        client.send_raw(payload)
        error = await client.next("error")
        assert error["code"] == code, (payload[:60], error)
        assert words in error["message"], (payload[:60], error)
    client.send_raw(b"\x00\x01binary", binary=True)
    assert (await client.next("error"))["code"] == "binary_frame"
    # Input before the first resize.
    client.type("ls\r")
    error = await client.next("error")
    assert error["code"] == "not_started" and "resize" in error["message"]
    await assert_still_usable(client)
    # And the session still starts and works after all that.
    await client.start()
    client.send_raw(b"{nope")
    assert (await client.next("error"))["code"] == "malformed_json"
    assert "developer" in await client.run("whoami")
    await client.close()
    assert server.unhandled_errors() == []


@pytest.mark.parametrize("session_id, close_code, code", [
    ("not-a-uuid", 4400, "invalid_session_id"),
    ("..%2F..%2Fetc", 4400, "invalid_session_id"),
    ("00000000-0000-4000-8000-000000000000", 4404, "session_not_found"),
])
@pytest_twisted.ensureDeferred
async def test_bad_session_ids_are_refused(server, session_id, close_code, code):
    client = await WSClient.connect(server.ws_url, session_id)
    error = await client.next("error")
    assert error["code"] == code
    assert (await client.closed)[0] == close_code


@pytest_twisted.ensureDeferred
async def test_oversized_message_closes_with_1009(make_server):
    server = make_server(tuning={"max-message-size": 1024})
    client = await WSClient.connect(server.ws_url)
    client.type("x" * 5000)
    code, _ = await client.closed
    assert code == 1009
    # Others are unaffected.
    other = await WSClient.connect(server.ws_url)
    await other.start()
    assert "developer" in await other.run("whoami")
    await other.close()


@pytest_twisted.ensureDeferred
async def test_foreign_origin_is_refused(server):
    with pytest.raises(ConnectionError):
        await WSClient.connect(server.ws_url, origin="https://evil.example")
    same = await WSClient.connect(server.ws_url, origin=server.url)
    await assert_still_usable(same)
    await same.close()


@pytest.mark.parametrize("path, code", [
    ("/api/export/00000000-0000-4000-8000-000000000000", "session_not_found"),
    ("/api/export/not-a-uuid", "invalid_session_id"),
    ("/api/export/..%2F..%2Fetc%2Fpasswd", "invalid_session_id"),
])
@pytest_twisted.ensureDeferred
async def test_export_of_unknown_ids_is_a_json_404(server, path, code):
    status, headers, body = await deferToThread(server.get, path)
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["code"] == code


@pytest_twisted.ensureDeferred
async def test_docker_unreachable(make_server, tmp_path):
    server = make_server(env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    client = await WSClient.connect(server.ws_url)
    client.send({"type": "resize", "cols": 80, "rows": 24})
    error = await client.next("error")
    assert error["code"] == "docker_unavailable"
    assert "cannot reach the Docker engine" in error["message"]
    assert "dockerd" in error["message"]
    assert (await client.closed)[0] == 4503
    status, _, body = await deferToThread(server.get, "/health")
    assert status == 503
    assert json.loads(body)["docker"] is False
    status, _, _ = await deferToThread(server.get, "/")
    assert status == 200
    assert server.process.poll() is None


@pytest_twisted.ensureDeferred
async def test_image_missing(make_server):
    server = make_server("--image", "capsule-no-such-image:missing")
    client = await WSClient.connect(server.ws_url)
    client.send({"type": "resize", "cols": 80, "rows": 24})
    error = await client.next("error")
    assert error["code"] == "image_missing"
    assert "capsule-no-such-image:missing" in error["message"]
    assert "make image" in error["message"]
    assert (await client.closed)[0] == 4503
    status, _, body = await deferToThread(server.get, "/health")
    assert status == 200 and json.loads(body)["status"] == "degraded"
    assert instance_containers(server.instance) == []


@pytest_twisted.ensureDeferred
async def test_client_leaving_while_starting_leaks_nothing(make_server):
    # No warm pool: the container is made after the client asked, and the
    # client is gone before it is ready.
    server = make_server("--pool-size", "0")
    since = int(time.time()) - 1
    for delay in (0.02, 0.05, 0.1):
        client = await WSClient.connect(server.ws_url)
        client.send({"type": "resize", "cols": 80, "rows": 24})
        # Let the frame leave (an abort discards unsent data), then vanish
        # while the container is still being made.
        await sleep(delay)
        assert [m for m in client.all_messages if m.get("type") == "connected"] == []
        client.drop()

    def created_and_removed() -> tuple[set, set]:
        events = docker_client().api.events(
            since=since, until=int(time.time()) + 1, decode=True,
            filters={"type": "container", "label": f"io.capsule.instance={server.instance}"})
        ids = {"create": set(), "destroy": set()}
        for event in events:
            if event.get("Action") in ids:
                ids[event["Action"]].add(event["id"])
        return ids["create"], ids["destroy"]

    def all_removed() -> bool:
        created, removed = created_and_removed()
        return len(created) == 3 and removed == created and not instance_containers(
            server.instance)

    # Each session's container was made, then removed: none is left.
    await eventually(all_removed, what="the three containers to be made and removed")
