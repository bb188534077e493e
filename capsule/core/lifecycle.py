"""
A session's lifecycle, as one state machine: no I/O, the clock injected.

Everything that happens to a session arrives here as an input: what its
client does (attach, detach, write, resize), what its shell's stream does
(up, started at an offset, output, closed), what capsule learns about it
(the engine went away or came back, the shell is over) and what capsule
decides (end it, expire it, let it go because capsule stops).  Each state
says what each input means in it, so that no input can land in a state that
has no answer for it: an input with no transition is a bug and raises.

The states (a state and its C{...Alone}/C{...Orphaned} twin differ only in
whether a client is attached)::

    New -start-> Starting --stream_started--> Attached <-attach/detach-> Detached
                 (client left: StartingOrphaned, which ends once started)
    New -prepare-> PreparingAlone --stream_started--> Detached   (no client: kept)
                   (a client attached meanwhile: Preparing --stream_started--> Attached)
    Detached -take-> Attached   (a warm session's first client: a new session to it)
    New -recover-> Recovered -attach-> Resuming(Alone) --stream_started--> Attached/Detached
    Attached/Detached --stream_closed--> Interrupted(Alone)   (cause being found)
    Interrupted(Alone) --engine_lost--> itself, waiting for the engine
                       --engine_back--> Reattaching(Alone) --stream_started--> Attached/Detached
    any live state --end--> Ending --removed--> Ended;  Detached/Recovered --expire--> Ending
    any kept state --let_go (capsule stops; the shell lives on)--> Ended

Input typed while there is no stream (starting, resuming, interrupted,
reattaching) is held, bounded, and written to the shell once, in order, by
whichever transition brings a stream up.

Work that needs the outside world (make a container, attach to its keeper,
find out why a stream closed, wait for the engine, remove a container) is
asked of an L{ISessionEffects}; its outcome comes back as an input.  Output
offsets have one owner: the session's replay buffer says where output is,
and C{handed} how far it went to clients.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from automat import TypeMachineBuilder
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
        "It ended, or is ending: nobody may use it any more."
        return self in (State.ENDING, State.ENDED)

    @property
    def waiting(self) -> bool:
        "Its shell runs (or ran, before capsule restarted) and no client is attached."
        return self in (State.DETACHED, State.RECOVERED)

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

    def __post_init__(self) -> None:
        self.input = InputGate(self)

    def now(self) -> float:
        return self.clock.seconds()


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

    def removed(self) -> None:
        "Its container is removed."


builder = TypeMachineBuilder(SessionEvents, SessionCore)

New = builder.state("New")
Starting = builder.state("Starting")
StartingOrphaned = builder.state("StartingOrphaned")
Preparing = builder.state("Preparing")
PreparingAlone = builder.state("PreparingAlone")
Attached = builder.state("Attached")
Detached = builder.state("Detached")
Recovered = builder.state("Recovered")
Resuming = builder.state("Resuming")
ResumingAlone = builder.state("ResumingAlone")
Interrupted = builder.state("Interrupted")
InterruptedAlone = builder.state("InterruptedAlone")
Reattaching = builder.state("Reattaching")
ReattachingAlone = builder.state("ReattachingAlone")
Ending = builder.state("Ending")
Ended = builder.state("Ended")

_LIVE = [Starting, StartingOrphaned, Preparing, PreparingAlone, Attached, Detached, Recovered,
         Resuming, ResumingAlone,
         Interrupted, InterruptedAlone, Reattaching, ReattachingAlone]
_NAMES = {New: State.NEW, Starting: State.STARTING, StartingOrphaned: State.STARTING,
          Preparing: State.STARTING, PreparingAlone: State.STARTING, Attached: State.RUNNING,
          Detached: State.DETACHED, Recovered: State.RECOVERED, Resuming: State.RESUMING,
          ResumingAlone: State.RESUMING,
          Interrupted: State.INTERRUPTED, InterruptedAlone: State.INTERRUPTED,
          Reattaching: State.REATTACHING, ReattachingAlone: State.REATTACHING,
          Ending: State.ENDING, Ended: State.ENDED}
for _state, _name in _NAMES.items():
    _state.upon(SessionEvents.status).loop().returns(_name)


# -- what the transitions share ---------------------------------------------------

def _buffer(session: SessionEvents, core: SessionCore, data: bytes) -> None:
    """
    Hold input while there is no stream to write it to; it goes to the
    shell, in order and once, as soon as a stream is up (L{_go_live}).
    """
    held = sum(map(len, core.pending))
    if held + len(data) > core.max_pending_input:
        raise ProtocolError(
            "the session is not connected to its shell right now and its input buffer"
            f" ({core.max_pending_input} bytes) is full: input was dropped", "input_dropped")
    core.pending.append(data)
    core.active_at = core.now()


def _go_live(core: SessionCore, offset: int) -> bool:
    """
    The stream is up and its output begins at C{offset}: write what was
    typed meanwhile.  Return whether the output continues where it was
    (C{False}: the shell's output restarted, and what was held is gone).
    """
    continuous = core.replay.end == offset
    if not continuous:
        core.replay.restart_at(offset)
    pending, core.pending = core.pending, []
    for data in pending:
        core.stream.write(data)
    core.active_at = core.now()
    return continuous


def _hand_over(session: SessionEvents, core: SessionCore, resumed: bool,
               offset: int | None) -> None:
    """
    Tell C{core.client} where the output it gets begins, then send it what
    it has not had, from C{offset} (C{None}: from what was handed).
    """
    client = core.client
    wanted = core.handed if offset is None else offset
    restarted = wanted > core.replay.end
    data, dropped = core.replay.since(core.replay.start if restarted else wanted)
    first = core.replay.end - len(data)
    client.session_started(core.owner, resumed, first, len(data))
    if core.client is not client:
        return
    if restarted:
        client.session_notice("shell_restarted", RESTARTED_NOTICE)
    elif dropped:
        client.session_dropped(dropped, first)
    if data:
        client.session_output(data)
    core.handed = core.replay.end


def _take_over(core: SessionCore, client: object) -> None:
    """
    C{client} replaces the attached one: the newest connection wins (the
    older one is most often a dead socket from before a network change).
    """
    previous, core.client = core.client, client
    core.left_at = None
    if previous is not None and previous is not client:
        previous.session_taken_over()
    if core.input.paused:
        client.pause_input(True)


def _leave(core: SessionCore, unsent: int) -> None:
    core.client = None
    core.left_at = core.now()
    # Not clamped to what is held: bytes that never went out and are gone
    # by the next attach are reported to it as dropped.
    core.handed -= unsent


def _finish(session: SessionEvents, core: SessionCore, exit_code: int | None,
            message: str) -> None:
    """
    The session is over: its client hears why, nobody finds it any more,
    its stream is closed and its container removed.
    """
    core.exit_code, core.message = exit_code, message
    client, core.client = core.client, None
    core.effects.forget(core.owner)
    if core.stream is not None:
        core.stream.loseConnection()
    if client is not None:
        client.session_ended(exit_code, message)
    core.effects.remove(core.owner)


# -- New ---------------------------------------------------------------------------

@New.upon(SessionEvents.start).to(Starting)
def _start(session: SessionEvents, core: SessionCore) -> None:
    core.effects.make(core.owner)


@New.upon(SessionEvents.prepare).to(PreparingAlone)
def _prepare(session: SessionEvents, core: SessionCore) -> None:
    core.effects.make(core.owner)


@New.upon(SessionEvents.recover).to(Recovered)
def _recover(session: SessionEvents, core: SessionCore) -> None:
    core.left_at = core.now()


# -- a stream coming up --------------------------------------------------------------

for _state in (Starting, StartingOrphaned, Preparing, PreparingAlone, Resuming, ResumingAlone,
               Reattaching, ReattachingAlone):
    @_state.upon(SessionEvents.stream_up).loop()
    def _stream_up(session: SessionEvents, core: SessionCore, stream: object) -> None:
        core.stream = stream
        core.input.resumeProducing()
        stream.throttle_input(core.input)
        stream.resize(*core.size)


# -- starting --------------------------------------------------------------------------

@Starting.upon(SessionEvents.stream_started).to(Attached)
def _started(session: SessionEvents, core: SessionCore, offset: int, dropped: int) -> None:
    _go_live(core, offset)
    core.effects.went_live(core.owner, False)
    _hand_over(session, core, False, None)


@StartingOrphaned.upon(SessionEvents.stream_started).to(Ending)
def _started_without_client(session: SessionEvents, core: SessionCore, offset: int,
                            dropped: int) -> None:
    _finish(session, core, None, "the client left before the session started")


@Starting.upon(SessionEvents.stream_failed).to(Ended)
@StartingOrphaned.upon(SessionEvents.stream_failed).to(Ended)
@Preparing.upon(SessionEvents.stream_failed).to(Ended)
@PreparingAlone.upon(SessionEvents.stream_failed).to(Ended)
def _start_failed(session: SessionEvents, core: SessionCore, message: str, code: str) -> None:
    """
    The session never ran: its client hears that it could not be started.
    """
    core.message = message
    client, core.client = core.client, None
    core.effects.forget(core.owner)
    if core.stream is not None:
        core.stream.loseConnection()
    if client is not None:
        client.session_failed(message, code)
    core.effects.remove(core.owner)


@Starting.upon(SessionEvents.stream_closed).loop()
@StartingOrphaned.upon(SessionEvents.stream_closed).loop()
@Preparing.upon(SessionEvents.stream_closed).loop()
@PreparingAlone.upon(SessionEvents.stream_closed).loop()
def _closed_while_starting(session: SessionEvents, core: SessionCore, facts: object) -> None:
    core.stream = None
    core.effects.diagnose(core.owner, facts)


@Starting.upon(SessionEvents.attach).loop()
@StartingOrphaned.upon(SessionEvents.attach).to(Starting)
def _attach_while_starting(session: SessionEvents, core: SessionCore, client: object,
                           offset: int | None) -> None:
    _take_over(core, client)


@Starting.upon(SessionEvents.detach).to(StartingOrphaned)
def _left_starting(session: SessionEvents, core: SessionCore, client: object,
                   unsent: int) -> None:
    # Nothing was handed to it yet: there is nothing to account for.
    _leave(core, 0)


@Starting.upon(SessionEvents.end).to(Ended)
@StartingOrphaned.upon(SessionEvents.end).to(Ended)
@Preparing.upon(SessionEvents.end).to(Ended)
@PreparingAlone.upon(SessionEvents.end).to(Ended)
def _over_before_start(session: SessionEvents, core: SessionCore, exit_code: int | None,
                       message: str) -> None:
    _start_failed(session, core, message, "start_failed")


@Starting.upon(SessionEvents.engine_lost).to(Ended)
@StartingOrphaned.upon(SessionEvents.engine_lost).to(Ended)
@Preparing.upon(SessionEvents.engine_lost).to(Ended)
@PreparingAlone.upon(SessionEvents.engine_lost).to(Ended)
def _engine_lost_starting(session: SessionEvents, core: SessionCore, message: str) -> None:
    _start_failed(session, core, message, "docker_unavailable")


# -- preparing: a session made without a client, kept once it runs ------------------------

@PreparingAlone.upon(SessionEvents.stream_started).to(Detached)
def _prepared(session: SessionEvents, core: SessionCore, offset: int, dropped: int) -> None:
    """
    Its shell runs and nobody watches yet: it is kept for the grace period,
    from now, like a session whose client left.
    """
    _go_live(core, offset)
    core.left_at = core.now()
    core.want = None
    core.effects.went_live(core.owner, False)


@Preparing.upon(SessionEvents.stream_started).to(Attached)
def _prepared_for_client(session: SessionEvents, core: SessionCore, offset: int,
                         dropped: int) -> None:
    _go_live(core, offset)
    core.effects.went_live(core.owner, False)
    want, core.want = core.want, None
    _hand_over(session, core, True, want)


@PreparingAlone.upon(SessionEvents.attach).to(Preparing)
@Preparing.upon(SessionEvents.attach).loop()
@ResumingAlone.upon(SessionEvents.attach).to(Resuming)
def _attach_while_starting(session: SessionEvents, core: SessionCore, client: object,
                           offset: int | None) -> None:
    # It is handed over, from the offset it asked for, once the shell runs
    # (a new one, or the one resumed).
    _take_over(core, client)
    core.want = offset


@Preparing.upon(SessionEvents.detach).to(PreparingAlone)
def _left_preparing(session: SessionEvents, core: SessionCore, client: object,
                    unsent: int) -> None:
    # Nothing was handed to it yet; the session is kept all the same.
    _leave(core, 0)
    core.want = None


# -- running -------------------------------------------------------------------------

@Attached.upon(SessionEvents.output).loop()
def _output_to_client(session: SessionEvents, core: SessionCore, data: bytes) -> None:
    start = core.replay.end
    core.replay.append(data)
    core.active_at = core.now()
    if core.handed > start:
        # The client already has the beginning of this (it resumed further on
        # than the stream began, see _resumed): it gets only what follows.
        data = data[core.handed - start:]
    core.handed = max(core.handed, core.replay.end)
    if data:
        core.client.session_output(data)


for _state in (Starting, StartingOrphaned, Preparing, PreparingAlone, Detached, Resuming,
               ResumingAlone, Interrupted, InterruptedAlone, Reattaching, ReattachingAlone):
    @_state.upon(SessionEvents.output).loop()
    def _output_kept(session: SessionEvents, core: SessionCore, data: bytes) -> None:
        core.replay.append(data)
        core.active_at = core.now()


@Attached.upon(SessionEvents.write).loop()
def _write(session: SessionEvents, core: SessionCore, data: bytes) -> None:
    core.input.count(data)
    core.active_at = core.now()
    core.stream.write(data)


for _state in (Starting, Preparing, Resuming, Interrupted, Reattaching):
    _state.upon(SessionEvents.write).loop()(_buffer)


@Attached.upon(SessionEvents.resize).loop()
@Detached.upon(SessionEvents.resize).loop()
def _resize(session: SessionEvents, core: SessionCore, cols: int, rows: int) -> None:
    core.size = (cols, rows)
    core.stream.resize(cols, rows)


for _state in (Recovered, Interrupted, InterruptedAlone, Ending, Ended):
    @_state.upon(SessionEvents.resize).loop()
    def _remember_size(session: SessionEvents, core: SessionCore, cols: int, rows: int) -> None:
        # Applied when the next stream comes up.
        core.size = (cols, rows)


for _state in (Starting, StartingOrphaned, Preparing, PreparingAlone, Resuming, ResumingAlone,
               Reattaching, ReattachingAlone):
    @_state.upon(SessionEvents.resize).loop()
    def _size_while_coming_up(session: SessionEvents, core: SessionCore, cols: int,
                              rows: int) -> None:
        # A stream that is up but whose output has not started yet gets it
        # now; otherwise it is applied when the stream comes up.
        core.size = (cols, rows)
        if core.stream is not None:
            core.stream.resize(cols, rows)


@Attached.upon(SessionEvents.attach).loop()
def _taken_over(session: SessionEvents, core: SessionCore, client: object,
                offset: int | None) -> None:
    _take_over(core, client)
    _hand_over(session, core, True, offset)


@Detached.upon(SessionEvents.attach).to(Attached)
def _reconnected(session: SessionEvents, core: SessionCore, client: object,
                 offset: int | None) -> None:
    _take_over(core, client)
    _hand_over(session, core, True, offset)


@Detached.upon(SessionEvents.take).to(Attached)
def _taken(session: SessionEvents, core: SessionCore, client: object) -> None:
    """
    A new client's session, made before it came: it gets all the output so
    far, as the start of a new session.
    """
    _take_over(core, client)
    _hand_over(session, core, False, 0)


@Attached.upon(SessionEvents.detach).to(Detached)
def _left(session: SessionEvents, core: SessionCore, client: object, unsent: int) -> None:
    _leave(core, unsent)
    # Nobody is watching, but the work must not stall.
    core.stream.resumeProducing()


@Attached.upon(SessionEvents.stream_closed).to(Interrupted)
@Detached.upon(SessionEvents.stream_closed).to(InterruptedAlone)
@Reattaching.upon(SessionEvents.stream_closed).to(Interrupted)
@ReattachingAlone.upon(SessionEvents.stream_closed).to(InterruptedAlone)
def _interrupted(session: SessionEvents, core: SessionCore, facts: object) -> None:
    core.stream = None
    core.effects.diagnose(core.owner, facts)


# -- found again after capsule restarted ------------------------------------------------

@Recovered.upon(SessionEvents.attach).to(Resuming)
@Resuming.upon(SessionEvents.attach).loop()
def _resume(session: SessionEvents, core: SessionCore, client: object,
            offset: int | None) -> None:
    """
    Its client is back: attach to the keeper, asking for what the client
    lacks.  (A second client while that is under way replaces the first.)
    """
    first = core.client is None
    _take_over(core, client)
    core.want = offset
    if first:
        core.asked = 0 if offset is None else offset
        core.effects.reattach(core.owner, core.asked)


@Resuming.upon(SessionEvents.stream_started).to(Attached)
def _resumed(session: SessionEvents, core: SessionCore, offset: int, dropped: int) -> None:
    _go_live(core, offset)
    core.effects.went_live(core.owner, True)
    want, core.want = core.want, None
    if want is not None and want > offset == core.asked:
        # A client took over while the keeper was asked for an earlier offset
        # (the first client's): the output it lacks is still to come from the
        # stream, so it starts where it is and gets only what follows.
        client = core.client
        client.session_started(core.owner, True, want, 0)
        if core.client is client:
            core.handed = want
        return
    _hand_over(session, core, True, offset if want is None else want)


@Resuming.upon(SessionEvents.detach).to(ResumingAlone)
def _left_resuming(session: SessionEvents, core: SessionCore, client: object,
                   unsent: int) -> None:
    # The attach under way goes on (from the offset it asked for), and a
    # client that comes back meanwhile is handed over from there.
    _leave(core, 0)


@ResumingAlone.upon(SessionEvents.stream_started).to(Detached)
def _resumed_alone(session: SessionEvents, core: SessionCore, offset: int,
                   dropped: int) -> None:
    core.want = None
    _go_live(core, offset)
    core.effects.went_live(core.owner, True)


@ResumingAlone.upon(SessionEvents.engine_lost).to(Recovered)
def _resume_alone_failed(session: SessionEvents, core: SessionCore, message: str) -> None:
    if core.stream is not None:
        core.stream.loseConnection()
        core.stream = None
    core.want = None


@ResumingAlone.upon(SessionEvents.stream_closed).to(Recovered)
def _resume_alone_closed(session: SessionEvents, core: SessionCore, facts: object) -> None:
    core.stream = None
    core.want = None


@Resuming.upon(SessionEvents.engine_lost).to(Recovered)
def _resume_failed(session: SessionEvents, core: SessionCore, message: str) -> None:
    # It stays recoverable: its client may try again once the engine is back.
    if core.stream is not None:
        core.stream.loseConnection()
        core.stream = None
    client, core.client = core.client, None
    core.left_at = core.now()
    core.want = None
    client.session_failed(message, "docker_unavailable")


@Resuming.upon(SessionEvents.stream_closed).to(Recovered)
def _resume_closed(session: SessionEvents, core: SessionCore, facts: object) -> None:
    core.stream = None
    _resume_failed(session, core, "the connection to the session's shell closed while it"
                                  " was being resumed: try again")


# -- away from the shell: the stream closed, or is being attached again --------------------

@Interrupted.upon(SessionEvents.engine_lost).loop()
@InterruptedAlone.upon(SessionEvents.engine_lost).loop()
def _engine_lost(session: SessionEvents, core: SessionCore, message: str) -> None:
    if core.client is not None:
        core.client.session_notice("engine_away", message)
    core.effects.await_engine(core.owner)


@Reattaching.upon(SessionEvents.engine_lost).to(Interrupted)
@ReattachingAlone.upon(SessionEvents.engine_lost).to(InterruptedAlone)
def _reattach_lost(session: SessionEvents, core: SessionCore, message: str) -> None:
    if core.stream is not None:
        core.stream.loseConnection()
        core.stream = None
    _engine_lost(session, core, message)


@Interrupted.upon(SessionEvents.engine_back).to(Reattaching)
@InterruptedAlone.upon(SessionEvents.engine_back).to(ReattachingAlone)
def _engine_back(session: SessionEvents, core: SessionCore) -> None:
    core.effects.reattach(core.owner, core.replay.end)


@Reattaching.upon(SessionEvents.stream_started).to(Attached)
def _reattached(session: SessionEvents, core: SessionCore, offset: int, dropped: int) -> None:
    client = core.client
    previous = core.replay.end
    if _go_live(core, offset):
        client.session_notice("engine_back", "the Docker engine answers again: the session"
                                             " goes on")
    else:
        # Output was lost meanwhile (the keeper's buffer overflowed: the
        # client hears how much), or the shell restarted (its offsets start
        # again): either way, the client is handed over again.
        core.handed = previous if offset > previous else core.replay.end + 1
        _hand_over(session, core, True, None)
    core.effects.went_live(core.owner, True)


@ReattachingAlone.upon(SessionEvents.stream_started).to(Detached)
def _reattached_alone(session: SessionEvents, core: SessionCore, offset: int,
                      dropped: int) -> None:
    _go_live(core, offset)
    core.effects.went_live(core.owner, True)


@Interrupted.upon(SessionEvents.attach).loop()
@InterruptedAlone.upon(SessionEvents.attach).to(Interrupted)
@Reattaching.upon(SessionEvents.attach).loop()
@ReattachingAlone.upon(SessionEvents.attach).to(Reattaching)
def _attach_while_away(session: SessionEvents, core: SessionCore, client: object,
                       offset: int | None) -> None:
    """
    What the shell printed is all here: the client gets it at once, and
    hears that the shell itself is out of reach for now.
    """
    _take_over(core, client)
    _hand_over(session, core, True, offset)
    if core.client is client:
        client.session_notice("engine_away", "capsule is reconnecting to the session's shell")


@Interrupted.upon(SessionEvents.detach).to(InterruptedAlone)
@Reattaching.upon(SessionEvents.detach).to(ReattachingAlone)
def _left_away(session: SessionEvents, core: SessionCore, client: object, unsent: int) -> None:
    _leave(core, unsent)


# -- ending ----------------------------------------------------------------------------

for _state in _LIVE:
    if _state not in (Starting, StartingOrphaned, Preparing, PreparingAlone):
        _state.upon(SessionEvents.end).to(Ending)(_finish)
    if _state not in (Detached, Recovered):
        _state.upon(SessionEvents.expire).loop().returns(False)


@Detached.upon(SessionEvents.expire).to(Ending)
@Recovered.upon(SessionEvents.expire).to(Ending)
def _expired(session: SessionEvents, core: SessionCore) -> bool:
    _finish(session, core, None, "the session expired")
    return True


for _state in (Attached, Detached, Recovered, Resuming, ResumingAlone, Interrupted,
               InterruptedAlone, Reattaching, ReattachingAlone):
    @_state.upon(SessionEvents.let_go).to(Ended)
    def _let_go(session: SessionEvents, core: SessionCore, message: str) -> bool:
        """
        capsule stops; the shell lives on under its keeper, in its container.
        """
        client, core.client = core.client, None
        if client is not None:
            client.session_interrupted(message)
        if core.stream is not None:
            core.stream.loseConnection()
        return True


for _state in (Starting, StartingOrphaned, Preparing, PreparingAlone):
    @_state.upon(SessionEvents.let_go).to(Ended)
    def _stop_starting(session: SessionEvents, core: SessionCore, message: str) -> bool:
        _start_failed(session, core, "the capsule server shut down", "restarting")
        return False


@Ending.upon(SessionEvents.removed).to(Ended)
def _removed(session: SessionEvents, core: SessionCore) -> None:
    pass


# Late news for a session that is over: a stream that comes up is closed; the
# rest changes nothing.
for _state in (Ending, Ended):
    @_state.upon(SessionEvents.stream_up).loop()
    def _late_stream(session: SessionEvents, core: SessionCore, stream: object) -> None:
        stream.loseConnection()

    @_state.upon(SessionEvents.attach).loop()
    def _too_late(session: SessionEvents, core: SessionCore, client: object,
                  offset: int | None) -> None:
        client.session_failed(core.message or "the session has ended", "session_not_found")

    for _input in (SessionEvents.stream_started, SessionEvents.stream_failed,
                   SessionEvents.stream_closed, SessionEvents.engine_lost,
                   SessionEvents.engine_back, SessionEvents.end, SessionEvents.detach,
                   SessionEvents.write, SessionEvents.output):
        _state.upon(_input).loop().returns(None)
    _state.upon(SessionEvents.expire).loop().returns(False)
    _state.upon(SessionEvents.let_go).loop().returns(False)

Ended.upon(SessionEvents.removed).loop().returns(None)

# News that a live state can meet late (from a stream or a client that was
# replaced), and that changes nothing there.
for _state, _inputs in {
    Starting: (SessionEvents.engine_back,),
    StartingOrphaned: (SessionEvents.engine_back, SessionEvents.detach, SessionEvents.write),
    Preparing: (SessionEvents.engine_back,),
    PreparingAlone: (SessionEvents.engine_back, SessionEvents.detach, SessionEvents.write),
    Attached: (SessionEvents.engine_lost, SessionEvents.engine_back,
               SessionEvents.stream_started, SessionEvents.stream_failed),
    Detached: (SessionEvents.detach, SessionEvents.write, SessionEvents.engine_lost,
               SessionEvents.engine_back, SessionEvents.stream_started,
               SessionEvents.stream_failed),
    Recovered: (SessionEvents.detach, SessionEvents.write, SessionEvents.engine_lost,
                SessionEvents.engine_back, SessionEvents.stream_failed,
                SessionEvents.stream_closed),
    Resuming: (SessionEvents.engine_back, SessionEvents.stream_failed),
    ResumingAlone: (SessionEvents.detach, SessionEvents.write, SessionEvents.engine_back,
                    SessionEvents.stream_failed),
    Interrupted: (SessionEvents.stream_failed, SessionEvents.stream_closed),
    InterruptedAlone: (SessionEvents.detach, SessionEvents.write, SessionEvents.stream_failed,
                       SessionEvents.stream_closed),
    Reattaching: (SessionEvents.engine_back, SessionEvents.stream_failed),
    ReattachingAlone: (SessionEvents.detach, SessionEvents.write, SessionEvents.engine_back,
                       SessionEvents.stream_failed),
}.items():
    for _input in _inputs:
        _state.upon(_input).loop().returns(None)

del _state, _input, _inputs, _name

make_lifecycle = builder.build()
