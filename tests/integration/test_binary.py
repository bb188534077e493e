"""
The binary protocol: raw output frames, exact resume by offset, flow control.
"""

import re
import time

import pytest_twisted

from .harness import WSClient, docker_client, eventually, poll, session_container, sleep


def stalled_for(client, seconds: float):
    """
    A check for L{poll}: the offset received once it has not moved for
    C{seconds} (None before).
    """
    last = [None, 0.0]

    def check():
        now = time.monotonic()
        if client.received != last[0]:
            last[:] = [client.received, now]
            return None
        return client.received if now - last[1] >= seconds else None

    return check


@pytest_twisted.ensureDeferred
async def test_binary_round_trip(server):
    client = await WSClient.connect(server.ws_url, binary=True)
    assert client.binary
    client.send({"type": "resize", "cols": 90, "rows": 30})
    connected = await client.next("connected")
    assert connected["offset"] == 0 and connected["window"] == 1024 * 1024  # the flow-window knob
    client.send_raw("echo $((6*7))__RDY; stty size\r".encode(), binary=True)
    await client.until(r"42__RDY\r\n30 90")
    assert any(isinstance(m, bytes) for m in client.all_messages)
    assert not any(isinstance(m, dict) and m.get("type") == "output" for m in client.all_messages)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_resume_from_offset_is_exact(server):
    client = await WSClient.connect(server.ws_url, binary=True)
    session_id = await client.start()
    await client.run("true")
    client.type("for i in $(seq 1 30000); do echo line$i; done; echo DONE\r")
    await client.until(r"line2000\r\n")
    client.drop()
    await client.closed
    got_before, offset = client.output, client.received
    # Reconnect once capsule knows the client left: the loop runs on
    # meanwhile, and what it printed must come back exactly once.
    await eventually(lambda: f"client left session {session_id[:8]}" in server.log(),
                     what="capsule to log that the client left")
    again = await WSClient.connect(server.ws_url, session_id, binary=True, offset=offset)
    connected = await again.next("connected")
    assert connected["resumed"] and connected["offset"] == offset
    await again.until(r"line30000\r\nDONE")
    whole = got_before + again.output
    numbers = [int(n) for n in re.findall(rb"line(\d+)\r\n", whole)]
    assert numbers == list(range(1, 30001)), "duplicates or gaps"
    await again.close()


@pytest_twisted.ensureDeferred
async def test_output_stops_at_the_window_until_acked(make_server):
    window = 64 * 1024
    server = make_server(tuning={"flow-window": window})
    client = await WSClient.connect(server.ws_url, binary=True, auto_ack=False)
    client.send({"type": "resize", "cols": 80, "rows": 24})
    await client.next("connected")
    client.ack()
    client.send_raw(b"yes capsule | head -c 20000000; echo FLOOD-$((1+1))END\r", binary=True)
    stalled = await poll(stalled_for(client, 0.5), 20, "the output to stop at the window")
    # Nothing more comes without acks: the exec is paused.
    await sleep(1)
    assert client.received == stalled
    assert window <= stalled < window + 2 * 256 * 1024
    # Acking lets it flow to the end.
    client.auto_ack = True
    client.ack()
    await client.until("FLOOD-2END", timeout=60)
    assert client.received > 20_000_000
    await client.close()


@pytest_twisted.ensureDeferred
async def test_bad_acks_are_refused(server):
    client = await WSClient.connect(server.ws_url, binary=True)
    await client.start()
    for bad in ({"type": "ack"}, {"type": "ack", "offset": -1},
                {"type": "ack", "offset": "12"}, {"type": "ack", "offset": 10**18}):
        client.send(bad)
        assert (await client.next("error"))["code"] == "bad_ack"
    assert "developer" in await client.run("whoami")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_json_clients_cannot_ack_or_send_binary(server):
    client = await WSClient.connect(server.ws_url)
    client.send({"type": "ack", "offset": 0})
    assert (await client.next("error"))["code"] == "unknown_type"
    client.send_raw(b"ls\r", binary=True)
    assert (await client.next("error"))["code"] == "binary_frame"


@pytest_twisted.ensureDeferred
async def test_large_replays_fit_small_message_limits(make_server):
    server = make_server(tuning={"max-message-size": 4096})
    for binary in (True, False):
        client = await WSClient.connect(server.ws_url, binary=binary)
        session_id = await client.start()
        await client.run("true")
        client.type("sleep 0.5; seq 1 20000; echo END$((1+1)); touch /tmp/done-$((1+1))\r")
        await client.close()
        # The output is made while nobody is attached, and replayed whole.
        await eventually(lambda: docker_client().containers.get(session_container(session_id))
                         .exec_run(["test", "-e", "/tmp/done-2"]).exit_code == 0,
                         what="the command to finish while the client is away")
        again = await WSClient.connect(server.ws_url, session_id, binary=binary)
        await again.until(r"\r\n20000\r\nEND2")
        await again.close()
