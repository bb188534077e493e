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
    any running state --keep--> Keeping --kept--> Ended   (put away: the container is stopped
                                                          and kept, not removed)
    any kept state --let_go (capsule stops; the shell lives on)--> Ended
    any kept state --moved (another replica serves it now; its container is left)--> Ended

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

from automat import TypeMachineBuilder

from capsule.core.protocol import ProtocolError
from capsule.core.session_core import SessionCore, SessionEvents, State



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
Keeping = builder.state("Keeping")
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
          Keeping: State.KEEPING, Ending: State.ENDING, Ended: State.ENDED}
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
    core.go_live(offset)
    core.effects.went_live(core.owner, False)
    core.hand_over(False, None)


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
    core.take_over(client)


@Starting.upon(SessionEvents.detach).to(StartingOrphaned)
def _left_starting(session: SessionEvents, core: SessionCore, client: object,
                   unsent: int) -> None:
    # Nothing was handed to it yet: there is nothing to account for.
    core.leave(0)


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
    core.go_live(offset)
    core.left_at = core.now()
    core.want = None
    core.effects.went_live(core.owner, False)


@Preparing.upon(SessionEvents.stream_started).to(Attached)
def _prepared_for_client(session: SessionEvents, core: SessionCore, offset: int,
                         dropped: int) -> None:
    core.go_live(offset)
    core.effects.went_live(core.owner, False)
    want, core.want = core.want, None
    core.hand_over(True, want)


@PreparingAlone.upon(SessionEvents.attach).to(Preparing)
@Preparing.upon(SessionEvents.attach).loop()
@ResumingAlone.upon(SessionEvents.attach).to(Resuming)
def _attach_while_coming_up(session: SessionEvents, core: SessionCore, client: object,
                           offset: int | None) -> None:
    # It is handed over, from the offset it asked for, once the shell runs
    # (a new one, or the one resumed).
    core.take_over(client)
    core.want = offset


@Preparing.upon(SessionEvents.detach).to(PreparingAlone)
def _left_preparing(session: SessionEvents, core: SessionCore, client: object,
                    unsent: int) -> None:
    # Nothing was handed to it yet; the session is kept all the same.
    core.leave(0)
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


for _state in (Recovered, Interrupted, InterruptedAlone, Keeping, Ending, Ended):
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
    core.take_over(client)
    core.hand_over(True, offset)


@Detached.upon(SessionEvents.attach).to(Attached)
def _reconnected(session: SessionEvents, core: SessionCore, client: object,
                 offset: int | None) -> None:
    core.take_over(client)
    core.hand_over(True, offset)


@Detached.upon(SessionEvents.take).to(Attached)
def _taken(session: SessionEvents, core: SessionCore, client: object) -> None:
    """
    A new client's session, made before it came: it gets all the output so
    far, as the start of a new session.
    """
    core.take_over(client)
    core.hand_over(False, 0)


@Attached.upon(SessionEvents.detach).to(Detached)
def _left(session: SessionEvents, core: SessionCore, client: object, unsent: int) -> None:
    core.leave(unsent)
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
    core.take_over(client)
    core.want = offset
    if first:
        core.asked = 0 if offset is None else offset
        core.effects.reattach(core.owner, core.asked)


@Resuming.upon(SessionEvents.stream_started).to(Attached)
def _resumed(session: SessionEvents, core: SessionCore, offset: int, dropped: int) -> None:
    core.go_live(offset)
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
    core.hand_over(True, offset if want is None else want)


@Resuming.upon(SessionEvents.detach).to(ResumingAlone)
def _left_resuming(session: SessionEvents, core: SessionCore, client: object,
                   unsent: int) -> None:
    # The attach under way goes on (from the offset it asked for), and a
    # client that comes back meanwhile is handed over from there.
    core.leave(0)


@ResumingAlone.upon(SessionEvents.stream_started).to(Detached)
def _resumed_alone(session: SessionEvents, core: SessionCore, offset: int,
                   dropped: int) -> None:
    core.want = None
    core.go_live(offset)
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
    if core.go_live(offset):
        client.session_notice("engine_back", "the Docker engine answers again: the session"
                                             " goes on")
    else:
        # Output was lost meanwhile (the keeper's buffer overflowed: the
        # client hears how much), or the shell restarted (its offsets start
        # again): either way, the client is handed over again.
        core.handed = previous if offset > previous else core.replay.end + 1
        core.hand_over(True, None)
    core.effects.went_live(core.owner, True)


