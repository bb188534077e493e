"""
The wire messages of capsule's WebSocket protocol: parse, validate, encode.

Bytes in, events out; nothing here does I/O or knows about Autobahn, the
reactor or Docker.  The JSON protocol is the original design's, unchanged:

client -> server::

    {"type": "resize", "cols": C, "rows": R}
    {"type": "input", "data": "..."}          ("terminal_input" is a synonym)
    {"type": "ping"}

server -> client::

    {"type": "connected", "session_id": "<uuid>", "resumed": false}
    {"type": "output", "data": "<base64 of the raw bytes>"}
    {"type": "error", "message": "...", "code": "..."}
    {"type": "pong"}
    {"type": "exit", "exit_code": N}
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass

# Terminal sizes outside this range are refused (not clamped): a real
# terminal is never 0 or 10,000 columns wide, so such a value is a bug in the
# client that it should hear about.
MIN_SIZE = 1
MAX_SIZE = 1000


class ProtocolError(Exception):
    """
    A client message that cannot be accepted.

    @ivar message: a sentence for the person at the terminal.
    @ivar code: a short machine-readable reason.
    """

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Resize:
    cols: int
    rows: int


@dataclass(frozen=True)
class Input:
    data: bytes


@dataclass(frozen=True)
class Ping:
    pass


ClientMessage = Resize | Input | Ping

_INPUT_TYPES = frozenset({"input", "terminal_input"})


def _describe(value: object, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=True, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _size(message: dict, field: str) -> int:
    if field not in message:
        raise ProtocolError(
            f'resize needs "{field}": an integer from {MIN_SIZE} to {MAX_SIZE}',
            "bad_resize",
        )
    value = message[field]
    # bool is an int subclass in Python; true is not a terminal width.
    if type(value) is not int:
        raise ProtocolError(
            f'resize "{field}" must be an integer from {MIN_SIZE} to {MAX_SIZE},'
            f" got {_describe(value)}",
            "bad_resize",
        )
    if not MIN_SIZE <= value <= MAX_SIZE:
        raise ProtocolError(
            f'resize "{field}" must be from {MIN_SIZE} to {MAX_SIZE}, got {value}',
            "bad_resize",
        )
    return value


def parse_client_message(payload: bytes, is_binary: bool) -> ClientMessage:
    """
    Turn one WebSocket message from a client into an event.

    @raise ProtocolError: for anything that is not a valid message; its
        C{message} says what was wrong.
    """
    if is_binary:
        raise ProtocolError(
            "binary frames are not part of the JSON protocol: send JSON text frames",
            "binary_frame",
        )
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError):
        raise ProtocolError(
            "malformed JSON: each frame must be one JSON object such as"
            ' {"type": "ping"}',
            "malformed_json",
        ) from None
    if not isinstance(message, dict):
        raise ProtocolError(
            f'a message must be a JSON object with a "type", got {_describe(message)}',
            "bad_message",
        )
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(
            'a message needs a "type": one of "resize", "input", "ping"',
            "bad_message",
        )
    if kind == "resize":
        return Resize(cols=_size(message, "cols"), rows=_size(message, "rows"))
    if kind in _INPUT_TYPES:
        data = message.get("data")
        if not isinstance(data, str):
            raise ProtocolError(
                f'{kind} needs "data": a string, got {_describe(data)}', "bad_input"
            )
        try:
            return Input(data.encode("utf-8"))
        except UnicodeEncodeError:
            raise ProtocolError(
                f"{kind} data is not valid Unicode text (it holds a lone surrogate)",
                "bad_input",
            ) from None
    if kind == "ping":
        return Ping()
    raise ProtocolError(
        f'unknown message type {_describe(kind)}: expected "resize", "input" or "ping"',
        "unknown_type",
    )


def parse_session_id(value: str) -> str:
    """
    Validate a session id from a client or a URL: a UUID, in canonical form.

    @raise ProtocolError: if C{value} is not a UUID.
    """
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        raise ProtocolError(
            f"invalid session id {_describe(value)}: a session id is a UUID",
            "invalid_session_id",
        ) from None


def _encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


def encode_output(data: bytes) -> bytes:
    # The hot path: build the frame by hand instead of going through json.
    return b'{"type":"output","data":"' + base64.b64encode(data) + b'"}'


def encode_connected(session_id: str, resumed: bool) -> bytes:
    return _encode({"type": "connected", "session_id": session_id, "resumed": resumed})


def encode_error(message: str, code: str = "error") -> bytes:
    return _encode({"type": "error", "message": message, "code": code})


def encode_pong() -> bytes:
    return b'{"type":"pong"}'


def encode_exit(exit_code: int | None) -> bytes:
    return _encode({"type": "exit", "exit_code": exit_code})
