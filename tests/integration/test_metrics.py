"""
/metrics of a real twistd capsule, after a session on the real engine.
"""

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.threads import deferToThread

from tests.support.httpclient import request

from .harness import WSClient, eventually

TOKEN = "metrics-" + "t" * 32


def _get(url: str, headers: dict) -> tuple[int, bytes]:
    response = request(url, headers=headers)
    return response.status, response.body


async def scrape(server, **headers) -> tuple[int, bytes]:
    return await deferToThread(_get, server.url + "/metrics", headers)


def samples(body: bytes) -> dict:
    found = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, frozenset(labels.items())))


@pytest_twisted.ensureDeferred
async def test_a_session_is_counted(make_server):
    server = make_server("--pool-size", "0", "--metrics-token", TOKEN)
    status, body = await scrape(server)
    assert status == 200
    before = samples(body)
    assert value(before, "capsule_sessions_started_total", how="cold") == 0
    assert value(before, "capsule_sessions_live") == 0

    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    _, body = await scrape(server)
    assert value(samples(body), "capsule_sessions_live") == 1
    assert (await client.run("echo $((6*7))")).strip() == "42"
    await client.exit()

    def closed_counted():
        _, body = _get(server.url + "/metrics", {})
        return value(samples(body), "capsule_websocket_closes_total", code="1000") == 1
    await eventually(closed_counted, what="the close counted")
    status, body = await scrape(server)
    after = samples(body)
    assert value(after, "capsule_sessions_started_total", how="cold") == 1
    assert value(after, "capsule_sessions_started_total", how="warm") == 0
    assert value(after, "capsule_session_start_seconds_count", how="cold") == 1
    assert value(after, "capsule_sessions_ended_total", reason="exited") == 1
    assert value(after, "capsule_sessions_ended_total", reason="other") == 0
    assert value(after, "capsule_sessions_live") == 0
    assert value(after, "capsule_pool_misses_total") == 0
    assert value(after, "capsule_reconnects_total") == 0
    # The resize, the command and "exit": at least what was typed came in.
    assert value(after, "capsule_websocket_received_bytes_total") >= len("echo $((6*7))\r")
    assert value(after, "capsule_websocket_sent_bytes_total") > 0
    assert value(after, "capsule_docker_call_seconds_count",
                 call="create_session_container") == 1
    assert value(after, "capsule_docker_call_failures_total",
                 call="create_session_container") is None
    assert session_id.encode() not in body
    assert server.unhandled_errors() == []


@pytest_twisted.ensureDeferred
async def test_a_proxied_request_needs_the_token(make_server):
    server = make_server("--pool-size", "0", "--metrics-token", TOKEN)
    status, body = await scrape(server, **{"X-Forwarded-For": "192.0.2.7"})
    assert status == 403 and b"capsule_" not in body
    status, body = await scrape(server, **{"X-Forwarded-For": "192.0.2.7",
                                           "Authorization": "Bearer wrong"})
    assert status == 403
    status, body = await scrape(server, **{"X-Forwarded-For": "192.0.2.7",
                                           "Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and b"capsule_sessions_live" in body


@pytest_twisted.ensureDeferred
async def test_reconnect_export_and_refusal_are_counted(make_server):
    server = make_server("--pool-size", "0", "--max-sessions-per-client", "1")
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start()
    assert (await client.run("echo $((6*7))")).strip() == "42"

    second = await WSClient.connect(server.ws_url)
    second.send({"type": "resize", "cols": 80, "rows": 24})
    assert (await second.next("error"))["code"] == "quota_exceeded"
    assert (await second.closed)[0] == 4429

    status, _, _ = await deferToThread(server.get, f"/api/export/{session_id}")
    assert status == 200

    await client.close()
    await eventually(lambda: f"client left session {session_id[:8]}" in server.log(),
                     what="capsule to log that the client left")
    # From offset 0 (the binary protocol's acks), all the output comes again.
    again = await WSClient.connect(server.ws_url, session_id, binary=True, offset=0)
    connected = await again.next("connected")
    assert connected["resumed"] is True and connected["replay"] > 0
    await again.exit()

    def all_closed():
        _, body = _get(server.url + "/metrics", {})
        found = samples(body)
        return (value(found, "capsule_websocket_closes_total", code="1000") == 2
                and value(found, "capsule_websocket_closes_total", code="4429") == 1)
    await eventually(all_closed, what="the three closes counted")
    _, body = await scrape(server)
    found = samples(body)
    assert value(found, "capsule_reconnects_total") == 1
    assert value(found, "capsule_replayed_bytes_total") == connected["replay"]
    assert value(found, "capsule_refusals_total", code="quota_exceeded") == 1
    assert value(found, "capsule_websocket_errors_total", code="quota_exceeded") == 1
    assert value(found, "capsule_exports_started_total") == 1
    assert value(found, "capsule_exports_finished_total") == 1
    assert value(found, "capsule_exports_failed_total") == 0
    assert value(found, "capsule_sessions_started_total", how="cold") == 1
    assert value(found, "capsule_sessions_ended_total", reason="exited") == 1
    calls = {dict(labels)["call"] for name, labels in found
             if name == "capsule_docker_call_seconds_count"}
    assert {"create_session_container", "list_containers"} <= calls
