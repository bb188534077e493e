"""
Bytes between two connections (a preview's client and the port in its
session; a session's connection through the egress proxy and its
upstream): each side's reading paused while the other cannot take more or a
rate is spent (L{Valve}, L{Bucket}), and, between two TCP sockets, moved in
the kernel (L{Splicer}: splice(2) through a pipe) rather than copied
through capsule.
"""

from __future__ import annotations

import fcntl
import os

from twisted.internet import main, tcp
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

# Bytes a spliced connection reads at once, and holds unwritten before it
# pauses the other side.
SPLICE_BUFFER = 1024 * 1024


class Bucket:
    """
    What one preview may carry per second, each way (a token bucket of
    one second's worth).
    """

    def __init__(self, clock, rate: int) -> None:
        self.clock, self.rate = clock, rate
        self.level, self.at = float(rate), clock.seconds()

    def take(self, size: int) -> float:
        """
        Take C{size} bytes; the seconds to wait before more may pass.
        """
        now = self.clock.seconds()
        self.level = min(float(self.rate), self.level + (now - self.at) * self.rate)
        self.at = now
        self.level -= size
        return 0.0 if self.level >= 0 else -self.level / self.rate


@implementer(IPushProducer)
class Valve:
    """
    The reading side of one transport, paused while its consumer is full
    or its preview's rate is spent.
    """

    def __init__(self, transport) -> None:
        self.transport = transport
        self.reasons: set[str] = set()

    def _set(self, reason: str, on: bool) -> None:
        before = bool(self.reasons)
        (self.reasons.add if on else self.reasons.discard)(reason)
        if bool(self.reasons) != before and self.transport is not None:
            (self.transport.pauseProducing if self.reasons else self.transport.resumeProducing)()

    def pauseProducing(self) -> None:
        self._set("consumer", True)

    def resumeProducing(self) -> None:
        self._set("consumer", False)

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


# fcntl's F_SETPIPE_SZ (Linux).
_F_SETPIPE_SZ = 1031


def can_splice(transport) -> bool:
    """
    Whether C{transport} is a plain TCP socket of this host's kernel
    (splice(2) moves bytes between two such without copying them through
    capsule).
    """
    return hasattr(os, "splice") and isinstance(transport, tcp.Connection)


class Splicer:
    """
    Moves what C{src}'s socket receives to C{dst}'s socket in the kernel
    (splice(2) through a pipe), in place of Twisted's reading and writing:
    while C{dst} cannot take more, C{src} is not read (the back-pressure of
    the splice). Bytes of Twisted's own still queued for C{dst} (a head)
    go first: until they are out, C{src} is read the ordinary way.

    @param size: the most bytes read at once, and held unwritten (the
        pipe's size, where the kernel allows it).
    @ivar moved: the bytes spliced so far (a spliced connection's protocol
        never sees them: this is how its owner tells it is busy).
    """

    def __init__(self, src, dst, size: int = SPLICE_BUFFER) -> None:
        self.src, self.dst, self.size = src, dst, size
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, size)
        except OSError:
            pass
        self.pending = 0
        self.moved = 0
        self.closed = False
        self._read, self._write = src.doRead, dst.doWrite
        src.doRead, dst.doWrite = self.doRead, self.doWrite

    def _queued(self) -> bool:
        dst = self.dst
        return bool(dst._tempDataLen or len(dst.dataBuffer) - dst.offset)

    def doRead(self):
        if self.closed or self._queued():
            return self._read()
        try:
            n = os.splice(self.src.fileno(), self.w, self.size,
                          flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if n == 0:
            return main.CONNECTION_DONE
        self.pending += n
        self.moved += n
        self._flush()
        return None

    def _flush(self) -> None:
        while self.pending:
            try:
                n = os.splice(self.r, self.dst.fileno(), self.pending,
                              flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                # dst is full: src waits until it drains.
                self.src.stopReading()
                self.dst.startWriting()
                return
            except OSError:
                self.pending = 0
                self.dst.abortConnection()
                self.src.loseConnection()
                return
            self.pending -= n

    def doWrite(self):
        if self.pending and not self.closed:
            self._flush()
            if self.pending:
                return None
            if not self.src.disconnected:
                self.src.startReading()
            if not self._queued() and not self.dst.disconnecting:
                self.dst.stopWriting()
                return None
        return self._write()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for fd in (self.r, self.w):
                try:
                    os.close(fd)
                except OSError:
                    pass
