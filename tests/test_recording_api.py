"""
"While you were away": a session's recording since a moment
(capsule.ops.playback), read by the recorder (capsule.ops.recording) and
served by GET /api/sessions/{id}/recording (capsule.web.recording); and the
`away` that a `connected` frame carries.
"""

import json
import os

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock

from capsule.auth.gate import Authenticator
from capsule.core.spec import ContainerSpec
from capsule.ops.playback import LEFT_MARKER, NotRecorded, playback
from capsule.ops.recording import PLAYBACKS_AT_ONCE, SessionRecorder, file_name
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.web.http import ClientAddresses
from tests.support.fakes import FakeDockerAPI, RecordingClient
from tests.support.httpclient import answered, send

SID = "0b5e2c9a-6a0e-4e4a-9d2a-3f1d2c3b4a5e"
T0 = 1_790_000_000
ALICE, BOB = "a" * 32, "b" * 32
PEER = IPv4Address("TCP", "127.0.0.1", 40000)


def write_cast(directory, started, events, cols=80, rows=24, sid=SID):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, file_name(sid, started))
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"version": 2, "width": cols, "height": rows,
                            "timestamp": int(started), "env": {"TERM": "xterm-256color"}})
                + "\n")
        for event in events:
            f.write(json.dumps(event) + "\n")
    return path


