"""
--record and --log-format json of a real twistd capsule, with the real
engine: the recording parses as asciicast v2 and holds what the session
printed; the log file is one JSON object per line.
"""

import json

import pytest_twisted

from .harness import WSClient, eventually


def read_cast(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


@pytest_twisted.ensureDeferred
async def test_a_session_is_recorded_and_logged_as_json(make_server, tmp_path):
    record = tmp_path / "recordings"
    server = make_server("--record", str(record), "--log-format", "json")
    client = await WSClient.connect(server.ws_url)
    session_id = await client.start(cols=100, rows=30)
    client.type("echo rec$((6*7))-\u20ac-ord\r")
    await client.until("rec42-\u20ac-ord")
    client.resize(120, 40)
    await client.run("stty size")
    await client.exit()

    await eventually(lambda: f"session {session_id[:8]} ended" in server.log())

    def written():
        paths = list(record.iterdir())
        text = paths[0].read_text(encoding="utf-8") if len(paths) == 1 else ""
        return paths[0] if "40 120" in text else None

    path = await eventually(written)
    assert path.name.startswith(f"{session_id}-") and path.name.endswith(".cast")
    head, events = read_cast(path)
    assert head["version"] == 2
    assert (head["width"], head["height"]) == (100, 30)
    assert head["env"] == {"TERM": "xterm-256color"}
    assert isinstance(head["timestamp"], int)
    assert {e[1] for e in events} <= {"o", "r"}
    assert all(isinstance(e[0], float) and e[0] >= 0 for e in events)
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    output = "".join(e[2] for e in events if e[1] == "o")
    assert "rec42-\u20ac-ord" in output
    assert "40 120" in output
    assert [e[2] for e in events if e[1] == "r"] == ["120x40"]

    records = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    started = [r for r in records if r.get("session_id") == session_id[:8]
               and r["message"].startswith(f"session {session_id[:8]} started")]
    assert len(started) == 1
    assert started[0]["level"] == "info" and started[0]["namespace"] == "capsule.sessions.manager"
    assert started[0]["container"] and isinstance(started[0]["ms"], float)
    assert not any("rec42" in json.dumps(r) for r in records)
