"""
A spectator's side of the WebSocket: a connection opened with a watch link
watches a session read-only (its replay, then its output), never types, and
never holds the session back: a spectator that falls behind is held up to a
backlog, then closed.  Mixed into L{capsule.web.websocket.CapsuleServerProtocol},
whose connection state (phase, flow window, coalescer) it shares.
"""

from __future__ import annotations

import enum

from twisted.logger import Logger

from capsule.core import protocol as wire
from capsule.core.shares import ShareRefused
from capsule.sessions.spectators import TOO_MANY_WATCHERS

_log = Logger()

# Refused: a client has too many sessions or makes them too fast, or too many
# watch this session.
CLOSE_QUOTA_EXCEEDED = 4429
# A spectator's watch ended: its link was revoked or expired, or its session
# ended (or the link never worked).
CLOSE_WATCH_ENDED = 4410
# A spectator fell too far behind the session's output.
CLOSE_TOO_SLOW = 4411
READ_ONLY = "read_only"
READ_ONLY_MESSAGE = ("this is a read-only watch link: what you type and your terminal's size"
                     " are not sent to the session")


class _Phase(enum.Enum):
    """
    Where a connection is: C{NEW} until the handshake, then C{AWAITING_SIZE}
    (a new session needs the terminal's size first), C{SESSION} (attached
    to, or starting, a session), and C{DONE}.
    """

    NEW = "new"
    AWAITING_SIZE = "awaiting_size"
    SESSION = "session"
    WATCHING = "watching"
    DONE = "done"


class Watching:
    """
    The spectator's methods of the WebSocket protocol.
    """

    # -- a spectator: watches through a share link, never types ----------------

    def _start_watching(self) -> None:
        spectators = self.factory.spectators
        if spectators is None:
            self._refuse("capsule has no watch links here", "share_not_found",
                         CLOSE_WATCH_ENDED)
            return
        self._phase = _Phase.WATCHING
        try:
            session = spectators.watch(self._watch_token, self)
        except ShareRefused as e:
            self._refuse(e.message, e.code, CLOSE_QUOTA_EXCEEDED
                         if e.code == TOO_MANY_WATCHERS else CLOSE_WATCH_ENDED)
            return
        if self._phase is _Phase.WATCHING:
            self._session = session

    def _handle_watching(self, message) -> None:
        """
        A spectator's message: acknowledgements count, input and sizes are
        never passed on (it is told so once, then they are dropped).
        """
        if isinstance(message, wire.Ack):
            if message.offset > self._sent:
                raise wire.ProtocolError(
                    f"ack of offset {message.offset}, beyond the {self._sent} bytes sent",
                    "bad_ack")
            self._acked = max(self._acked, message.offset)
            self._send_backlog()
        elif isinstance(message, (wire.Input, wire.Resize)) and not self._told_read_only:
            self._told_read_only = True
            _log.info("spectator {peer} sent input or a size: dropped (read-only)",
                      peer=self.peer)
            self._manager.metrics.error_sent(READ_ONLY)
            self._send(wire.encode_error(READ_ONLY_MESSAGE, READ_ONLY))

    def watch_started(self, offset: int, replay: int, share, size: tuple[int, int]) -> None:
        self._sent = self._acked = offset
        acks = self._wire.acks
        self._send(wire.encode_watching(
            offset if acks else None, self.factory.flow_window if acks else None, replay,
            share.expires_at - self.factory.clock.seconds(), size))

    def watch_resized(self, cols: int, rows: int) -> None:
        if self._phase is _Phase.WATCHING:
            self._flush()
            self._send(wire.encode_size(cols, rows))

    def watch_output(self, data: bytes) -> None:
        """
        Output for a spectator: sent while it keeps up; held while its
        window or its transport is full, up to C{watch_backlog} bytes, past
        which it is closed.  It never holds the session back.
        """
        if self._phase is not _Phase.WATCHING:
            return
        if self._backlog or self._watch_blocked():
            self._backlog.append(data)
            self._backlog_bytes += len(data)
            if self._backlog_bytes > self.factory.watch_backlog:
                message = (f"this page fell more than {self.factory.watch_backlog} bytes"
                           " behind the session's output: reload it to watch again")
                _log.info("closed spectator {peer}: {message}", peer=self.peer,
                          message=message)
                session, self._session = self._session, None
                if session is not None:
                    self.factory.spectators.leave(session, self)
                self.watch_ended("too_slow", message, CLOSE_TOO_SLOW)
            return
        self._coalescer.push(data)

    def _watch_blocked(self) -> bool:
        if "outgoing" in self._not_reading:
            return True
        return self._wire.acks and (
            self._sent + self._coalescer.pending - self._acked >= self.factory.flow_window)

    def _send_backlog(self) -> None:
        while self._backlog and not self._watch_blocked() and self._phase is _Phase.WATCHING:
            data = self._backlog.pop(0)
            self._backlog_bytes -= len(data)
            self._coalescer.push(data)

    def watch_ended(self, code: str, message: str, close_code: int = CLOSE_WATCH_ENDED) -> None:
        self._session = None
        self._backlog, self._backlog_bytes = [], 0
        self._flush()
        self._manager.metrics.error_sent(code)
        self._send(wire.encode_error(message, code))
        self._close(close_code, message)