def parse(data: bytes):
    lines = data.decode("utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


# -- reading a recording since a moment ------------------------------------------


def test_events_since_are_rebased_after_the_screen_that_was_left(tmp_path):
    """
    Output before `since` is the lead-in (one event at 0, then the "you
    left here" marker); what came after begins at 0; the header has the
    size the terminal had at `since`.
    """
    write_cast(tmp_path, T0, [[0.5, "o", "$ make\r\n"], [1.0, "r", "100x30"],
                              [2.0, "o", "building\r\n"], [12.0, "o", "step 1\r\n"],
                              [15.5, "o", "done\r\n"], [16.0, "r", "90x20"]])
    result = playback(str(tmp_path), SID, T0 + 10)
    head, events = parse(result.data)
    assert head == {"version": 2, "width": 100, "height": 30, "timestamp": T0 + 10,
                    "env": {"TERM": "xterm-256color"}}
    assert events == [[0.0, "o", "$ make\r\nbuilding\r\n"], [0.0, "m", LEFT_MARKER],
                      [0.0, "o", "step 1\r\n"], [3.5, "o", "done\r\n"], [4.0, "r", "90x20"]]
    assert (result.parts, result.events, result.cut) == (1, 3, False)


def test_the_lead_in_is_bounded_and_begins_a_line(tmp_path):
    write_cast(tmp_path, T0, [[0.0, "o", "old line\r\n" * 20], [1.0, "o", "last\r\n"],
                              [5.0, "o", "new"]])
    _, events = parse(playback(str(tmp_path), SID, T0 + 2, lead_bytes=25).data)
    assert events[0] == [0.0, "o", "old line\r\nlast\r\n"]
    _, events = parse(playback(str(tmp_path), SID, T0 + 2, lead_bytes=0).data)
    assert events == [[0.0, "m", LEFT_MARKER], [0.0, "o", "new"]]


def test_several_files_are_read_in_order_with_a_marker_between(tmp_path):
    """
    A session recorded by two runs of capsule: the file being written at
    `since`, then the later one, with a marker where it begins; a file that
    ended before `since` is not read.
    """
    write_cast(tmp_path, T0 - 1000, [[0.0, "o", "very old"]])
    write_cast(tmp_path, T0, [[1.0, "o", "before"], [20.0, "o", "one"]])
    write_cast(tmp_path, T0 + 100, [[3.0, "o", "two"]], cols=120, rows=40)
    result = playback(str(tmp_path), SID, T0 + 10)
    _, events = parse(result.data)
    assert events[0] == [0.0, "o", "before"]
    assert events[2] == [0.0, "o", "one"]
    assert events[3][0:2] == [80.0, "m"]
    assert "capsule restarted" in events[3][2]
    assert events[4] == [83.0, "o", "two"]
    assert (result.parts, result.events) == (2, 2)


def test_a_recording_that_begins_after_since_says_so(tmp_path):
    write_cast(tmp_path, T0 + 60, [[0.0, "o", "hello"]])
    _, events = parse(playback(str(tmp_path), SID, T0).data)
    assert [e[1] for e in events] == ["m", "m", "o"]
    assert "nothing earlier was recorded" in events[1][2]
    assert events[2] == [0.0, "o", "hello"]


def test_past_max_bytes_the_rest_is_cut_with_a_marker(tmp_path):
    write_cast(tmp_path, T0, [[float(i), "o", "x" * 100] for i in range(100)])
    result = playback(str(tmp_path), SID, T0, max_bytes=1000)
    _, events = parse(result.data)
    assert result.cut
    assert events[-1][1] == "m" and "cut here" in events[-1][2]
    assert 0 < result.events < 10
    assert len(result.data) < 1000 + 500


def test_lines_that_are_not_events_and_files_that_are_not_casts(tmp_path):
    path = write_cast(tmp_path, T0, [[1.0, "o", "a"]])
    with open(path, "a") as f:
        f.write("garbage\n[2.0, \"o\"]\n[3.0, \"o\", \"b\"]\n")
    (tmp_path / file_name(SID, T0 + 5)).write_text("not json\n[1.0, \"o\", \"lost\"]\n")
    (tmp_path / "unrelated.cast").write_text("")
    _, events = parse(playback(str(tmp_path), SID, 0).data)
    assert [e[2] for e in events if e[1] == "o"] == ["a", "b"]


def test_no_file_is_not_recorded(tmp_path):
    with pytest.raises(NotRecorded):
        playback(str(tmp_path / "missing"), SID, 0)
    write_cast(tmp_path, T0, [[1.0, "o", "a"]], sid="f" * 8 + SID[8:])
    with pytest.raises(NotRecorded):
        playback(str(tmp_path), SID, 0)


# -- the recorder --------------------------------------------------------------------


def make_recorder(tmp_path, clock):
    recorder = SessionRecorder(str(tmp_path / "rec"), clock,
                               run_in_thread=lambda f, *a: maybeDeferred(f, *a))
    recorder.startService()
    return recorder


def test_header_time_plus_event_time_is_when_it_happened(tmp_path):
    """
    The header's timestamp is a whole second: the first event's time counts
    from it, not from the fraction when recording began (an event's Unix
    time was up to a second early).
    """
    clock = MemoryReactorClock()
    clock.advance(T0 + 0.75)
    recorder = make_recorder(tmp_path, clock)
    session = RecordingSession()
    recorder.session_output(session, b"a")
    clock.advance(1)
    recorder.session_output(session, b"b")
    recorder.session_ended(session)
    (name,) = os.listdir(tmp_path / "rec")
    head, events = parse((tmp_path / "rec" / name).read_bytes())
    assert [head["timestamp"] + e[0] for e in events] == [T0 + 0.75, T0 + 1.75]


class RecordingSession:
    id = SID

    class core:
        size = (80, 24)


def test_a_playback_has_what_waited_to_be_written(tmp_path):
    clock = MemoryReactorClock()
    clock.advance(T0)
    recorder = make_recorder(tmp_path, clock)
    recorder.session_output(RecordingSession(), b"waiting")
    assert os.listdir(tmp_path / "rec") == []
    result = []
    recorder.playback(SID, 0).addCallback(result.append)
    assert [e[2] for e in parse(result[0].data)[1] if e[1] == "o"] == ["waiting"]
    assert recorder.reading == 0


# -- the endpoint ------------------------------------------------------------------


class Server:
    def __init__(self, tmp_path, users=False, record=True) -> None:
        from capsule.web.site import make_site
        (tmp_path / "www").mkdir(parents=True, exist_ok=True)
        (tmp_path / "www" / "index.html").write_text("<html></html>")
        self.reactor = MemoryReactorClock()
        self.reactor.advance(T0)
        self.docker = FakeDockerAPI()
        self.pending = []
        self.recorder = SessionRecorder(str(tmp_path / "rec"), self.reactor,
                                        run_in_thread=self._run) if record else None
        if self.recorder is not None:
            self.recorder.startService()
        self.manager = SessionManager(self.docker, self.reactor, SessionConfig(
            spec=ContainerSpec(image="capsule-runtime:latest"), instance="rec-test"),
            observers=[self.recorder] if record else [])
        authenticator = None
        if users:
            tokens = tmp_path / "tokens"
            tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
            authenticator = Authenticator(MemoryReactorClock(), addresses=ClientAddresses(),
                                          tokens=str(tokens))
        self.site = make_site(self.manager, self.docker, self.reactor, str(tmp_path / "www"),
                              authenticator=authenticator, recorder=self.recorder)
        self.hold = False

    def _run(self, f, *args):
        if self.hold:
            held = Deferred()
            self.pending.append((held, f, args))
            return held
        return maybeDeferred(f, *args)

    def create(self, token=None):
        status, _, body = self.request("/api/sessions", "POST", b"{}", token=token)
        assert status == 201, body
        return self.manager.sessions[json.loads(body)["id"]]

    def request(self, path, method="GET", body=None, token=None):
        headers = []
        if token is not None:
            headers.append(("Authorization", f"Bearer {token}"))
        if body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", len(body))]
        response = answered(send(self.site, method, path, headers, body, peer=PEER), method,
                            path, clock=self.reactor)
        return response.status, response.headers, response.body


def test_the_endpoint_answers_asciicast_since_then(tmp_path):
    server = Server(tmp_path)
    session = server.create()
    process = server.docker.processes[0]
    process.emit(b"$ ")
    server.reactor.advance(10)
    process.emit(b"while away\r\n")
    status, headers, body = server.request(
        f"/api/sessions/{session.id}/recording?since={T0 + 5}")
    assert status == 200
    assert headers["content-type"] == "application/x-asciicast"
    assert headers["cache-control"] == "no-store"
    head, events = parse(body)
    assert head["timestamp"] == T0 + 5
    assert events == [[0.0, "o", "$ "], [0.0, "m", LEFT_MARKER], [0.0, "o", "while away\r\n"]]
    # Without `since`: the whole recording.
    _, _, body = server.request(f"/api/sessions/{session.id}/recording")
    assert [e[2] for e in parse(body)[1] if e[1] == "o"] == ["$ ", "while away\r\n"]


def test_another_users_session_is_a_404_like_a_missing_one(tmp_path):
    server = Server(tmp_path, users=True)
    session = server.create(token=ALICE)
    server.docker.processes[0].emit(b"secret")
    status, _, body = server.request(f"/api/sessions/{session.id}/recording", token=BOB)
    assert (status, json.loads(body)["code"]) == (404, "session_not_found")
    status, _, body = server.request(f"/api/sessions/{session.id}/recording", token=ALICE)
    assert status == 200 and b"secret" in body
    missing = "1" * 8 + session.id[8:]
    status, _, body = server.request(f"/api/sessions/{missing}/recording", token=ALICE)
    assert (status, json.loads(body)["code"]) == (404, "session_not_found")
    assert server.request(f"/api/sessions/{session.id}/recording")[0] == 401


def test_not_recorded(tmp_path):
    """
    Without --record, or with nothing of the session recorded: 404
    not_recorded, with a sentence.
    """
    server = Server(tmp_path, record=False)
    session = server.create()
    status, _, body = server.request(f"/api/sessions/{session.id}/recording")
    assert (status, json.loads(body)["code"]) == (404, "not_recorded")
    assert "--record" in json.loads(body)["error"]
    server = Server(tmp_path / "two")
    session = server.create()
    status, _, body = server.request(f"/api/sessions/{session.id}/recording")
    assert (status, json.loads(body)["code"]) == (404, "not_recorded")


@pytest.mark.parametrize("since", ["abc", "-1", "nan", "inf", str(T0 + 3600), "1e400"])
def test_a_bad_since_is_a_400(tmp_path, since):
    server = Server(tmp_path)
    session = server.create()
    status, _, body = server.request(f"/api/sessions/{session.id}/recording?since={since}")
    assert (status, json.loads(body)["code"]) == (400, "bad_request")


def test_playbacks_at_once_are_bounded(tmp_path):
    server = Server(tmp_path)
    session = server.create()
    server.docker.processes[0].emit(b"x")
    server.reactor.advance(1)
    server.hold = True
    transports = [send(server.site, "GET", f"/api/sessions/{session.id}/recording", [],
                       peer=PEER) for _ in range(PLAYBACKS_AT_ONCE)]
    status, headers, body = server.request(f"/api/sessions/{session.id}/recording")
    assert (status, json.loads(body)["code"]) == (429, "recording_busy")
    assert headers["retry-after"] == "5"
    for held, f, args in server.pending:
        held.callback(f(*args))
    for transport in transports:
        assert answered(transport).status == 200
    assert server.recorder.reading == 0
    server.hold = False
    assert server.request(f"/api/sessions/{session.id}/recording")[0] == 200


# -- the connected frame's `away` --------------------------------------------------


def test_connected_says_what_was_printed_while_no_client_was_attached(tmp_path):
    """
    A client that attaches to a session that printed since its last client
    left is told since when and how much (and that it was recorded); one
    that attaches when nothing was printed meanwhile is told nothing.
    """
    server = Server(tmp_path)
    session = server.create()
    process = server.docker.processes[0]
    process.emit(b"$ ")
    client = RecordingClient()
    server.manager.reconnect(session.id, client)
    assert session.core.away() is None
    server.reactor.advance(5)
    server.manager.detach(session, client)
    left = server.reactor.seconds()
    assert session.core.away() is None
    server.reactor.advance(5)
    process.emit(b"built\r\n")
    assert session.core.away() == (left, 7)
    # The frame, as a WebSocket sends it.
    from capsule.core.protocol import encode_connected
    frame = json.loads(encode_connected(session.id, True, away={"since": left, "printed": 7,
                                                                "recorded": True}))
    assert frame["away"] == {"since": left, "printed": 7, "recorded": True}
    assert "away" not in json.loads(encode_connected(session.id, True))
    assert server.site.websocket_factory.recording is True
    assert Server(tmp_path / "plain", record=False).site.websocket_factory.recording is False


def test_a_kept_sessions_recording_is_its_owners(tmp_path):
    """
    A session put away (no longer live, kept: capsule.sessions.keeping) is
    played back for its owner, and is another user's 404.
    """
    server = Server(tmp_path, users=True)
    kept_id = "2" * 8 + SID[8:]
    write_cast(str(tmp_path / "rec"), T0, [[1.0, "o", "from before"]], sid=kept_id)

    class Keeping:
        def find(self, session_id, user):
            return object() if (session_id, user) == (kept_id, "alice") else None

    server.manager.keeping = Keeping()
    status, _, body = server.request(f"/api/sessions/{kept_id}/recording", token=ALICE)
    assert status == 200 and b"from before" in body
    status, _, body = server.request(f"/api/sessions/{kept_id}/recording", token=BOB)
    assert (status, json.loads(body)["code"]) == (404, "session_not_found")


def test_a_cut_playback_is_logged(tmp_path, monkeypatch):
    from twisted.logger import formatEvent, globalLogPublisher

    from capsule.web import recording
    monkeypatch.setattr(recording, "PLAYBACK_MAX_BYTES", 200)
    server = Server(tmp_path)
    session = server.create()
    for _ in range(10):
        server.docker.processes[0].emit(b"y" * 50)
        server.reactor.advance(1)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        status, _, body = server.request(f"/api/sessions/{session.id}/recording")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert status == 200 and b"cut here" in body
    said = [formatEvent(e) for e in events if e.get("log_namespace") == "capsule.web.recording"]
    assert said == [f"the playback of session {session.id[:8]} was cut at 200 bytes (events"
                    " kept: 1)"]

