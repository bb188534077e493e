"""
A session's data (L{SessionCore}), what its lifecycle asks of the world
(L{ISessionEffects}), the inputs the lifecycle takes (L{SessionEvents}) and
the names of what a session is doing (L{State}).  The states and transitions
themselves are L{capsule.core.lifecycle}'s.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import Interface, implementer

from capsule.core.protocol import ProtocolError
from capsule.core.replay import ReplayBuffer

RESTARTED_NOTICE = ("the session's shell was restarted (its container restarted while"
                    " capsule was away): what it printed before is gone")


class State(str, enum.Enum):
    """
    What a session is doing, as its clients, the API and the log name it:
    one name for a state and its twin without a client.
    """

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    DETACHED = "detached"
    RECOVERED = "recovered"
    RESUMING = "resuming"
    INTERRUPTED = "interrupted"
    REATTACHING = "reattaching"
    KEEPING = "keeping"
    ENDING = "ending"
    ENDED = "ended"

    def __str__(self) -> str:
        return self.value

    @property
    def starting(self) -> bool:
        "Its shell has not run yet."
        return self in (State.NEW, State.STARTING)

    @property
    def over(self) -> bool:
        "It ended, is ending, or is being put away: nobody may use it any more."
        return self in (State.KEEPING, State.ENDING, State.ENDED)

    @property
    def waiting(self) -> bool:
        "Its shell runs (or ran, before capsule restarted) and no client is attached."
        return self in (State.DETACHED, State.RECOVERED)

    @property
    def keepable(self) -> bool:
        "Its shell ran and it is not over: it can be put away."
        return self in (State.RUNNING, State.DETACHED, State.RECOVERED, State.RESUMING,
                        State.INTERRUPTED, State.REATTACHING)

    @property
    def settled(self) -> bool:
        "Its shell runs, or waits to be resumed: nothing is under way."
        return self in (State.RUNNING, State.DETACHED, State.RECOVERED)


class ISessionEffects(Interface):
    """
    What a session's lifecycle asks of the world.  Each method starts the
    work and returns at once; its outcome is fed back as an input.
    """

    def make(session):
        """
        Create the session's container unless it has one, and start its
        shell: feed C{stream_up}, then C{stream_started}; or
        C{stream_failed}.
        """

    def reattach(session, offset):
        """
        Attach to the running shell again, asking for its output from
        C{offset}: feed C{stream_up}, then C{stream_started}; or C{end}
        (its container is gone) or C{engine_lost}.
        """

    def diagnose(session, facts):
        """
        The shell's stream closed, leaving C{facts}: find out why and feed C{end} (the shell
        or its container is over), C{stream_failed} (while starting), or
        C{engine_lost} (the engine cannot be reached).
        """

    def await_engine(session):
        """
        Retry until the engine answers, then feed C{engine_back} if the
        container still runs, or C{end} if it is gone.
        """

    def remove(session):
        """
        Remove the session's container (if any), then feed C{removed}.
        """

    def forget(session):
        """
        The session is over: no client can find it any more.
        """

    def keep(session):
        """
        Put the session away instead of removing it: save its screen, stop
        its container (kept, not removed), then feed C{kept}.
        """

    def went_live(session, resumed):
        """
        The session's shell runs and its stream is read (logging, pool).
        """


class InputOverrun(ProtocolError):
    """
    A client went on sending input long after it was asked to wait.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, "input_overrun")


@implementer(IPushProducer)
class InputGate:
    """
    Registered with the shell's stream as the producer of its input: while
    the stream does not take input in (the shell is not reading), the
    attached client's connection is not read either, so input waits in the
    client's socket, not in capsule's memory.  What arrives anyway (already
    read before the pause) is counted: past C{limit}, the client is
    overrunning.
    """

    def __init__(self, core: "SessionCore") -> None:
        self._core = core
        self.paused = False
        self.overrun = 0

    def _tell(self) -> None:
        if self._core.client is not None:
            self._core.client.pause_input(self.paused)

    def pauseProducing(self) -> None:
        changed = not self.paused
        self.paused, self.overrun = True, 0
        if changed:
            self._tell()

    def resumeProducing(self) -> None:
        changed = self.paused
        self.paused, self.overrun = False, 0
        if changed:
            self._tell()

    def stopProducing(self) -> None:
        # The stream is closing: nothing to wait for any more.
        self.resumeProducing()

    def count(self, data: bytes) -> None:
        if not self.paused:
            return
        self.overrun += len(data)
        if self.overrun > self._core.max_input_overrun:
            raise InputOverrun(
                f"more than {self._core.max_input_overrun} bytes of input arrived while the"
                " shell was not reading its input: the connection is closed")


