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
    {"type": "exit", "exit_code": N, "message": "..."}

capsule adds, and clients that do not know them ignore: C{resumed},
C{replay} (bytes of earlier output that follow), C{on_close} (what closing
the last tab does to the session's work) and C{resumed_from} (when a kept
session that was resumed had been put away) in C{connected}, and::

    {"type": "notice", "code": "...", "message": "..."}
    {"type": "ports", "ports": [{"port": 3000, "url": "...", "public": false}], "more": 0}

The binary protocol, negotiated with the WebSocket subprotocol
L{BINARY_SUBPROTOCOL}, carries output as raw binary frames whose byte
offsets are implicit (the first byte after C{connected} has offset
C{connected.offset}, and each frame's bytes follow on), takes input as binary
frames (or JSON C{input}), and adds C{{"type": "ack", "offset": N}} from the
client for flow control.  Control messages stay small JSON text frames.
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


@dataclass(frozen=True)
class Ack:
    offset: int


ClientMessage = Resize | Input | Ping | Ack

BINARY_SUBPROTOCOL = "capsule.binary.v1"
# Offsets are byte counts of a session's output: 2**53 keeps them exact in
# a browser's numbers.
MAX_OFFSET = 2**53

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


def parse_client_message(payload: bytes, is_binary: bool,
                         binary_protocol: bool = False) -> ClientMessage:
    """
    Turn one WebSocket message from a client into an event.

    @param binary_protocol: whether the connection speaks the binary
        protocol, where binary frames are input and C{ack} exists.
    @raise ProtocolError: for anything that is not a valid message; its
        C{message} says what was wrong.
    """
    if is_binary:
        if binary_protocol:
            return Input(bytes(payload))
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
    if kind == "ack" and binary_protocol:
        offset = message.get("offset")
        if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
            raise ProtocolError(
                f'ack needs "offset": a byte offset (an integer from 0), got {_describe(offset)}',
                "bad_ack")
        return Ack(offset)
    expected = '"resize", "input", "ping" or "ack"' if binary_protocol else '"resize", "input" or "ping"'
    raise ProtocolError(
        f"unknown message type {_describe(kind)}: expected {expected}",
        "unknown_type",
    )


def parse_offset(value: str) -> int:
    """
    Validate a resume offset from a URL.

    @raise ProtocolError: if C{value} is not a byte offset.
    """
    if not value.isdigit() or int(value) > MAX_OFFSET:
        raise ProtocolError(f"invalid offset {_describe(value)}: an offset is an integer"
                            " from 0", "invalid_offset")
    return int(value)


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


_OUTPUT_OVERHEAD = len(b'{"type":"output","data":""}')


def max_output_chunk(max_message_size: int, binary: bool) -> int:
    """
    The most output bytes one frame may carry when messages are limited to
    C{max_message_size} bytes (base64 makes 3 bytes 4 in the JSON protocol).
    """
    if binary:
        return max_message_size
    return max(3, (max_message_size - _OUTPUT_OVERHEAD) // 4 * 3)


def encode_output(data: bytes) -> bytes:
    # The hot path: build the frame by hand instead of going through json.
    return b'{"type":"output","data":"' + base64.b64encode(data) + b'"}'


def encode_connected(session_id: str, resumed: bool, offset: int | None = None,
                     window: int | None = None, replay: int | None = None,
                     grace: float | None = None, kept: bool | None = None,
                     profile: str | None = None, on_close: dict | None = None,
                     resumed_from: float | None = None) -> bytes:
    """
    @param replay: how many of the output bytes that follow were produced
        before this connection (replayed output): a terminal must not answer
        the queries it finds in them.
    @param grace: seconds the session lives on once its last client has
        left; C{kept}: whether anything keeps it (and its /workspace) past
        that.  A page says so before its tab is closed.
    @param profile: the session's profile's name (the page shows it).
    @param on_close: what closing the session's last tab does to its work
        (L{capsule.core.kept.closing_outcome}): C{{"outcome": "kept",
        "after": S, "until": T}} or C{{"outcome": "removed", "after": S}}.
    @param resumed_from: when the session, kept, was put away, if it was
        resumed since (a Unix time): its shell is new, and what its
        terminal shows first is the screen it had then.
    """
    message = {"type": "connected", "session_id": session_id, "resumed": resumed}
    if profile is not None:
        message["profile"] = profile
    if offset is not None:
        message["offset"] = offset
    if window is not None:
        message["window"] = window
    if replay is not None:
        message["replay"] = replay
    if grace is not None:
        message["grace"] = grace
    if kept is not None:
        message["kept"] = kept
    if on_close is not None:
        message["on_close"] = on_close
    if resumed_from is not None:
        message["resumed_from"] = resumed_from
    return _encode(message)


def encode_notice(code: str, message: str) -> bytes:
    """
    Something the person at the terminal should know that is not the
    shell's output (it is never counted in output offsets).
    """
    return _encode({"type": "notice", "code": code, "message": message})


def encode_dropped(count: int, offset: int) -> bytes:
    return _encode({"type": "dropped", "bytes": count, "offset": offset})


def encode_error(message: str, code: str = "error", **extra) -> bytes:
    """
    An error frame; C{extra} fields say more of it to a client that knows
    its code (C{session_kept}: C{kept_at} and C{kept_until}).
    """
    return _encode({"type": "error", "message": message, "code": code, **extra})


def encode_pong() -> bytes:
    return b'{"type":"pong"}'


def encode_exit(exit_code: int | None, message: str) -> bytes:
    return _encode({"type": "exit", "exit_code": exit_code, "message": message})


def encode_watching(offset: int | None, window: int | None, replay: int,
                    expires_in: float, size: tuple[int, int]) -> bytes:
    """
    A spectator's C{connected}: read-only, with no session id (a share link
    never tells the session's id, which is its owner's credential), the
    seconds its link has left, and the session's terminal size.
    """
    message = {"type": "connected", "session_id": None, "resumed": False, "read_only": True,
               "expires_in": max(0, round(expires_in)), "replay": replay,
               "cols": size[0], "rows": size[1]}
    if offset is not None:
        message["offset"] = offset
    if window is not None:
        message["window"] = window
    return _encode(message)


def encode_size(cols: int, rows: int) -> bytes:
    """
    (To a spectator.)  The session's terminal is C{cols} x C{rows} now.
    """
    return _encode({"type": "size", "cols": cols, "rows": rows})


def encode_watchers(count: int) -> bytes:
    """
    How many spectators watch the owner's session now.
    """
    return _encode({"type": "watchers", "count": count})


def encode_ports(entries: list[dict], more: int = 0) -> bytes:
    """
    (To the owner.)  The TCP ports listening in the session now, each with
    the address of its preview (C{entries}: C{port}, C{url}, C{public}), and
    how many more listen than are named; sent when they change and as a
    client attaches.
    """
    return _encode({"type": "ports", "ports": entries, "more": more})
