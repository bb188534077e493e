"""
Keeper channels: TCP connections carried over a session's keeper stream
(see "Channels" in docker/keeper/capsule-keeper.c), for sessions with no
network of their own.  Pure encoding and the address that names a channel;
the multiplexing is L{capsule.engine.channels}.

capsule asks for channels with the environment variable L{CHANNEL_ENV} on
the keeper's exec (its value: the port the keeper listens on at 127.0.0.1
for the session door, 0 for none); a keeper that has them says so in its
preamble (C{;channels=N}, N the most open at once).  An older keeper ignores
the variable and says nothing: the session has no channels.

Every channel frame's payload starts with the channel's 4-byte id: the
keeper's ids are 1 .. 2**31-1, capsule's have the top bit set.

  - capsule -> keeper: C{C} ID PORT(2): connect to 127.0.0.1:PORT in the
    container (answered with C{A} ID, or C{F}).
  - keeper -> capsule: C{C} ID PORT(2): a connection came in on PORT (the
    door); C{A} ID: capsule's channel is connected.
  - both ways: C{D} ID bytes (at most L{CHUNK}); C{E} ID: no more bytes from
    this side; C{F} ID REASON: the channel is gone, no answer (channel 0 from
    the keeper: a notice, e.g. door connections refused past the cap);
    C{G} ID N(4): N more bytes may be sent.

Each side may have at most L{WINDOW} bytes sent and not granted back on each
channel.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from twisted.internet.interfaces import IAddress
from zope.interface import implementer

CHANNEL_ENV = "CAPSULE_KEEPER_CHANNELS"

CHUNK = 16384
WINDOW = 131072
MAX_REASON = 200
# capsule's channel ids have this bit; the keeper's do not.
CAPSULE_BIT = 0x80000000

# What a keeper that speaks channels may send besides the relay's frames,
# with the sizes each payload may have.
CHANNEL_FRAMES = {b"C": (6, 6), b"A": (4, 4), b"D": (4, 4 + CHUNK), b"E": (4, 4),
                  b"F": (4, 4 + MAX_REASON), b"G": (8, 8)}


def _frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def encode_open(channel: int, port: int) -> bytes:
    return _frame(b"C", struct.pack(">IH", channel, port))


def encode_data(channel: int, data: bytes) -> bytes:
    """
    C{data} as C{D} frames of at most L{CHUNK} bytes each.
    """
    head = struct.pack(">I", channel)
    return b"".join(_frame(b"D", head + data[i : i + CHUNK])
                    for i in range(0, len(data), CHUNK))


def encode_end(channel: int) -> bytes:
    return _frame(b"E", struct.pack(">I", channel))


def encode_fail(channel: int, reason: str) -> bytes:
    text = reason.encode("utf-8", "replace")[:MAX_REASON]
    return _frame(b"F", struct.pack(">I", channel) + text)


def encode_grant(channel: int, count: int) -> bytes:
    return _frame(b"G", struct.pack(">II", channel, count))


def channel_of(payload: bytes) -> int:
    (channel,) = struct.unpack_from(">I", payload)
    return channel


def port_of(payload: bytes) -> int:
    (port,) = struct.unpack_from(">H", payload, 4)
    return port


def grant_of(payload: bytes) -> int:
    (count,) = struct.unpack_from(">I", payload, 4)
    return count


def reason_of(payload: bytes) -> str:
    """
    An C{F} frame's reason, as text fit for a log line (no control
    characters: the keeper is inside the container).
    """
    text = payload[4:].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)


@implementer(IAddress)
@dataclass(frozen=True)
class ChannelAddress:
    """
    The address of a connection carried over session C{session_id}'s keeper
    stream: a protocol's C{transport.getPeer()} (and C{getHost()}), where a
    connection over the network would have an C{IPv4Address}.  Whoever
    serves such a connection names its session from C{session_id}, as it
    would from the source address of a session's container.

    @ivar channel: the channel's id on that stream.
    @ivar port: the port in the container: where the connection came in
        (the door's, for the keeper's channels), or where capsule connected.
    """

    session_id: str
    channel: int
    port: int
    type: str = "CHANNEL"

    def __str__(self) -> str:
        return f"session {self.session_id[:8]} channel {self.channel} port {self.port}"


def channel_session(address) -> str | None:
    """
    The session a connection's peer C{address} is a channel of, or C{None}
    when it is not a channel's (then its C{host}, a session container's
    address, says whose it is).  A C{ChannelAddress} has no C{host}: code
    that looks one up fails rather than mistakes it for an IP address.
    """
    return address.session_id if isinstance(address, ChannelAddress) else None
