"""
The JSON wire codec: every client message, valid or not.
"""

import base64
import json

import pytest

from capsule.core import protocol as wire


def parse(obj, binary=False):
    payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return wire.parse_client_message(payload, binary)


def refused(obj, binary=False) -> wire.ProtocolError:
    with pytest.raises(wire.ProtocolError) as info:
        parse(obj, binary)
    return info.value


def test_resize():
    assert parse({"type": "resize", "cols": 80, "rows": 24}) == wire.Resize(80, 24)
    assert parse({"type": "resize", "cols": 1000, "rows": 1}) == wire.Resize(1000, 1)


def test_input_and_synonym():
    assert parse({"type": "input", "data": "ls -la\r"}) == wire.Input(b"ls -la\r")
    assert parse({"type": "terminal_input", "data": "é"}) == wire.Input("é".encode())


def test_ping():
    assert parse({"type": "ping"}) == wire.Ping()


def test_extra_fields_are_ignored():
    assert parse({"type": "ping", "id": 3}) == wire.Ping()


@pytest.mark.parametrize("cols", [0, -1, 1001, 10**20, 1.5, "80", True, None, [80]])
def test_bad_resize_is_refused(cols):
    error = refused({"type": "resize", "cols": cols, "rows": 24})
    assert error.code == "bad_resize"
    assert '"cols"' in error.message


def test_resize_missing_field():
    error = refused({"type": "resize", "cols": 80})
    assert error.code == "bad_resize" and '"rows"' in error.message


def test_malformed_json():
    error = refused(b'{"type": "input", "data": ')
    assert error.code == "malformed_json"
    assert "malformed JSON" in error.message


def test_deeply_nested_json_is_an_error_not_a_crash():
    error = refused(b"[" * 200000 + b"]" * 200000)
    assert error.code == "malformed_json"


def test_binary_frame():
    error = refused(b'{"type":"ping"}', binary=True)
    assert error.code == "binary_frame"


@pytest.mark.parametrize("message", [[1, 2], "ping", 3, None])
def test_not_an_object(message):
    assert refused(message).code == "bad_message"


@pytest.mark.parametrize("message", [{}, {"type": 3}, {"data": "x"}])
def test_missing_type(message):
    assert refused(message).code == "bad_message"


def test_unknown_type_is_named():
    error = refused({"type": "launch_missiles"})
    assert error.code == "unknown_type"
    assert "launch_missiles" in error.message


@pytest.mark.parametrize("data", [None, 3, ["a"], {"a": 1}])
def test_input_needs_string(data):
    assert refused({"type": "input", "data": data}).code == "bad_input"


def test_lone_surrogate_is_refused():
    error = refused(b'{"type": "input", "data": "\\ud800"}')
    assert error.code == "bad_input"
    assert "surrogate" in error.message


def test_long_values_are_shortened_in_messages():
    error = refused({"type": "x" * 10000})
    assert len(error.message) < 200


def test_session_id():
    value = "6F9619FF-8B86-D011-B42D-00C04FC964FF"
    assert wire.parse_session_id(value) == value.lower()
    for bad in ["", "../../etc/passwd", "1234", "6f9619ff-8b86-d011-b42d-00c04fc964fg"]:
        with pytest.raises(wire.ProtocolError) as info:
            wire.parse_session_id(bad)
        assert info.value.code == "invalid_session_id"


def test_encode_output_is_json_with_base64():
    raw = bytes(range(256)) * 3
    message = json.loads(wire.encode_output(raw))
    assert message["type"] == "output"
    assert base64.b64decode(message["data"]) == raw


def test_encode_others():
    assert json.loads(wire.encode_connected("abc", True)) == {
        "type": "connected", "session_id": "abc", "resumed": True}
    assert json.loads(wire.encode_connected("abc", False, 5, 1024, 3, 60.0, False)) == {
        "type": "connected", "session_id": "abc", "resumed": False, "offset": 5,
        "window": 1024, "replay": 3, "grace": 60.0, "kept": False}
    assert json.loads(wire.encode_error("oops", "bad")) == {
        "type": "error", "message": "oops", "code": "bad"}
    assert json.loads(wire.encode_pong()) == {"type": "pong"}
    assert json.loads(wire.encode_exit(3, "the shell exited with code 3")) == {
        "type": "exit", "exit_code": 3, "message": "the shell exited with code 3"}


@pytest.mark.parametrize("limit", [100, 1024, 262144, 262145])
def test_output_chunks_fit_the_message_limit(limit):
    assert wire.max_output_chunk(limit, True) == limit
    chunk = wire.max_output_chunk(limit, False)
    assert len(wire.encode_output(b"x" * chunk)) <= limit
    assert len(wire.encode_output(b"x" * (chunk + 3))) > limit