@ReattachingAlone.upon(SessionEvents.stream_started).to(Detached)
def _reattached_alone(session: SessionEvents, core: SessionCore, offset: int,
                      dropped: int) -> None:
    core.go_live(offset)
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
    core.take_over(client)
    core.hand_over(True, offset)
    if core.client is client:
        client.session_notice("engine_away", "capsule is reconnecting to the session's shell")


@Interrupted.upon(SessionEvents.detach).to(InterruptedAlone)
@Reattaching.upon(SessionEvents.detach).to(ReattachingAlone)
def _left_away(session: SessionEvents, core: SessionCore, client: object, unsent: int) -> None:
    core.leave(unsent)


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


for _state in (Attached, Detached, Recovered, Resuming, ResumingAlone, Interrupted,
               InterruptedAlone, Reattaching, ReattachingAlone):
    @_state.upon(SessionEvents.moved).to(Ended)
    def _moved(session: SessionEvents, core: SessionCore, message: str) -> None:
        """
        Another replica took the session's shell over and serves it now:
        its client hears so as from another tab (not an end: the session
        goes on there), nobody here finds it any more, and its container,
        now the other replica's, is not touched.
        """
        client, core.client = core.client, None
        core.effects.forget(core.owner)
        # (Said after it is forgotten: the session did not end, and is not
        # logged as ended; those who wait for its end hear this.)
        core.message = message
        if core.stream is not None:
            core.stream.loseConnection()
            core.stream = None
        if client is not None:
            client.session_taken_over()


for _state in (Starting, StartingOrphaned, Preparing, PreparingAlone):
    @_state.upon(SessionEvents.let_go).to(Ended)
    def _stop_starting(session: SessionEvents, core: SessionCore, message: str) -> bool:
        _start_failed(session, core, "the capsule server shut down", "restarting")
        return False


@Ending.upon(SessionEvents.removed).to(Ended)
def _removed(session: SessionEvents, core: SessionCore) -> None:
    pass


# -- put away: stopped and kept, not removed (capsule.sessions.keeping) ----------------

_KEEPABLE = (Attached, Detached, Recovered, Resuming, ResumingAlone, Interrupted,
             InterruptedAlone, Reattaching, ReattachingAlone)

for _state in _KEEPABLE:
    @_state.upon(SessionEvents.keep).to(Keeping)
    def _put_away(session: SessionEvents, core: SessionCore, message: str) -> None:
        """
        Its client hears why (that it is kept, and can be resumed), nobody
        finds it live any more, its stream is closed (the shell lives on
        until its container stops) and its container is stopped and kept.
        """
        core.message = message
        client, core.client = core.client, None
        core.effects.forget(core.owner)
        if core.stream is not None:
            core.stream.loseConnection()
            core.stream = None
        if client is not None:
            client.session_ended(None, message)
        core.effects.keep(core.owner)

for _state in (Starting, StartingOrphaned, Preparing, PreparingAlone, Keeping, Ending, Ended):
    # Nothing to keep yet (its container is being made: it ends as today),
    # or nothing any more.
    _state.upon(SessionEvents.keep).loop().returns(None)


@Keeping.upon(SessionEvents.kept).to(Ended)
def _kept(session: SessionEvents, core: SessionCore) -> None:
    pass


@Keeping.upon(SessionEvents.attach).loop()
def _being_kept(session: SessionEvents, core: SessionCore, client: object,
                offset: int | None) -> None:
    client.session_failed(core.message or "the session is being put away", "session_kept")


# Its container went while it was being put away: it is over all the same.
Keeping.upon(SessionEvents.removed).to(Ended)(_kept)
Ended.upon(SessionEvents.kept).loop().returns(None)


# Late news for a session that is over: a stream that comes up is closed; the
# rest changes nothing.
for _state in (Keeping, Ending, Ended):
    @_state.upon(SessionEvents.stream_up).loop()
    def _late_stream(session: SessionEvents, core: SessionCore, stream: object) -> None:
        stream.loseConnection()

    if _state is not Keeping:
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
    _state.upon(SessionEvents.moved).loop().returns(None)

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
