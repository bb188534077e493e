"""
The shell's stream: one exec into a session's container, read by the reactor,
whose bytes are turned into inputs of the session's lifecycle.

Under the keeper (L{capsule.core.keeper}) the exec has no TTY: its stdout
carries the keeper's frames (output, whose first piece is the preamble, and
the shell's exit status) and its stdin takes the keeper's input and window
frames (L{KeeperProcess}).  Without it, the exec's bytes are the shell's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from capsule.core.channels import CHANNEL_FRAMES
from capsule.core.interfaces import IExecProcess
from capsule.core.keeper import (RELAY_FRAMES, FrameError, FrameReader, ListeningPorts,
                                 PreambleReader, check_preamble, encode_input, encode_window,
                                 exit_status, parse_ports)
from capsule.core.ratelog import RateLimitedLog
from capsule.engine.channels import ChannelMux, ChannelOptions

_log = Logger()


@dataclass
class ShellFacts:
    """
    What a shell's stream said before it closed: the exit status the keeper
    reported, the end of its stderr, the reason the stream gave, and
    whether the keeper said that another attach replaced this one (its
    C{k} frame: with replicas, most often another replica that took the
    session over).
    """

    exit_status: int | None = None
    stderr: bytes = b""
    reason: Failure | None = None
    replaced: bool = False


class ShellProtocol(ProcessProtocol):
    """
    Feeds what one exec of the shell does into its session's lifecycle.
    Under the keeper, the exec's stdout carries the keeper's frames (output,
    whose first piece is the preamble; the exit status) and its stderr any
    error the keeper or Docker reports.  An exec the session no longer uses
    (it was replaced, or the session let it go) is not heard.

    Every byte of the relay's stdout is the session user's to choose: a
    frame of a kind or size the relay does not send, a preamble that does
    not parse or says what cannot be, or an exit status no shell has ends
    the session at once (L{MALFORMED}), with one line in the log, and
    nothing more of that stream is read or held.

    @param session: the session it feeds: its C{events} (the lifecycle's
        inputs), C{core} and C{shell} (the protocol it listens to now).
    @param wanted: the offset the exec asks the keeper for (C{None}: not
        known), against which its preamble is checked.
    @param heard: called with each piece of output before the lifecycle
        gets it (its observers: recordings).
    @param channels: the keeper was asked for channels
        (L{capsule.engine.channels}); once its preamble says it carries
        them, C{channels} is their L{ChannelMux}, until the stream ends.
    @param ports: called with the L{ListeningPorts} each C{P} frame names
        (the keeper reads the container's socket table; no Docker call).
        A frame with ports no keeper sends (port 0, out of order) keeps
        what is sound and is logged, at a bounded rate.
    """

    MALFORMED = "the session's relay sent malformed data"

    # Errors a session's user can cause at will: logged once per kind per
    # session per minute, with a count.
    _errors = RateLimitedLog(_log)

    class _Malformed(Exception):
        "What the relay sent is impossible (the sentence says why)."

    # Whether it was said that the session image's keeper has no channels.
    _no_channels_said = False

    def __init__(self, session, keeper: bool, wanted: int | None = None,
                 heard: Callable[[bytes], None] | None = None, *,
                 channels: ChannelOptions | None = None,
                 ports: Callable[[ListeningPorts], None] | None = None) -> None:
        self._session = session
        self._heard = heard
        self._on_ports = ports
        self._channel_options = channels if keeper else None
        self.channels: ChannelMux | None = None
        kinds = RELAY_FRAMES if self._channel_options is None else {**RELAY_FRAMES,
                                                                     **CHANNEL_FRAMES}
        self._frames = FrameReader(kinds) if keeper else None
        self._preamble = PreambleReader() if keeper else None
        self._wanted = wanted
        self.facts = ShellFacts()
        self.process = None

    def makeConnection(self, transport) -> None:
        self.process = KeeperProcess(transport) if self._frames is not None else transport
        super().makeConnection(transport)
        if not self._current():
            transport.loseConnection()
            return
        self._session.events.stream_up(self.process)
        if self._frames is None:
            self._session.events.stream_started(self._session.replay.end, 0)

    def _current(self) -> bool:
        return self._session.shell is self

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if not self._current():
            return
        if self._frames is not None and childFD == 2:
            self.facts.stderr = (self.facts.stderr + data)[-2000:]
            return
        # An error in passing output on (a client's fault) must not break the
        # connection to the shell: log it and keep the shell.
        try:
            if self._frames is None:
                self._deliver(data)
            else:
                self._relayed(data)
        except self._Malformed as e:
            self._malformed(e.args[0])
        except Exception:
            self._errors.failure(self._session.core.now(), self._session.id, "output",
                                 "handling output of session {session_id} failed")

    def _relayed(self, data: bytes) -> None:
        try:
            frames = self._frames.feed(data)
            problem = None
        except FrameError as e:
            frames, problem = e.frames, e.message
        for kind, payload in frames:
            if not self._current():
                return
            if kind == b"o":
                self._output(payload)
            elif kind == b"x":
                try:
                    self.facts.exit_status = exit_status(payload)
                except ValueError as e:
                    raise self._Malformed(str(e)) from None
            elif kind in CHANNEL_FRAMES:
                if self.channels is None:
                    raise self._Malformed(f"a channel frame ({kind.decode()!r}) from a keeper"
                                          " that did not say it carries channels")
                self.channels.received(kind, payload)
            elif kind == b"P":
                self._ports(payload)
            elif kind == b"k":
                # The keeper closes this attach once it has sent this.
                self.facts.replaced = True
        if problem is not None and self._current():
            raise self._Malformed(problem)

    def _ports(self, payload: bytes) -> None:
        found, problem = parse_ports(payload)
        if problem is not None:
            self._errors.error(self._session.core.now(), self._session.id, "ports",
                               "session {session_id}'s keeper sent {problem}: those ignored",
                               problem=problem)
        if self._on_ports is not None:
            self._on_ports(found)

    def _output(self, data: bytes) -> None:
        if not self._preamble.done:
            preamble, data = self._preamble.feed(data)
            if self._preamble.missing:
                raise self._Malformed("output without the keeper's preamble first")
            if preamble is None:
                return
            problem = check_preamble(preamble, self._wanted)
            if problem is not None:
                raise self._Malformed(f"a preamble with {problem}")
            self._channels_up(preamble.channels)
            self._session.events.stream_started(preamble.offset, preamble.dropped)
            if not data:
                return
        self._deliver(data)

    def _channels_up(self, count: int | None) -> None:
        """
        The keeper said (C{count}) or did not say (C{None}) it carries channels.
        """
        if self._channel_options is None:
            return
        if count is None:
            if not ShellProtocol._no_channels_said:
                ShellProtocol._no_channels_said = True
                _log.warn("session {session_id}'s keeper carries no channels (a session image"
                          " older than capsule's): sessions without a network of their own"
                          " cannot reach the session door, nor be previewed (said once)",
                          session_id=self._session.id[:8])
            return
        if count < 1:
            raise self._Malformed(f"a preamble with {count} channels")
        core = self._session.core
        self.channels = ChannelMux(self._session.id, self.transport.write, count,
                                   self._channel_options, now=core.now)

    def _close_channels(self, reason: str) -> None:
        if self.channels is not None:
            self.channels.close_all(reason)

    def _deliver(self, data: bytes) -> None:
        if self._heard is not None:
            self._heard(data)
        self._session.events.output(data)

    def _malformed(self, problem: str) -> None:
        """
        The relay broke its framing or said what cannot be: stop reading
        it and end the session.  Its exec's end, which follows, is not
        heard.
        """
        session = self._session
        self._close_channels("its relay sent malformed data")
        if not self._current():
            return
        session.shell = None
        self._errors.error(session.core.now(), session.id, "malformed",
                           "session {session_id} ended: its relay sent malformed data"
                           " ({problem})", problem=problem)
        self.process.loseConnection()
        # A relay that does not read either must not keep what was written
        # to it waiting in capsule: drop the exec's connection.
        connection = getattr(self.transport, "transport", None)
        if connection is not None and hasattr(connection, "abortConnection"):
            connection.abortConnection()
        session.events.end(None, self.MALFORMED)

    def processEnded(self, reason: Failure) -> None:
        self._close_channels("it ended")
        if self._current():
            self._session.shell = None
            self.facts.reason = reason
            self._session.events.stream_closed(self.facts)


@implementer(IExecProcess, IPushProducer)
class KeeperProcess:
    """
    The shell under capsule-keeper, through a relay exec: input and terminal
    sizes go to the keeper as its frames; the rest is the exec's.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self.exec_id = stream.exec_id

    def write(self, data: bytes) -> None:
        self._stream.write(encode_input(data))

    def resize(self, cols: int, rows: int) -> None:
        self._stream.write(encode_window(cols, rows))

    def throttle_input(self, producer) -> None:
        self._stream.throttle_input(producer)

    def loseConnection(self) -> None:
        self._stream.loseConnection()

    def pauseProducing(self) -> None:
        self._stream.pauseProducing()

    def resumeProducing(self) -> None:
        self._stream.resumeProducing()

    def stopProducing(self) -> None:
        self._stream.stopProducing()


@implementer(IPushProducer)
class OutputThrottle:
    """
    Stands between a client's connection and a session's exec: the client's
    transport pauses the exec when it is full.  When the client's connection
    closes it calls C{stopProducing}, which must not end the shell, so this
    proxy only lets the exec resume.
    """

    def __init__(self, core) -> None:
        self._core = core

    def pauseProducing(self) -> None:
        if self._core.stream is not None:
            self._core.stream.pauseProducing()

    def resumeProducing(self) -> None:
        if self._core.stream is not None:
            self._core.stream.resumeProducing()

    def stopProducing(self) -> None:
        self.resumeProducing()