@dataclass(eq=False)
class SessionCore:
    """
    The session's data.  Only the lifecycle's transitions change it.

    @ivar handed: the offset up to which output was handed to clients: where
        a client that reconnects without saying what it has resumes.
    @ivar left_at: when the last client left (C{None} while one is attached).
    @ivar want: the offset the client that is waiting for a reattach asked
        for (C{None}: what was handed).
    @ivar away_since, away_offset: when the last client left and the offset
        it had been handed then (C{None}: no client has left yet); kept
        while the next one attaches, whose C{connected} says what was
        printed meanwhile (L{away}).
    """

    id: str
    clock: object
    effects: ISessionEffects
    replay: ReplayBuffer
    size: tuple[int, int]
    max_pending_input: int
    created_at: float
    container_id: str | None = None
    warm: bool = False
    client: object | None = None
    stream: object | None = None
    handed: int = 0
    left_at: float | None = None
    want: int | None = None
    # The offset the keeper was last asked to resume from.
    asked: int | None = None
    pending: list[bytes] = field(default_factory=list)
    exit_code: int | None = None
    message: str | None = None
    # Ended by its owner's request: its container goes, whichever replica
    # (capsule.sessions.replicas) serves it now.
    owner_ended: bool = False
    # The last input or output, for --idle-timeout.
    active_at: float = 0.0
    # What the world knows this session as (its effects and clients get it).
    owner: object = None
    # Input a client may send after it was asked to wait (see InputGate).
    max_input_overrun: int = 1024 * 1024
    # The user who created the session (None: no authentication); only
    # that user may reconnect to it, replay it or export it.
    user: str | None = None
    # The CPU weight its container has now (see SessionManager._share_cpu).
    cpu_shares: int | None = None
    away_since: float | None = None
    away_offset: int = 0

    def __post_init__(self) -> None:
        self.input = InputGate(self)

    def now(self) -> float:
        return self.clock.seconds()

    # -- what the lifecycle's transitions share ---------------------------

    def go_live(self, offset: int) -> bool:
        """
        The stream is up and its output begins at C{offset}: write what was
        typed meanwhile.  Return whether the output continues where it was
        (C{False}: the shell's output restarted, and what was held is gone).
        """
        continuous = self.replay.end == offset
        if not continuous:
            self.replay.restart_at(offset)
        pending, self.pending = self.pending, []
        for data in pending:
            self.stream.write(data)
        self.active_at = self.now()
        return continuous

    def hand_over(self, resumed: bool, offset: int | None) -> None:
        """
        Tell C{self.client} where the output it gets begins, then send it what
        it has not had, from C{offset} (C{None}: from what was handed).
        """
        client = self.client
        wanted = self.handed if offset is None else offset
        restarted = wanted > self.replay.end
        data, dropped = self.replay.since(self.replay.start if restarted else wanted)
        first = self.replay.end - len(data)
        client.session_started(self.owner, resumed, first, len(data))
        if self.client is not client:
            return
        if restarted:
            client.session_notice("shell_restarted", RESTARTED_NOTICE)
        elif dropped:
            client.session_dropped(dropped, first)
        if data:
            client.session_output(data)
        self.handed = self.replay.end

    def take_over(self, client: object) -> None:
        """
        C{client} replaces the attached one: the newest connection wins (the
        older one is most often a dead socket from before a network change).
        """
        previous, self.client = self.client, client
        self.left_at = None
        if previous is not None and previous is not client:
            previous.session_taken_over()
        if self.input.paused:
            client.pause_input(True)

    def leave(self, unsent: int) -> None:
        self.client = None
        self.left_at = self.now()
        # Not clamped to what is held: bytes that never went out and are gone
        # by the next attach are reported to it as dropped.
        self.handed -= unsent
        self.away_since, self.away_offset = self.left_at, max(0, self.handed)

    def away(self) -> tuple[float, int] | None:
        """
        Since when no client was attached, and how many bytes the session
        printed since then that no client was handed; C{None} when it
        printed none (or no client ever left).
        """
        if self.away_since is None:
            return None
        printed = self.replay.end - self.away_offset
        return (self.away_since, printed) if printed > 0 else None


class SessionEvents(Protocol):
    """
    The inputs of a session's lifecycle.
    """

    def status(self) -> State:
        "What the session is doing (its state's name)."

    def start(self) -> None:
        "A new session: make its container and shell."

    def recover(self) -> None:
        "A session of an earlier run whose container still runs: attach again."

    def prepare(self) -> None:
        "A new session without a client: make its container and shell, and keep it."

    def stream_up(self, stream: object) -> None:
        "The shell's exec is connected; C{stream} is its L{IExecProcess}."

    def stream_started(self, offset: int, dropped: int) -> None:
        "The output that follows begins at C{offset}; C{dropped} bytes before it are lost."

    def stream_failed(self, message: str, code: str) -> None:
        "The container or the shell could not be made."

    def stream_closed(self, facts: object) -> None:
        "The shell's exec ended; C{facts} (what it said as it went) tell why."

    def engine_lost(self, message: str) -> None:
        "The engine cannot be reached; the container may well still run."

    def engine_back(self) -> None:
        "The engine answers again and the container still runs."

    def output(self, data: bytes) -> None:
        "Output of the shell."

    def attach(self, client: object, offset: int | None) -> None:
        "A client (re)connects, having the output up to C{offset}."

    def detach(self, client: object, unsent: int) -> None:
        "The client left; the last C{unsent} bytes handed to it never went out."

    def take(self, client: object) -> None:
        "A client takes a warm session (prepared, never attached) as its new session."

    def write(self, data: bytes) -> None:
        "Input from the client."

    def resize(self, cols: int, rows: int) -> None:
        "The client's terminal size."

    def end(self, exit_code: int | None, message: str) -> None:
        "The session is over (its shell exited, or capsule ends it)."

    def expire(self) -> bool:
        "The grace period is over; return whether that ended the session."

    def let_go(self, message: str) -> bool:
        "capsule stops; return whether the session lives on in its container."

    def moved(self, message: str) -> None:
        """
        Another capsule replica serves the session now (it took the shell
        over, L{capsule.sessions.replicas}): its client hears that it was
        taken over, as by another tab; nobody finds it here any more, its
        stream is closed, and its container is left alone.  C{message}
        says where it went.
        """

    def removed(self) -> None:
        "Its container is removed."

    def keep(self, message: str) -> None:
        """
        Put the session away: its client hears C{message}, nobody finds it
        live any more, and its container is stopped and kept, not removed
        (one starting or over is left as it is: see L{State.keepable}).
        """

    def kept(self) -> None:
        "Its container is stopped and kept."
