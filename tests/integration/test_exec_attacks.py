"""
The exec door under attack, against a real capsule and engine: answers of
output as costly to encode as bytes can be, asked by clients that read
nothing, hold bounded memory, are capped per user and are dropped once
their client stalls; an exec past its timeout leaves nothing it started,
even what it started in a session of its own (C{setsid}).
"""

from __future__ import annotations

import base64
import json
import random
import re

from tests.support.exec_flood import (MIB, flood_request, peak_rss_kib, read_all,
                                      read_status, stalled_exec)

from .harness import wait_for
from .test_api import ALICE, BOB, call, create, sh

# Seconds an answer may wait for a client that reads none of it.
WRITE_TIMEOUT = 40


def exited(server) -> int:
    return len(re.findall(r"'sh' exited 0 in", server.log()))


def test_answers_clients_do_not_read_hold_bounded_memory_and_are_dropped(make_server,
                                                                          tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    server = make_server("--grace", "120", "--tokens", str(tokens), "--state-dir",
                         str(tmp_path / "state"),
                         tuning={"answer-write-timeout": WRITE_TIMEOUT})
    session_id = create(server, ALICE)["id"]
    # Three commands of alice's, each printing 16 MiB of 0xff and 16 MiB of
    # 0x01, asked by clients that read nothing.
    alice = {"Authorization": f"Bearer {ALICE}"}
    before = server.rss_kib()
    sockets = [stalled_exec(server.url, session_id, flood_request(), alice) for _ in range(3)]
    peak = peak_rss_kib(server.pid, lambda: exited(server) >= 3, 120)
    assert exited(server) == 3, server.log()[-3000:]
    assert [read_status(sock)[0] for sock in sockets] == [200] * 3
    # Each holds its raw output at most (32 MiB), never its JSON (up to 192 MiB before).
    print(f"capsule RSS: {before} KiB before, {peak} KiB at most")
    assert peak - before < 320 * 1024, (before, peak)
    # Her answers not yet written are capped: past the cap, the next is refused...
    while True:
        sock = stalled_exec(server.url, session_id, flood_request(), alice)
        status, body = read_status(sock)
        if status != 200:
            sock.close()
            break
        sockets.append(sock)
        assert len(sockets) < 8, "no cap on alice's answers not yet written"
    assert (status, body["code"]) == (429, "answers_pending"), body
    assert server.rss_kib() - before < 400 * 1024
    # ... and no one else's.
    other = create(server, BOB)["id"]
    assert sh(server, other, "printf hi", token=BOB)["stdout"] == "hi"
    # Her clients read nothing: the answers are dropped, the connections
    # closed, each with one line in the log.
    wait_for(lambda: server.log().count("read none of it for") == len(sockets), 120,
             "one log line per dropped answer")
    for sock in sockets:
        got, how = read_all(sock, timeout=60)
        sock.close()
        assert how in ("closed", "reset") and len(got) < 16 * MIB, (how, len(got))
    # Their bytes are hers again: the same attack, read this time, is answered.
    status, body = call(server, f"/api/sessions/{session_id}/exec", "POST",
                        flood_request(max_output=MIB), ALICE)
    assert status == 200, body
    assert (body["stdout_encoding"], body["stderr_encoding"]) == ("base64", "base64")
    assert base64.b64decode(body["stdout"]) == b"\xff" * MIB
    assert base64.b64decode(body["stderr"]) == b"\x01" * MIB
    assert body["truncated"] == {"stdout": True, "stderr": True}
    assert server.unhandled_errors() == []


def test_an_exec_past_its_timeout_leaves_nothing_it_started(server):
    session_id = create(server)["id"]
    # One sleep keeps the exec's output open, one has closed it: both left
    # the exec's process group, where `timeout -s KILL` kills.
    body = sh(server, session_id, "setsid sh -c 'sleep 300' & setsid sh -c"
                                  " 'exec sleep 301 >/dev/null 2>&1 </dev/null' & sleep 600",
              timeout=2)
    assert body["timed_out"] is True
    left = sh(server, session_id, "ps -eo args | grep -c '^sleep \\(30[01]\\|600\\)' || true")
    assert left["stdout"] == "0\n"
    # A command that ends in time keeps what it started in the background.
    assert sh(server, session_id, "setsid sleep 302 >/dev/null 2>&1 &",
              timeout=5)["timed_out"] is False
    assert sh(server, session_id, "ps -eo args | grep -c '^sleep 302'")["stdout"] == "1\n"


def test_any_output_comes_back_byte_for_byte(server):
    """
    Random bytes, control characters and text, printed by a real command,
    come back exactly (as text or base64), each answer at most about twice
    its output.
    """
    rng = random.Random(19)
    session_id = create(server)["id"]
    samples = [b"", b"\xff", "h\u00e9llo \u4e16\u754c\n".encode() * 5000,
               b"\x01" * 300000, b"\x1b[31mred\x1b[0m\t\n" * 10000]
    samples += [bytes(rng.getrandbits(8) for _ in range(size)) for size in (1, 2, 3, 65537)]
    for data in samples:
        body = sh(server, session_id, "base64 -d", stdin=base64.b64encode(data).decode())
        for name, output in (("stdout", data), ("stderr", b"")):
            if body[f"{name}_encoding"] == "base64":
                assert base64.b64decode(body[name]) == output
            else:
                assert body[name].encode() == output
        assert len(json.dumps(body, ensure_ascii=False).encode()) < 2 * len(data) + 70000
