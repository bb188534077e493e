"""
What goes on a terminal's WebSocket, apart from the connection's logic: the
size a client may give in the URL, the close reason's bound, the two wire
formats (the JSON protocol and C{capsule.binary.v1}, chosen at the
handshake), and the gate that pauses a session's output while the client is
full or has not acknowledged its window.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from capsule.core import protocol as wire


def url_size(cols: str | None, rows: str | None) -> tuple[int, int] | None:
    """
    The terminal size a client gave in the WebSocket's URL (C{?cols=C&rows=R}),
    or C{None} when it gave neither.

    @raise wire.ProtocolError: for only one of them, or one that is not an
        integer in the range a C{resize} message allows.
    """
    if cols is None and rows is None:
        return None
    size = []
    for name, value in (("cols", cols), ("rows", rows)):
        if value is None or not (value.isascii() and value.isdigit()) or len(value) > 4 \
                or not wire.MIN_SIZE <= int(value) <= wire.MAX_SIZE:
            raise wire.ProtocolError(
                f"the URL's {name} must be an integer from {wire.MIN_SIZE} to {wire.MAX_SIZE}"
                f" (with {'rows' if name == 'cols' else 'cols'}), got"
                f" {'nothing' if value is None else repr(value[:20])}", "bad_resize")
        size.append(int(value))
    return size[0], size[1]


def close_reason(text: str) -> str:
    # A close reason is at most 123 bytes of UTF-8.
    encoded = text.encode("utf-8")[:120]
    return encoded.decode("utf-8", "ignore")


@implementer(IPushProducer)
class FlowGate:
    """
    Pauses a session's exec while the client's connection is full (the
    transport pauses its producer) or while the client has not acknowledged
    C{window} bytes (binary protocol), and resumes it when neither holds.
    """

    def __init__(self, throttle) -> None:
        self._throttle = throttle
        self._reasons: set[str] = set()

    def hold(self, reason: str, on: bool) -> None:
        before = bool(self._reasons)
        if on:
            self._reasons.add(reason)
        else:
            self._reasons.discard(reason)
        if before and not self._reasons:
            self._throttle.resumeProducing()
        elif self._reasons and not before:
            self._throttle.pauseProducing()

    def release(self) -> None:
        """
        This connection lets the session go (taken over, ended): whatever it
        paused must not stay paused for the next one.
        """
        if self._reasons:
            self._reasons.clear()
            self._throttle.resumeProducing()

    def pauseProducing(self) -> None:
        self.hold("transport", True)

    def resumeProducing(self) -> None:
        self.hold("transport", False)

    def stopProducing(self) -> None:
        # The connection is closing: the shell must go on (the throttle
        # only ever resumes on stop).
        self._reasons.clear()
        self._throttle.stopProducing()


class JsonWire:
    """
    The original design's protocol: JSON text frames, output as base64, no
    offsets and no acknowledgements.
    """

    subprotocol = None
    acks = False

    def __init__(self, max_message_size: int) -> None:
        self.max_chunk = wire.max_output_chunk(max_message_size, False)

    def parse(self, payload: bytes, is_binary: bool) -> wire.ClientMessage:
        return wire.parse_client_message(payload, is_binary, False)

    def connected(self, session_id: str, resumed: bool, offset: int, replay: int,
                  window: int, grace: float, kept: bool,
                  profile: str | None = None, **more) -> tuple[bytes, bool]:
        return wire.encode_connected(session_id, resumed, replay=replay, grace=grace,
                                     kept=kept, profile=profile, **more), False

    def output(self, chunk: bytes) -> tuple[bytes, bool]:
        return wire.encode_output(chunk), False

    def dropped(self, count: int, offset: int) -> tuple[bytes, bool]:
        # No offsets here: the client reads it in its terminal.
        return wire.encode_output(
            f"\r\n[capsule: {count} bytes of older output were dropped]\r\n".encode()), False


class BinaryWire:
    """
    The binary protocol: raw output bytes in binary frames at implicit
    offsets, acknowledged by the client for flow control.
    """

    subprotocol = wire.BINARY_SUBPROTOCOL
    acks = True

    def __init__(self, max_message_size: int) -> None:
        self.max_chunk = wire.max_output_chunk(max_message_size, True)

    def parse(self, payload: bytes, is_binary: bool) -> wire.ClientMessage:
        return wire.parse_client_message(payload, is_binary, True)

    def connected(self, session_id: str, resumed: bool, offset: int, replay: int,
                  window: int, grace: float, kept: bool,
                  profile: str | None = None, **more) -> tuple[bytes, bool]:
        return wire.encode_connected(session_id, resumed, offset, window, replay, grace,
                                     kept, profile, **more), False

    def output(self, chunk: bytes) -> tuple[bytes, bool]:
        return chunk, True

    def dropped(self, count: int, offset: int) -> tuple[bytes, bool]:
        return wire.encode_dropped(count, offset), False



