"""
The session lifecycle (L{capsule.core.lifecycle}) driven directly, in memory.

Each state is reached through inputs alone, from a fresh machine whose
effects, clients and streams record what is done to them, with a Clock for
time.  Every (state, input) pair is either in the table below, with where it
leads and what it returns, or listed as impossible with the reason; every
transition of the table is fed once, and each one's effects are asserted
exactly in the tests that follow it.
"""

import inspect

import pytest
from automat import NoTransition
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from capsule.core import lifecycle
from capsule.core.interfaces import IExecProcess, ISessionClient
from capsule.core.lifecycle import make_lifecycle
from capsule.core.session_core import ISessionEffects, SessionCore, SessionEvents
from capsule.core.protocol import ProtocolError
from capsule.core.replay import ReplayBuffer
from tests.support.fakes import RecordingClient

SID = "2f1c7a8e-5b7d-4c4e-9f55-0c6d3b9e1a42"
START = 1000.0


class ShellFacts:
    """
    What a closed stream said; the lifecycle only passes it on.
    """


FACTS = ShellFacts()
MOVED = "the session is served by another capsule replica (rb) now"


@implementer(ISessionEffects)
class RecordingEffects:
    """
    Records each piece of work the lifecycle asks for; none feeds an input back.
    """

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def make(self, session):
        self.calls.append(("make", session))

    def reattach(self, session, offset):
        self.calls.append(("reattach", session, offset))

    def diagnose(self, session, facts):
        self.calls.append(("diagnose", session, facts))

    def await_engine(self, session):
        self.calls.append(("await_engine", session))

    def remove(self, session):
        self.calls.append(("remove", session))

    def forget(self, session):
        self.calls.append(("forget", session))

    def keep(self, session):
        self.calls.append(("keep", session))

    def went_live(self, session, resumed):
        self.calls.append(("went_live", session, resumed))


@implementer(IExecProcess)
class RecordingStream:
    """
    A shell's stream that records what is done to it.
    """

    exec_id = "exec-1"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    @property
    def written(self) -> list[bytes]:
        return [c[1] for c in self.calls if c[0] == "write"]

    def write(self, data):
        self.calls.append(("write", data))

    def throttle_input(self, producer):
        self.input_producer = producer

    def resize(self, cols, rows):
        self.calls.append(("resize", cols, rows))

    def loseConnection(self):
        self.calls.append(("lose",))

    def pauseProducing(self):
        self.calls.append(("pause",))

    def resumeProducing(self):
        self.calls.append(("resume",))


class SessionStandIn:
    """
    What the world knows the session as (the manager's C{Session}).
    """

    id = SID


class Rig:
    """
    One lifecycle and everything it acts on.  C{client} is the client the
    session was made for or last attached (it stays set after it left, to
    check that it hears nothing more).
    """

    def __init__(self, client: bool = True, max_pending_input: int = 16,
                 replay_bytes: int = 64) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.effects = RecordingEffects()
        self.owner = SessionStandIn()
        self.clients: list[RecordingClient] = []
        self.streams: list[RecordingStream] = []
        self.client = self.new_client() if client else None
        self.core = SessionCore(
            id=SID, clock=self.clock, effects=self.effects,
            replay=ReplayBuffer(replay_bytes), size=(80, 24),
            max_pending_input=max_pending_input, created_at=START, active_at=START,
            client=self.client, owner=self.owner)
        self.lc = make_lifecycle(self.core)

    @property
    def state(self) -> str:
        # automat has no public accessor for an instance's state.
        return self.lc.__automat_transitioner__._state.name

    @property
    def stream(self) -> RecordingStream:
        return self.streams[-1]

    def new_client(self) -> RecordingClient:
        client = RecordingClient()
        self.clients.append(client)
        return client

    def stream_up(self) -> RecordingStream:
        stream = RecordingStream()
        self.streams.append(stream)
        self.lc.stream_up(stream)
        return stream

    def attach(self, offset=None) -> RecordingClient:
        self.client = self.new_client()
        self.lc.attach(self.client, offset)
        return self.client

    def quiet(self) -> bool:
        """
        Whether nothing at all was done to the effects, clients or streams.
        """
        return (self.effects.calls == [] and all(c.events == [] for c in self.clients)
                and all(s.calls == [] for s in self.streams))

    def settled(self, state: str) -> "Rig":
        """
        Check the rig is in C{state}, and forget what it took to get there.
        """
        assert self.state == state
        self.effects.calls.clear()
        for client in self.clients:
            client.events.clear()
        for stream in self.streams:
            stream.calls.clear()
        return self

    def snapshot(self) -> tuple:
        core = self.core
        return (self.state, core.client, core.stream, core.handed, core.left_at, core.want,
                list(core.pending), core.size, core.exit_code, core.message, core.active_at,
                core.replay.start, core.replay.end, core.replay.since(0))


# -- each state, reached through inputs only --------------------------------------------

def new(**kw) -> Rig:
    return Rig(**kw).settled("New")


def starting(**kw) -> Rig:
    rig = Rig(**kw)
    rig.lc.start()
    return rig.settled("Starting")


def starting_orphaned(**kw) -> Rig:
    rig = starting(**kw)
    rig.lc.detach(rig.client, 0)
    return rig.settled("StartingOrphaned")


def preparing_alone(**kw) -> Rig:
    rig = Rig(client=False, **kw)
    rig.lc.prepare()
    return rig.settled("PreparingAlone")


def preparing(**kw) -> Rig:
    rig = preparing_alone(**kw)
    rig.attach(0)
    return rig.settled("Preparing")


def attached(output: bytes = b"", **kw) -> Rig:
    rig = starting(**kw)
    rig.stream_up()
    rig.lc.stream_started(0, 0)
    if output:
        rig.lc.output(output)
    return rig.settled("Attached")


def detached(**kw) -> Rig:
    rig = attached(**kw)
    rig.lc.detach(rig.client, 0)
    return rig.settled("Detached")


def recovered(**kw) -> Rig:
    rig = Rig(client=False, **kw)
    rig.lc.recover()
    return rig.settled("Recovered")


def resuming(offset: int | None = 0, **kw) -> Rig:
    rig = recovered(**kw)
    rig.attach(offset)
    return rig.settled("Resuming")


def resuming_alone(offset: int | None = 0, **kw) -> Rig:
    rig = resuming(offset, **kw)
    rig.lc.detach(rig.client, 0)
    return rig.settled("ResumingAlone")


def interrupted(**kw) -> Rig:
    rig = attached(**kw)
    rig.lc.stream_closed(FACTS)
    return rig.settled("Interrupted")


def interrupted_alone(**kw) -> Rig:
    rig = detached(**kw)
    rig.lc.stream_closed(FACTS)
    return rig.settled("InterruptedAlone")


def reattaching(**kw) -> Rig:
    rig = interrupted(**kw)
    rig.lc.engine_lost("the engine does not answer")
    rig.lc.engine_back()
    return rig.settled("Reattaching")


def reattaching_alone(**kw) -> Rig:
    rig = interrupted_alone(**kw)
    rig.lc.engine_lost("the engine does not answer")
    rig.lc.engine_back()
    return rig.settled("ReattachingAlone")


KEPT_MESSAGE = "the session was put away; its files are kept until 14 Dec 2026 10:05 UTC"


def keeping(**kw) -> Rig:
    rig = attached(**kw)
    rig.lc.keep(KEPT_MESSAGE)
    return rig.settled("Keeping")


def ending(**kw) -> Rig:
    rig = attached(**kw)
    rig.lc.end(0, "the shell exited with code 0")
    return rig.settled("Ending")


def ended(**kw) -> Rig:
    rig = ending(**kw)
    rig.lc.removed()
    return rig.settled("Ended")


REACH = {"New": new, "Starting": starting, "StartingOrphaned": starting_orphaned,
         "Preparing": preparing, "PreparingAlone": preparing_alone,
         "Attached": attached, "Detached": detached, "Recovered": recovered,
         "Resuming": resuming, "ResumingAlone": resuming_alone, "Interrupted": interrupted,
         "InterruptedAlone": interrupted_alone, "Reattaching": reattaching,
         "ReattachingAlone": reattaching_alone, "Keeping": keeping, "Ending": ending,
         "Ended": ended}


# -- the table: every state and every input ----------------------------------------------

STATUS = {"New": "new", "Starting": "starting", "StartingOrphaned": "starting",
          "Preparing": "starting", "PreparingAlone": "starting",
          "Attached": "running", "Detached": "detached", "Recovered": "recovered",
          "Resuming": "resuming", "ResumingAlone": "resuming", "Interrupted": "interrupted",
          "InterruptedAlone": "interrupted", "Reattaching": "reattaching",
          "ReattachingAlone": "reattaching", "Keeping": "keeping", "Ending": "ending",
          "Ended": "ended"}

INPUTS = {"status", "start", "recover", "prepare", "stream_up", "stream_started", "stream_failed",
          "stream_closed", "engine_lost", "engine_back", "output", "attach", "detach",
          "write", "resize", "end", "expire", "let_go", "removed", "take", "keep", "kept",
          "moved"}


def _row(state: str, **targets: str) -> dict[str, str]:
    """
    A state's transitions: the input's name -> the state it leads to; every
    state answers C{status} without moving.
    """
    return {"status": state, **targets}


_S, _SO, _A, _D = "Starting", "StartingOrphaned", "Attached", "Detached"
_RC, _RS, _I, _IA = "Recovered", "Resuming", "Interrupted", "InterruptedAlone"
_R, _RA, _EG, _ED = "Reattaching", "ReattachingAlone", "Ending", "Ended"
_RSA, _KP = "ResumingAlone", "Keeping"
_P, _PA = "Preparing", "PreparingAlone"

TRANSITIONS = {
    "New": _row("New", start=_S, recover=_RC, prepare=_PA),
    _P: _row(_P, stream_up=_P, stream_started=_A, stream_failed=_ED, stream_closed=_P,
             engine_lost=_ED, engine_back=_P, output=_P, attach=_P, detach=_PA, write=_P,
             resize=_P, end=_ED, expire=_P, let_go=_ED, keep=_P),
    _PA: _row(_PA, stream_up=_PA, stream_started=_D, stream_failed=_ED, stream_closed=_PA,
              engine_lost=_ED, engine_back=_PA, output=_PA, attach=_P, detach=_PA, write=_PA,
              resize=_PA, end=_ED, expire=_PA, let_go=_ED, keep=_PA),
    _S: _row(_S, stream_up=_S, stream_started=_A, stream_failed=_ED, stream_closed=_S,
             engine_lost=_ED, engine_back=_S, output=_S, attach=_S, detach=_SO, write=_S,
             resize=_S, end=_ED, expire=_S, let_go=_ED, keep=_S),
    _SO: _row(_SO, stream_up=_SO, stream_started=_EG, stream_failed=_ED, stream_closed=_SO,
              engine_lost=_ED, engine_back=_SO, output=_SO, attach=_S, detach=_SO, write=_SO,
              resize=_SO, end=_ED, expire=_SO, let_go=_ED, keep=_SO),
    _A: _row(_A, stream_started=_A, stream_failed=_A, stream_closed=_I, engine_lost=_A,
             engine_back=_A, output=_A, attach=_A, detach=_D, write=_A, resize=_A, end=_EG,
             expire=_A, let_go=_ED, moved=_ED, keep=_KP),
    _D: _row(_D, take=_A, stream_started=_D, stream_failed=_D, stream_closed=_IA, engine_lost=_D,
             engine_back=_D, output=_D, attach=_A, detach=_D, write=_D, resize=_D, end=_EG,
             expire=_EG, let_go=_ED, moved=_ED, keep=_KP),
    _RC: _row(_RC, stream_failed=_RC, stream_closed=_RC, engine_lost=_RC, engine_back=_RC,
              attach=_RS, detach=_RC, write=_RC, resize=_RC, end=_EG, expire=_EG,
              let_go=_ED, moved=_ED, keep=_KP),
    _RS: _row(_RS, stream_up=_RS, stream_started=_A, stream_failed=_RS, stream_closed=_RC,
              engine_lost=_RC, engine_back=_RS, output=_RS, attach=_RS, detach=_RSA,
              write=_RS, resize=_RS, end=_EG, expire=_RS, let_go=_ED, moved=_ED,
              keep=_KP),
    _RSA: _row(_RSA, stream_up=_RSA, stream_started=_D, stream_failed=_RSA,
               stream_closed=_RC, engine_lost=_RC, engine_back=_RSA, output=_RSA,
               attach=_RS, detach=_RSA, write=_RSA, resize=_RSA, end=_EG, expire=_RSA,
               let_go=_ED, moved=_ED, keep=_KP),
    _I: _row(_I, stream_failed=_I, stream_closed=_I, engine_lost=_I, engine_back=_R,
             output=_I, attach=_I, detach=_IA, write=_I, resize=_I, end=_EG, expire=_I,
             let_go=_ED, moved=_ED, keep=_KP),
    _IA: _row(_IA, stream_failed=_IA, stream_closed=_IA, engine_lost=_IA, engine_back=_RA,
              output=_IA, attach=_I, detach=_IA, write=_IA, resize=_IA, end=_EG, expire=_IA,
              let_go=_ED, moved=_ED, keep=_KP),
    _R: _row(_R, stream_up=_R, stream_started=_A, stream_failed=_R, stream_closed=_I,
             engine_lost=_I, engine_back=_R, output=_R, attach=_R, detach=_RA, write=_R,
             resize=_R, end=_EG, expire=_R, let_go=_ED, moved=_ED, keep=_KP),
    _RA: _row(_RA, stream_up=_RA, stream_started=_D, stream_failed=_RA, stream_closed=_IA,
              engine_lost=_IA, engine_back=_RA, output=_RA, attach=_R, detach=_RA,
              write=_RA, resize=_RA, end=_EG, expire=_RA, let_go=_ED, moved=_ED,
              keep=_KP),
    _KP: _row(_KP, **{i: _KP for i in INPUTS - {"status", "start", "recover", "prepare",
                                                 "removed", "take", "kept"}},
              removed=_ED, kept=_ED),
    _EG: _row(_EG, **{i: _EG for i in INPUTS - {"status", "start", "recover", "prepare",
                                                 "removed", "take", "kept"}},
              removed=_ED),
    _ED: _row(_ED, **{i: _ED for i in INPUTS - {"status", "start", "recover", "prepare",
                                                 "take"}}),
}

# Pairs with no transition, and why they cannot happen.  Feeding one raises.
IMPOSSIBLE = {
    # The manager starts or recovers a session right after making it, and
    # does nothing else with it before.
    **{("New", i): "made, then started, prepared or recovered at once"
       for i in INPUTS - {"status", "start", "recover", "prepare"}},
    # A session is started, prepared or recovered once.
    **{(s, i): "started, prepared or recovered once" for s in STATUS if s != "New"
       for i in ("start", "recover", "prepare")},
    # Its container's removal is asked for only on the way to Ending (or in
    # a start that failed, which ends in Ended).
    **{(s, "removed"): "no removal was asked for"
       for s in (_S, _SO, _P, _PA, _A, _D, _RC, _RS, _RSA, _I, _IA, _R, _RA)},
    # A stream comes up only after make or reattach was asked for, and the
    # manager hears only the stream in use: in these states none is asked for.
    **{(s, "stream_up"): "no stream is being brought up" for s in (_A, _D, _RC, _I, _IA)},
    # No stream, so none can start or say anything.
    **{(s, "stream_started"): "no stream" for s in (_RC, _I, _IA)},
    (_RC, "output"): "no stream (a resume that failed closed it, and it reads no more)",
    # The manager feeds kept only after the lifecycle asked it to keep.
    **{(s, "kept"): "no keeping was asked for"
       for s in (_S, _SO, _P, _PA, _A, _D, _RC, _RS, _RSA, _I, _IA, _R, _RA, _EG)},
    # A starting session's container does not say whose it is yet: no
    # other replica takes it over (capsule.sessions.replicas).
    **{(s, "moved"): "no other replica takes a session over before it runs"
       for s in (_S, _SO, _P, _PA)},
    # The pool hands out only a session it holds detached (WarmPool.fit).
    **{(s, "take"): "only a warm session, detached, is taken" for s in STATUS if s != _D},
}

# What an input returns where it is not None.
RETURNS = {
    **{(s, "status"): STATUS[s] for s in STATUS},
    **{(s, "expire"): s in (_D, _RC) for s in STATUS if s != "New"},
    **{(s, "let_go"): s in (_A, _D, _RC, _RS, _RSA, _I, _IA, _R, _RA)
       for s in STATUS if s != "New"},
}


def feed(rig: Rig, name: str):
    """
    Feed input C{name} with ordinary arguments; return what it returns.
    """
    args = {
        "stream_up": lambda: (RecordingStream(),),
        "stream_started": lambda: (rig.core.replay.end, 0),
        "stream_failed": lambda: ("no such image", "image_missing"),
        "stream_closed": lambda: (FACTS,),
        "engine_lost": lambda: ("the engine does not answer",),
        "output": lambda: (b"out",),
        "attach": lambda: (rig.new_client(), None),
        "detach": lambda: (rig.core.client, 0),
        "take": lambda: (rig.new_client(),),
        "write": lambda: (b"in",),
        "resize": lambda: (100, 30),
        "end": lambda: (0, "the shell exited with code 0"),
        "let_go": lambda: ("capsule is restarting: reconnect to resume",),
        "moved": lambda: (MOVED,),
        "keep": lambda: (KEPT_MESSAGE,),
    }.get(name, lambda: ())()
    return getattr(rig.lc, name)(*args)


def test_doubles_provide_the_interfaces():
    assert verifyObject(ISessionEffects, RecordingEffects())
    assert verifyObject(IExecProcess, RecordingStream())
    assert verifyObject(ISessionClient, RecordingClient())


def test_every_state_and_input_is_decided():
    """
    A state or an input cannot be added, nor a transition changed, without
    deciding here what each pair does.
    """
    automaton = make_lifecycle.__automat_automaton__
    declared = {name for name, value in vars(lifecycle).items()
                if isinstance(value, type(lifecycle.New))}
    assert declared == set(STATUS)
    assert {s.name for s in automaton.states()} == set(STATUS)
    assert automaton.initialState is lifecycle.New
    inputs = {name for name, value in vars(SessionEvents).items()
              if inspect.isfunction(value) and not name.startswith("_")}
    assert inputs == INPUTS
    assert automaton.inputAlphabet() == INPUTS

    defined = {}
    for old, name, target, _ in automaton.allTransitions():
        assert (old.name, name) not in defined
        defined[old.name, name] = target.name
    table = {(s, i): t for s, row in TRANSITIONS.items() for i, t in row.items()}
    assert defined == table
    pairs = {(s, i) for s in STATUS for i in INPUTS}
    assert set(table) | set(IMPOSSIBLE) == pairs
    assert set(table) & set(IMPOSSIBLE) == set()


TABLE = sorted((s, i) for s, row in TRANSITIONS.items() for i in row)


@pytest.mark.parametrize("state, name", TABLE, ids=[f"{s}-{i}" for s, i in TABLE])
def test_each_transition_lands_where_the_table_says(state, name):
    rig = REACH[state]()
    assert feed(rig, name) == RETURNS.get((state, name))
    target = TRANSITIONS[state][name]
    assert rig.state == target
    assert rig.lc.status() == STATUS[target]
    if state != "New":
        # A state and its twin differ in whether a client is attached.
        assert (rig.core.client is not None) == (target in (_S, _P, _A, _RS, _I, _R))


@pytest.mark.parametrize("state, name", sorted(IMPOSSIBLE),
                         ids=[f"{s}-{i}" for s, i in sorted(IMPOSSIBLE)])
def test_impossible_inputs_raise(state, name):
    rig = REACH[state]()
    before = rig.snapshot()
    with pytest.raises(NoTransition):
        feed(rig, name)
    assert rig.snapshot() == before
    assert rig.effects.calls == [] and all(s.calls == [] for s in rig.streams)


NOOPS = {
    _SO: ("engine_back", "detach", "write", "expire", "keep"),
    _P: ("engine_back", "expire", "keep"),
    _PA: ("engine_back", "detach", "write", "expire", "keep"),
    _A: ("engine_lost", "engine_back", "stream_started", "stream_failed", "expire"),
    _D: ("detach", "write", "engine_lost", "engine_back", "stream_started", "stream_failed"),
    _RC: ("detach", "write", "engine_lost", "engine_back", "stream_failed", "stream_closed"),
    _RS: ("engine_back", "stream_failed", "expire"),
    _I: ("stream_failed", "stream_closed", "expire"),
    _IA: ("detach", "write", "stream_failed", "stream_closed", "expire"),
    _R: ("engine_back", "stream_failed", "expire"),
    _RA: ("detach", "write", "engine_back", "stream_failed", "expire"),
    _S: ("engine_back", "expire", "keep"),
    _KP: ("stream_started", "stream_failed", "stream_closed", "engine_lost", "engine_back",
          "end", "detach", "write", "output", "expire", "let_go", "keep", "moved"),
    _EG: ("stream_started", "stream_failed", "stream_closed", "engine_lost", "engine_back",
          "end", "detach", "write", "output", "expire", "let_go", "keep", "moved"),
    _ED: ("stream_started", "stream_failed", "stream_closed", "engine_lost", "engine_back",
          "end", "detach", "write", "output", "expire", "let_go", "removed", "keep", "kept",
          "moved"),
}
NOOP_PAIRS = sorted((s, i) for s, names in NOOPS.items() for i in names)


@pytest.mark.parametrize("state, name", NOOP_PAIRS, ids=[f"{s}-{i}" for s, i in NOOP_PAIRS])
def test_late_news_changes_nothing(state, name):
    """
    News from a stream or client that was replaced or is gone, input with
    nobody to type it, an expiry that does not apply: nothing is done.
    """
    rig = REACH[state]()
    before = rig.snapshot()
    feed(rig, name)
    assert rig.snapshot() == before
    assert rig.quiet()


# -- New ------------------------------------------------------------------------------

def test_new_start_asks_for_a_container_and_shell():
    rig = new()
    assert rig.lc.status() == "new"
    rig.lc.start()
    assert rig.state == "Starting"
    assert rig.effects.calls == [("make", rig.owner)]
    assert rig.client.events == []


def test_new_recover_waits_for_its_client():
    rig = Rig(client=False)
    rig.clock.advance(5)
    rig.lc.recover()
    assert rig.state == "Recovered"
    assert rig.core.left_at == START + 5
    assert rig.effects.calls == [] and rig.core.client is None


# -- Starting, StartingOrphaned ---------------------------------------------------------

def test_starting_stream_up_applies_the_size_and_waits_for_the_start():
    rig = starting()
    rig.lc.resize(100, 30)
    assert rig.core.size == (100, 30)
    stream = rig.stream_up()
    assert rig.state == "Starting" and rig.core.stream is stream
    assert stream.calls == [("resize", 100, 30)]
    assert rig.effects.calls == [] and rig.client.events == []


def test_starting_stream_started_goes_live_with_what_was_typed():
    rig = starting()
    rig.lc.write(b"ls")
    stream = rig.stream_up()
    rig.clock.advance(3)
    rig.lc.write(b" -l\r")
    rig.lc.stream_started(0, 0)
    assert rig.state == "Attached"
    assert stream.calls == [("resize", 80, 24), ("write", b"ls"), ("write", b" -l\r")]
    assert rig.core.pending == []
    assert rig.effects.calls == [("went_live", rig.owner, False)]
    assert rig.client.events == [("started", SID, False)]
    assert rig.client.offset == 0 == rig.core.handed
    assert rig.core.active_at == START + 3
    rig.lc.output(b"$ ")
    assert rig.client.output == b"$ " and rig.client.offset == rig.core.handed == 2


@pytest.mark.parametrize("reach", [starting, starting_orphaned, preparing, preparing_alone])
@pytest.mark.parametrize("name, args, message, code", [
    ("stream_failed", ("no such image", "image_missing"), "no such image", "image_missing"),
    ("end", (1, "the shell exited with code 1"), "the shell exited with code 1",
     "start_failed"),
    ("engine_lost", ("the engine does not answer",), "the engine does not answer",
     "docker_unavailable"),
    ("let_go", ("capsule is restarting",), "the capsule server shut down", "restarting"),
])
def test_a_session_that_never_ran_fails(reach, name, args, message, code):
    rig = reach()
    stream = rig.stream_up()
    result = getattr(rig.lc, name)(*args)
    assert result is (False if name == "let_go" else None)
    assert rig.state == "Ended"
    assert rig.effects.calls == [("forget", rig.owner), ("remove", rig.owner)]
    assert stream.calls == [("resize", 80, 24), ("lose",)]
    assert rig.core.client is None
    assert (rig.core.message, rig.core.exit_code) == (message, None)
    # An orphan's client left already, and a session prepared alone has
    # none: they hear nothing.
    assert (rig.client.events if rig.client else []) == (
        [("failed", message, code)] if reach in (starting, preparing) else [])


@pytest.mark.parametrize("reach", [starting, starting_orphaned, preparing, preparing_alone])
def test_a_stream_closed_before_the_shell_runs_is_diagnosed(reach):
    rig = reach()
    state = rig.state
    stream = rig.stream_up()
    rig.lc.stream_closed(FACTS)
    assert rig.state == state and rig.core.stream is None
    assert rig.effects.calls == [("diagnose", rig.owner, FACTS)]
    assert stream.calls == [("resize", 80, 24)]
    assert (rig.client.events if rig.client else []) == []


def test_starting_detach_orphans_it_and_keeps_what_was_typed():
    rig = starting()
    rig.lc.write(b"typed")
    rig.clock.advance(2)
    rig.lc.detach(rig.client, 0)
    assert rig.state == "StartingOrphaned"
    assert rig.core.client is None and rig.core.left_at == START + 2
    assert rig.core.pending == [b"typed"]
    assert rig.quiet()


def test_an_orphan_that_starts_ends_and_writes_nothing():
    rig = starting()
    rig.lc.write(b"typed")
    rig.lc.detach(rig.client, 0)
    stream = rig.stream_up()
    rig.lc.stream_started(0, 0)
    assert rig.state == "Ending"
    assert rig.effects.calls == [("forget", rig.owner), ("remove", rig.owner)]
    assert stream.calls == [("resize", 80, 24), ("lose",)]
    assert rig.client.events == []
    assert rig.core.message == "the client left before the session started"
    assert rig.core.exit_code is None


def test_a_client_back_before_the_start_gets_the_session():
    rig = starting()
    old = rig.client
    rig.lc.write(b"a")
    rig.lc.detach(old, 0)
    rig.lc.write(b"lost")
    new = rig.attach()
    assert rig.state == "Starting"
    assert rig.core.client is new and rig.core.left_at is None
    assert rig.quiet(), "nobody was attached: nobody is taken over"
    rig.lc.write(b"b")
    stream = rig.stream_up()
    rig.lc.stream_started(0, 0)
    assert stream.written == [b"a", b"b"]
    assert new.events == [("started", SID, False)] and old.events == []


# -- Preparing, PreparingAlone: a session made without a client ----------------------------

def test_new_prepare_asks_for_a_container_and_shell_with_nobody_to_tell():
    rig = Rig(client=False)
    rig.lc.prepare()
    assert rig.state == "PreparingAlone" and rig.lc.status() == "starting"
    assert rig.effects.calls == [("make", rig.owner)]
    assert rig.core.client is None and rig.core.left_at is None


def test_prepared_alone_is_kept_detached_from_when_its_shell_runs():
    rig = preparing_alone()
    rig.lc.resize(120, 40)
    stream = rig.stream_up()
    rig.clock.advance(4)
    rig.lc.stream_started(0, 0)
    assert rig.state == "Detached"
    assert rig.effects.calls == [("went_live", rig.owner, False)]
    assert stream.calls == [("resize", 120, 40)]
    assert rig.core.left_at == START + 4 and rig.core.handed == 0
    rig.lc.output(b"banner $ ")
    assert rig.core.replay.since(0) == (b"banner $ ", 0)
    # Expiry is a detached session's: from when the shell was up.
    assert rig.lc.expire() is True and rig.state == "Ending"


def test_a_prepared_session_replays_everything_to_its_first_client():
    rig = preparing_alone()
    rig.stream_up()
    rig.lc.stream_started(0, 0)
    rig.lc.output(b"banner\r\n$ ")
    client = rig.attach(0)
    assert rig.state == "Attached" and rig.core.left_at is None
    assert client.events == [("started", SID, True), ("output", b"banner\r\n$ ")]
    assert client.offset == rig.core.handed == 10


def test_a_client_attached_while_preparing_gets_it_once_the_shell_runs():
    rig = preparing_alone()
    client = rig.attach(0)
    assert rig.state == "Preparing" and rig.core.want == 0
    assert rig.quiet(), "nothing to hand over yet, and nobody was attached before"
    rig.lc.write(b"ls\r")
    stream = rig.stream_up()
    rig.lc.stream_started(0, 0)
    assert rig.state == "Attached" and rig.core.want is None
    assert stream.calls == [("resize", 80, 24), ("write", b"ls\r")]
    assert rig.effects.calls == [("went_live", rig.owner, False)]
    rig.lc.output(b"$ ")
    assert client.events == [("started", SID, True), ("output", b"$ ")]


def test_a_client_that_leaves_while_preparing_leaves_it_kept():
    rig = preparing()
    client = rig.client
    rig.lc.write(b"typed")
    rig.clock.advance(2)
    rig.lc.detach(client, 0)
    assert rig.state == "PreparingAlone"
    assert rig.core.client is None and rig.core.want is None
    assert rig.core.pending == [b"typed"]
    assert rig.quiet()
    stream = rig.stream_up()
    rig.lc.stream_started(0, 0)
    assert rig.state == "Detached", "unlike an orphan of a client's own start, it is kept"
    assert stream.written == [b"typed"]
    assert client.events == []


def test_a_second_client_while_preparing_takes_over():
    rig = preparing()
    old = rig.client
    new = rig.attach(0)
    assert rig.state == "Preparing"
    assert old.events == [("taken_over",)] and new.events == []
    rig.stream_up()
    rig.lc.stream_started(0, 0)
    assert new.events == [("started", SID, True)]


def test_a_warm_session_taken_is_a_new_session_to_its_client():
    rig = preparing_alone()
    stream = rig.stream_up()
    rig.lc.stream_started(0, 0)
    rig.lc.output(b"banner\r\n$ ")
    rig.settled("Detached")
    client = rig.new_client()
    rig.clock.advance(7)
    rig.lc.take(client)
    assert rig.state == "Attached"
    assert rig.core.client is client and rig.core.left_at is None
    assert client.events == [("started", SID, False), ("output", b"banner\r\n$ ")]
    assert client.offset == rig.core.handed == 10
    assert rig.effects.calls == [] and stream.calls == []


# -- Attached ---------------------------------------------------------------------------

def test_attached_output_goes_to_the_client():
    rig = attached()
    rig.clock.advance(2)
    rig.lc.output(b"hello")
    assert rig.client.events == [("output", b"hello")]
    assert rig.client.offset == rig.core.handed == rig.core.replay.end == 5
    assert rig.core.replay.since(0) == (b"hello", 0)
    assert rig.core.active_at == START + 2
    assert rig.effects.calls == [] and rig.stream.calls == []


def test_attached_write_and_resize_go_to_the_shell():
    rig = attached()
    rig.clock.advance(2)
    rig.lc.write(b"ls\r")
    rig.lc.resize(120, 40)
    assert rig.stream.calls == [("write", b"ls\r"), ("resize", 120, 40)]
    assert rig.core.size == (120, 40) and rig.core.active_at == START + 2
    assert rig.core.pending == [] and rig.effects.calls == [] and rig.client.events == []


def test_attached_detach_keeps_reading_and_counts_what_never_went_out():
    rig = attached(output=b"0123456789")
    rig.clock.advance(7)
    rig.lc.detach(rig.client, 4)
    assert rig.state == "Detached"
    assert rig.core.client is None and rig.core.left_at == START + 7
    assert rig.core.handed == 6
    # Nobody is watching, and the shell must not stall.
    assert rig.stream.calls == [("resume",)]
    assert rig.effects.calls == [] and rig.client.events == []


def test_attached_stream_closed_asks_why():
    rig = attached()
    rig.lc.stream_closed(FACTS)
    assert rig.state == "Interrupted" and rig.core.stream is None
    assert rig.effects.calls == [("diagnose", rig.owner, FACTS)]
    assert rig.client.events == [] and rig.stream.calls == []


def test_attached_end_tells_the_client_and_removes_the_container():
    rig = attached()
    rig.lc.end(3, "the shell exited with code 3")
    assert rig.state == "Ending"
    assert rig.effects.calls == [("forget", rig.owner), ("remove", rig.owner)]
    assert rig.stream.calls == [("lose",)]
    assert rig.client.events == [("ended", 3, "the shell exited with code 3")]
    assert rig.core.client is None
    assert (rig.core.exit_code, rig.core.message) == (3, "the shell exited with code 3")


# -- Detached -----------------------------------------------------------------------------

def test_detached_keeps_output_and_the_next_client_gets_what_it_lacks():
    rig = attached(output=b"0123456789")
    old = rig.client
    rig.lc.detach(old, 4)
    rig.clock.advance(1)
    rig.lc.output(b"abc")
    assert rig.core.handed == 6 and old.events == []
    assert rig.core.active_at == START + 1
    new = rig.attach()
    assert rig.state == "Attached"
    assert new.events == [("started", SID, True), ("output", b"6789abc")]
    assert new.offset == rig.core.handed == 13
    assert rig.core.client is new and rig.core.left_at is None
    assert old.events == [], "nobody was taken over"
    assert rig.effects.calls == []


def test_detached_attach_with_an_offset_resumes_there():
    rig = detached(output=b"0123456789")
    new = rig.attach(8)
    assert new.events == [("started", SID, True), ("output", b"89")]
    assert new.offset == 10


def test_detached_attach_from_before_the_buffer_says_what_was_dropped():
    rig = detached(output=b"0123456789abcdef", replay_bytes=8)
    new = rig.attach(2)
    assert new.events == [("started", SID, True), ("dropped", 6, 8), ("output", b"89abcdef")]
    assert new.offset == 16


def test_detached_stream_closed_asks_why():
    rig = detached()
    rig.lc.stream_closed(FACTS)
    assert rig.state == "InterruptedAlone" and rig.core.stream is None
    assert rig.effects.calls == [("diagnose", rig.owner, FACTS)]
    assert rig.client.events == [] and rig.stream.calls == []


def test_detached_end_removes_the_container():
    rig = detached()
    rig.lc.end(None, "capsule ended it")
    assert rig.state == "Ending"
    assert rig.effects.calls == [("forget", rig.owner), ("remove", rig.owner)]
    assert rig.stream.calls == [("lose",)] and rig.client.events == []
    assert (rig.core.exit_code, rig.core.message) == (None, "capsule ended it")


# -- Recovered, Resuming ---------------------------------------------------------------------

@pytest.mark.parametrize("offset, asked", [(120, 120), (None, 0)])
def test_recovered_attach_asks_the_keeper_for_what_the_client_lacks(offset, asked):
    rig = recovered()
    client = rig.attach(offset)
    assert rig.state == "Resuming"
    assert rig.effects.calls == [("reattach", rig.owner, asked)]
    assert rig.core.client is client and rig.core.left_at is None
    assert rig.core.want == offset
    assert client.events == []


def test_recovered_end_removes_the_container():
    rig = recovered()
    rig.lc.end(None, "the session's container is gone")
    assert rig.state == "Ending"
    assert rig.effects.calls == [("forget", rig.owner), ("remove", rig.owner)]
    assert rig.core.message == "the session's container is gone"


def test_resumed_where_the_client_was_with_what_was_typed_meanwhile():
    rig = resuming(offset=120)
    rig.lc.write(b"ls")
    stream = rig.stream_up()
    rig.lc.write(b"\r")
    rig.lc.stream_started(120, 0)
    assert rig.state == "Attached"
    assert stream.calls == [("resize", 80, 24), ("write", b"ls"), ("write", b"\r")]
    assert rig.effects.calls == [("went_live", rig.owner, True)]
    assert rig.client.events == [("started", SID, True)]
    assert rig.client.offset == rig.core.handed == rig.core.replay.end == 120
    assert rig.core.want is None and rig.core.pending == []
    rig.lc.output(b"more")
    assert rig.client.offset == rig.core.replay.end == 124


def test_resumed_without_an_offset_starts_where_the_keeper_does():
    rig = resuming(offset=None)
    rig.stream_up()
    rig.lc.stream_started(40, 40)
    assert rig.client.events == [("started", SID, True)]
    assert rig.client.offset == rig.core.handed == 40


def test_resumed_from_before_the_keepers_buffer_says_what_was_dropped():
    rig = resuming(offset=10)
    rig.stream_up()
    rig.lc.stream_started(25, 15)
    rig.lc.output(b"x")
    assert rig.client.events == [("started", SID, True), ("dropped", 15, 25), ("output", b"x")]
    assert rig.client.offset == rig.core.replay.end == 26


def test_resumed_beyond_the_keepers_output_says_the_shell_restarted():
    # The container restarted while capsule was away: its keeper's output
    # ends at 120, before what the client has.
    rig = resuming(offset=300)
    rig.stream_up()
    rig.lc.stream_started(120, 0)
    assert rig.client.events == [("started", SID, True), ("notice", "shell_restarted")]
    assert rig.client.offset == rig.core.handed == rig.core.replay.end == 120
    rig.lc.output(b"$ ")
    assert rig.client.output == b"$ "
    assert rig.client.offset == rig.core.replay.end == 122


def test_resuming_detach_leaves_it_resuming_alone():
    rig = resuming(offset=120)
    rig.clock.advance(2)
    rig.lc.detach(rig.client, 0)
    assert rig.state == "ResumingAlone"
    assert rig.core.client is None and rig.core.left_at == START + 2
    assert rig.core.want == 120 and rig.core.handed == 0
    assert rig.quiet()


def test_resuming_alone_goes_live_detached():
    rig = resuming_alone(offset=120)
    stream = rig.stream_up()
    rig.lc.stream_started(120, 0)
    assert rig.state == "Detached" and rig.core.replay.end == 120
    assert rig.core.want is None
    assert stream.calls == [("resize", 80, 24)]


@pytest.mark.parametrize("up", [False, True], ids=["before-stream", "stream-up"])
def test_resuming_engine_lost_fails_the_client_and_stays_recoverable(up):
    rig = resuming(offset=120)
    stream = rig.stream_up() if up else None
    rig.clock.advance(2)
    rig.lc.engine_lost("the engine does not answer")
    assert rig.state == "Recovered"
    assert rig.client.events == [("failed", "the engine does not answer", "docker_unavailable")]
    if up:
        assert stream.calls == [("resize", 80, 24), ("lose",)]
    assert rig.core.stream is None and rig.core.client is None
    assert rig.core.left_at == START + 2 and rig.core.want is None
    assert rig.effects.calls == []
    # Its client may try again.
    rig.attach(130)
    assert rig.state == "Resuming"
    assert rig.effects.calls == [("reattach", rig.owner, 130)]


def test_resuming_stream_closed_fails_the_client_and_stays_recoverable():
    rig = resuming(offset=120)
    stream = rig.stream_up()
    rig.lc.stream_closed(FACTS)
    assert rig.state == "Recovered"
    assert rig.client.events == [
        ("failed", "the connection to the session's shell closed while it was being resumed:"
                   " try again", "docker_unavailable")]
    assert stream.calls == [("resize", 80, 24)], "it closed already"
    assert rig.core.stream is None and rig.core.client is None
    assert rig.effects.calls == []


def test_resuming_end_tells_the_client():
    rig = resuming()
    stream = rig.stream_up()
    rig.lc.end(None, "the session's container is gone")
    assert rig.state == "Ending"
    assert rig.client.events == [("ended", None, "the session's container is gone")]
    assert stream.calls == [("resize", 80, 24), ("lose",)]
    assert rig.effects.calls == [("forget", rig.owner), ("remove", rig.owner)]


# -- Interrupted, InterruptedAlone ------------------------------------------------------------

def test_interrupted_engine_lost_tells_the_client_and_waits_for_the_engine():
    rig = interrupted()
    rig.lc.engine_lost("the engine does not answer")
    assert rig.state == "Interrupted"
    assert rig.client.events == [("notice", "engine_away")]
    assert rig.effects.calls == [("await_engine", rig.owner)]


def test_interrupted_alone_engine_lost_waits_for_the_engine():
    rig = interrupted_alone()
    rig.lc.engine_lost("the engine does not answer")
    assert rig.state == "InterruptedAlone"
    assert rig.effects.calls == [("await_engine", rig.owner)]
    assert rig.client.events == []


@pytest.mark.parametrize("reach, target", [(interrupted, "Reattaching"),
                                           (interrupted_alone, "ReattachingAlone")])
def test_engine_back_reattaches_from_the_end_of_the_output(reach, target):
    rig = reach(output=b"0123456789")
    rig.lc.engine_lost("the engine does not answer")
    rig.settled(rig.state)
    rig.lc.engine_back()
    assert rig.state == target
    assert rig.effects.calls == [("reattach", rig.owner, 10)]
    assert rig.client.events == []


@pytest.mark.parametrize("reach, target", [(interrupted, "InterruptedAlone"),
                                           (reattaching, "ReattachingAlone")])
def test_leaving_while_away_counts_what_never_went_out(reach, target):
    rig = reach(output=b"0123456789")
    rig.clock.advance(3)
    rig.lc.detach(rig.client, 3)
    assert rig.state == target
    assert rig.core.client is None and rig.core.left_at == START + 3
    assert rig.core.handed == 7
    assert rig.quiet()
    new = rig.attach()
    assert new.events == [("started", SID, True), ("output", b"789"),
                          ("notice", "engine_away")]
    assert new.offset == 10


@pytest.mark.parametrize("reach, target", [(interrupted_alone, "Interrupted"),
                                           (reattaching_alone, "Reattaching")])
def test_a_client_back_while_away_gets_the_output_and_hears_why_it_waits(reach, target):
    rig = reach(output=b"0123456789")
    new = rig.attach(4)
    assert rig.state == target
    assert new.events == [("started", SID, True), ("output", b"456789"),
                          ("notice", "engine_away")]
    assert new.offset == rig.core.handed == 10
    assert rig.core.client is new and rig.core.left_at is None
    assert rig.effects.calls == []


@pytest.mark.parametrize("reach", [interrupted, interrupted_alone, reattaching,
                                   reattaching_alone])
def test_ended_while_away(reach):
    rig = reach()
    had_client = rig.core.client is not None
    rig.lc.end(None, "the Docker engine did not come back within 60 s")
    assert rig.state == "Ending"
    assert rig.effects.calls == [("forget", rig.owner), ("remove", rig.owner)]
    assert rig.client.events == (
        [("ended", None, "the Docker engine did not come back within 60 s")]
        if had_client else [])
    assert all(s.calls == [] for s in rig.streams), "no stream to close"


# -- Reattaching, ReattachingAlone -----------------------------------------------------------

def test_reattached_where_it_left_off():
    rig = reattaching(output=b"0123456789")
    rig.lc.write(b"ls")
    stream = rig.stream_up()
    rig.lc.stream_started(10, 0)
    assert rig.state == "Attached"
    assert stream.calls == [("resize", 80, 24), ("write", b"ls")]
    assert rig.client.events == [("notice", "engine_back")]
    assert rig.effects.calls == [("went_live", rig.owner, True)]
    assert rig.core.handed == 10
    rig.lc.output(b"ab")
    assert rig.client.events[-1] == ("output", b"ab")
    assert rig.client.offset == rig.core.handed == rig.core.replay.end == 12


def test_reattached_to_a_restarted_shell_starts_the_offsets_again():
    rig = reattaching(output=b"0123456789")
    rig.stream_up()
    rig.lc.stream_started(4, 0)
    assert rig.state == "Attached"
    assert rig.client.events == [("started", SID, True), ("notice", "shell_restarted")]
    assert rig.client.offset == rig.core.handed == rig.core.replay.end == 4
    assert rig.core.replay.since(0) == (b"", 4)
    assert rig.effects.calls == [("went_live", rig.owner, True)]
    rig.lc.output(b"$ ")
    assert rig.client.offset == rig.core.replay.end == 6


def test_reattached_alone_goes_on_detached():
    rig = reattaching_alone(output=b"0123456789")
    stream = rig.stream_up()
    rig.lc.stream_started(10, 0)
    assert rig.state == "Detached"
    assert stream.calls == [("resize", 80, 24)]
    assert rig.effects.calls == [("went_live", rig.owner, True)]
    assert rig.client.events == []
    new = rig.attach()
    assert new.events == [("started", SID, True)] and new.offset == 10


def test_reattached_alone_after_a_gap_the_next_client_hears_what_was_dropped():
    # The keeper's buffer no longer held offset 10: what it printed while
    # the engine was away overflowed it.
    rig = reattaching_alone(output=b"0123456789")
    rig.stream_up()
    rig.lc.stream_started(25, 15)
    new = rig.attach()
    assert new.events == [("started", SID, True), ("dropped", 15, 25)]
    assert new.offset == 25


@pytest.mark.parametrize("reach, target", [(reattaching, "Interrupted"),
                                           (reattaching_alone, "InterruptedAlone")])
def test_reattach_stream_closed_asks_why(reach, target):
    rig = reach()
    stream = rig.stream_up()
    rig.lc.stream_closed(FACTS)
    assert rig.state == target and rig.core.stream is None
    assert rig.effects.calls == [("diagnose", rig.owner, FACTS)]
    assert stream.calls == [("resize", 80, 24)]
    assert rig.client.events == []


@pytest.mark.parametrize("reach, target", [(reattaching, "Interrupted"),
                                           (reattaching_alone, "InterruptedAlone")])
def test_reattach_engine_lost_waits_for_the_engine_again(reach, target):
    rig = reach()
    had_client = rig.core.client is not None
    stream = rig.stream_up()
    rig.lc.engine_lost("the engine does not answer")
    assert rig.state == target and rig.core.stream is None
    assert stream.calls == [("resize", 80, 24), ("lose",)]
    assert rig.effects.calls == [("await_engine", rig.owner)]
    assert rig.client.events == ([("notice", "engine_away")] if had_client else [])


# -- Ending, Ended ----------------------------------------------------------------------------

def test_ending_removed_ends():
    rig = ending()
    rig.lc.removed()
    assert rig.state == "Ended"
    assert rig.quiet()


@pytest.mark.parametrize("reach", [ending, ended])
def test_a_late_stream_is_closed(reach):
    rig = reach()
    state, old = rig.state, rig.core.stream
    stream = RecordingStream()
    rig.lc.stream_up(stream)
    assert stream.calls == [("lose",)]
    assert rig.core.stream is old and rig.state == state
    assert rig.quiet()


@pytest.mark.parametrize("reach", [ending, ended])
def test_a_late_client_is_refused(reach):
    rig = reach()
    late = rig.attach(5)
    assert late.events == [("failed", "the shell exited with code 0", "session_not_found")]
    assert rig.core.client is None
    assert rig.effects.calls == []


def test_a_late_client_after_let_go_is_refused():
    rig = attached()
    rig.lc.let_go("capsule is restarting")
    late = rig.attach()
    assert late.events == [("failed", "the session has ended", "session_not_found")]


# -- Keeping: put away, its container stopped and kept ----------------------------------------

KEEPABLE = [attached, detached, recovered, resuming, resuming_alone, interrupted,
            interrupted_alone, reattaching, reattaching_alone]


@pytest.mark.parametrize("reach", KEEPABLE, ids=[r.__name__ for r in KEEPABLE])
def test_keep_forgets_the_session_and_keeps_its_container(reach):
    """
    Put away: the attached client hears why (that it is kept), nobody finds
    it live any more, its stream is closed, and its container is kept,
    never removed.
    """
    rig = reach()
    stream, client = rig.core.stream, rig.core.client
    assert rig.core.owner is rig.owner and rig.lc.status().keepable
    rig.lc.keep(KEPT_MESSAGE)
    assert rig.state == "Keeping" and rig.lc.status() == "keeping"
    assert rig.effects.calls == [("forget", rig.owner), ("keep", rig.owner)]
    assert rig.core.client is None and rig.core.stream is None
    assert rig.core.message == KEPT_MESSAGE
    assert (client.events if client else []) == (
        [("ended", None, KEPT_MESSAGE)] if client else [])
    assert (stream.calls if stream else []) == ([("lose",)] if stream else [])


@pytest.mark.parametrize("reach", [starting, starting_orphaned, preparing, preparing_alone,
                                   ending, ended])
def test_keep_leaves_a_session_without_a_shell_or_over_alone(reach):
    rig = reach()
    before = rig.snapshot()
    assert not rig.lc.status().keepable
    rig.lc.keep(KEPT_MESSAGE)
    assert rig.snapshot() == before and rig.quiet()


def test_keeping_kept_ends_without_a_removal():
    rig = keeping()
    rig.lc.kept()
    assert rig.state == "Ended"
    assert rig.quiet()


def test_keeping_removed_ends():
    """
    Its container went while it was being put away: it is over all the same.
    """
    rig = keeping()
    rig.lc.removed()
    assert rig.state == "Ended"
    assert rig.quiet()


def test_a_client_while_keeping_hears_the_session_is_kept():
    rig = keeping()
    late = rig.attach(5)
    assert late.events == [("failed", KEPT_MESSAGE, "session_kept")]
    assert rig.core.client is None and rig.state == "Keeping"
    assert rig.effects.calls == []


def test_a_late_stream_while_keeping_is_closed():
    rig = keeping()
    stream = RecordingStream()
    rig.lc.stream_up(stream)
    assert stream.calls == [("lose",)]
    assert rig.core.stream is None and rig.state == "Keeping"


# -- input typed while there is no stream ------------------------------------------------------

@pytest.mark.parametrize("reach", [starting, resuming, interrupted, reattaching])
def test_pending_input_is_bounded(reach):
    rig = reach(max_pending_input=8)
    state = rig.state
    rig.clock.advance(2)
    rig.lc.write(b"12345")
    rig.lc.write(b"678")
    assert rig.core.active_at == START + 2
    with pytest.raises(ProtocolError) as raised:
        rig.lc.write(b"9")
    assert raised.value.code == "input_dropped"
    assert raised.value.message == (
        "the session is not connected to its shell right now and its input buffer (8 bytes)"
        " is full: input was dropped")
    assert rig.core.pending == [b"12345", b"678"]
    assert rig.state == state and rig.lc.status() == STATUS[state]
    assert rig.quiet()


@pytest.mark.parametrize("reach", [starting_orphaned, detached, recovered, interrupted_alone,
                                   reattaching_alone, ending, ended])
def test_input_with_no_client_attached_is_not_held(reach):
    rig = reach()
    rig.lc.write(b"stale")
    assert rig.core.pending == []
    assert rig.quiet()


def test_pending_input_flushed_on_start():
    rig = starting()
    rig.lc.write(b"a")
    stream = rig.stream_up()
    rig.lc.write(b"b")
    rig.lc.stream_started(0, 0)
    rig.lc.write(b"c")
    assert stream.written == [b"a", b"b", b"c"]
    assert rig.core.pending == []


def test_pending_input_flushed_on_resume():
    rig = resuming(offset=0)
    rig.lc.write(b"a")
    rig.attach(0)
    rig.lc.write(b"b")
    stream = rig.stream_up()
    rig.lc.write(b"c")
    rig.lc.stream_started(0, 0)
    rig.lc.write(b"d")
    assert stream.written == [b"a", b"b", b"c", b"d"]
    assert rig.core.pending == []


def test_pending_input_flushed_on_reattach_once():
    rig = attached()
    first = rig.stream
    rig.lc.stream_closed(FACTS)
    rig.lc.write(b"a")
    rig.lc.engine_lost("the engine does not answer")
    rig.lc.write(b"b")
    rig.lc.engine_back()
    rig.lc.write(b"c")
    second = rig.stream_up()
    rig.lc.write(b"d")
    rig.lc.stream_started(0, 0)
    rig.lc.write(b"e")
    assert second.written == [b"a", b"b", b"c", b"d", b"e"]
    assert first.written == [] and rig.core.pending == []
    # Interrupted and reattached again: nothing is written twice.
    rig.lc.stream_closed(FACTS)
    rig.lc.engine_lost("the engine does not answer")
    rig.lc.engine_back()
    third = rig.stream_up()
    rig.lc.stream_started(0, 0)
    assert third.calls == [("resize", 80, 24)]
    assert second.written == [b"a", b"b", b"c", b"d", b"e"]


def test_pending_input_of_a_client_that_left_reaches_the_shell_on_reattach():
    rig = interrupted()
    rig.lc.write(b"a")
    rig.lc.detach(rig.client, 0)
    rig.lc.engine_lost("the engine does not answer")
    rig.lc.engine_back()
    stream = rig.stream_up()
    rig.lc.stream_started(0, 0)
    assert rig.state == "Detached"
    assert stream.written == [b"a"] and rig.core.pending == []


def test_pending_input_typed_during_a_takeover_while_starting_is_kept():
    rig = starting()
    rig.lc.write(b"a")
    rig.attach()
    rig.lc.write(b"b")
    stream = rig.stream_up()
    rig.lc.stream_started(0, 0)
    assert stream.written == [b"a", b"b"]


# -- handed and unsent ----------------------------------------------------------------------

def test_handed_counts_what_reached_the_client_and_not_what_never_went_out():
    rig = attached()
    for piece in (b"0123", b"456789"):
        rig.lc.output(piece)
        assert rig.core.handed == rig.core.replay.end
    rig.lc.detach(rig.client, 6)
    assert rig.core.handed == 4
    rig.lc.output(b"ab")
    assert rig.core.handed == 4, "nobody got it"
    second = rig.attach()
    assert second.events == [("started", SID, True), ("output", b"456789ab")]
    assert second.offset == rig.core.handed == 12
    rig.lc.detach(second, 0)
    third = rig.attach()
    assert third.events == [("started", SID, True)] and third.offset == 12


def test_a_takeover_without_an_offset_resumes_at_what_was_handed():
    rig = attached(output=b"0123456789")
    old = rig.client
    new = rig.attach()
    assert old.events == [("taken_over",)]
    assert new.events == [("started", SID, True)] and new.offset == 10


def test_a_takeover_with_an_offset_gets_what_it_lacks():
    rig = attached(output=b"0123456789")
    new = rig.attach(7)
    assert new.events == [("started", SID, True), ("output", b"789")]
    assert new.offset == rig.core.handed == 10


@pytest.mark.parametrize("reach, away", [(detached, []),
                                         (interrupted_alone, [("notice", "engine_away")]),
                                         (reattaching_alone, [("notice", "engine_away")])])
def test_an_offset_beyond_the_output_hears_the_shell_restarted(reach, away):
    rig = reach(output=b"0123456789")
    new = rig.attach(50)
    assert new.events == [("started", SID, True), ("notice", "shell_restarted"),
                          ("output", b"0123456789"), *away]
    assert new.offset == rig.core.handed == rig.core.replay.end == 10


# -- takeover, let_go, expire --------------------------------------------------------------

@pytest.mark.parametrize("reach, hears", [
    (starting, []),
    (attached, [("started", SID, True)]),
    (resuming, []),
    (interrupted, [("started", SID, True), ("notice", "engine_away")]),
    (reattaching, [("started", SID, True), ("notice", "engine_away")]),
])
def test_the_newest_client_takes_over(reach, hears):
    rig = reach()
    state = rig.state
    old = rig.client
    new = rig.attach()
    assert rig.state == state
    assert old.events == [("taken_over",)]
    assert new.events == hears
    assert rig.core.client is new and rig.core.left_at is None
    assert rig.effects.calls == [], "no second make or reattach"


def test_a_takeover_while_resuming_resumes_the_newest_client_from_its_offset():
    rig = resuming(offset=100)
    old = rig.client
    new = rig.attach(100)
    assert rig.core.want == 100
    rig.stream_up()
    rig.lc.stream_started(100, 0)
    rig.lc.output(b"0123456789abc")
    assert old.events == [("taken_over",)]
    assert new.events == [("started", SID, True), ("output", b"0123456789abc")]
    assert new.offset == 113


def test_a_takeover_while_resuming_from_further_back_hears_of_the_gap():
    rig = resuming(offset=100)
    new = rig.attach(90)
    rig.stream_up()
    rig.lc.stream_started(100, 0)
    assert new.events == [("started", SID, True), ("dropped", 10, 100)]
    assert new.offset == 100


LET_GO = [
    # reach, what let_go returns, where it leads, what the attached client hears
    (starting, False, "Ended", [("failed", "the capsule server shut down", "restarting")]),
    (starting_orphaned, False, "Ended", []),
    (preparing, False, "Ended", [("failed", "the capsule server shut down", "restarting")]),
    (preparing_alone, False, "Ended", []),
    (attached, True, "Ended", [("interrupted", "capsule is restarting")]),
    (detached, True, "Ended", []),
    (recovered, True, "Ended", []),
    (resuming, True, "Ended", [("interrupted", "capsule is restarting")]),
    (interrupted, True, "Ended", [("interrupted", "capsule is restarting")]),
    (interrupted_alone, True, "Ended", []),
    (reattaching, True, "Ended", [("interrupted", "capsule is restarting")]),
    (reattaching_alone, True, "Ended", []),
    (ending, False, "Ending", []),
    (ended, False, "Ended", []),
]


@pytest.mark.parametrize("reach, lives_on, target, hears", LET_GO,
                         ids=[r[0].__name__ for r in LET_GO])
def test_let_go_says_whether_the_session_lives_on(reach, lives_on, target, hears):
    rig = reach()
    stream = rig.core.stream
    live_stream = stream is not None and rig.state in ("Attached", "Detached")
    result = rig.lc.let_go("capsule is restarting")
    assert result is lives_on
    assert rig.state == target
    assert rig.core.client is None
    assert (rig.client.events if rig.client else []) == hears
    assert (stream.calls if stream else []) == ([("lose",)] if live_stream else [])
    # A kept session's container stays; one that never ran goes.
    assert rig.effects.calls == ([] if lives_on or reach in (ending, ended)
                                 else [("forget", rig.owner), ("remove", rig.owner)])


@pytest.mark.parametrize("reach", [resuming, reattaching, reattaching_alone])
def test_let_go_closes_a_stream_being_brought_up(reach):
    rig = reach()
    stream = rig.stream_up()
    assert rig.lc.let_go("capsule is restarting") is True
    assert rig.state == "Ended"
    assert stream.calls == [("resize", 80, 24), ("lose",)]
    assert rig.effects.calls == []


MOVED_FROM = [attached, detached, recovered, resuming, resuming_alone, interrupted,
              interrupted_alone, reattaching, reattaching_alone]


@pytest.mark.parametrize("reach", MOVED_FROM, ids=[r.__name__ for r in MOVED_FROM])
def test_a_session_another_replica_took_is_forgotten_and_its_client_taken_over(reach):
    """
    Another replica serves it now: an attached client hears a takeover (as
    from another tab), not an end; the session is forgotten, its stream
    closed, and its container never removed.
    """
    rig = reach()
    stream = rig.core.stream
    attached_client = rig.core.client
    heard = list(attached_client.events) if attached_client else None
    assert rig.lc.moved(MOVED) is None
    assert rig.state == "Ended" and rig.lc.status() == "ended"
    assert rig.core.client is None and rig.core.message == MOVED
    assert rig.core.exit_code is None
    assert rig.effects.calls == [("forget", rig.owner)]
    if attached_client is not None:
        assert attached_client.events == heard + [("taken_over",)]
    if stream is not None:
        assert stream.calls[-1] == ("lose",) and rig.core.stream is None


@pytest.mark.parametrize("reach", [resuming, reattaching_alone])
def test_moved_closes_a_stream_being_brought_up(reach):
    rig = reach()
    stream = rig.stream_up()
    rig.lc.moved(MOVED)
    assert stream.calls == [("resize", 80, 24), ("lose",)]
    assert rig.effects.calls == [("forget", rig.owner)]


EXPIRE = [r for r in REACH if r != "New"]


@pytest.mark.parametrize("state", EXPIRE)
def test_expire_ends_only_a_session_nobody_waits_for(state):
    rig = REACH[state]()
    stream = rig.core.stream
    before = rig.snapshot()
    expired = rig.lc.expire()
    if state not in ("Detached", "Recovered"):
        assert expired is False
        assert rig.snapshot() == before and rig.quiet()
        return
    assert expired is True
    assert rig.state == "Ending"
    assert rig.effects.calls == [("forget", rig.owner), ("remove", rig.owner)]
    assert (stream.calls if stream else []) == ([("lose",)] if state == "Detached" else [])
    assert (rig.client.events if rig.client else []) == []
    assert (rig.core.exit_code, rig.core.message) == (None, "the session expired")


# -- sizes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("reach", [starting, starting_orphaned, recovered, resuming,
                                   interrupted, interrupted_alone, reattaching,
                                   reattaching_alone, ending, ended])
def test_a_size_with_no_live_stream_is_remembered(reach):
    rig = reach()
    rig.lc.resize(100, 30)
    assert rig.core.size == (100, 30)
    assert rig.quiet()


@pytest.mark.parametrize("reach, bring_up", [
    (starting, lambda rig: None),
    (recovered, lambda rig: rig.attach()),
    (interrupted, lambda rig: (rig.lc.engine_lost("away"), rig.lc.engine_back())),
    (interrupted_alone, lambda rig: (rig.lc.engine_lost("away"), rig.lc.engine_back())),
])
def test_a_remembered_size_is_applied_to_the_next_stream(reach, bring_up):
    rig = reach()
    rig.lc.resize(100, 30)
    bring_up(rig)
    stream = rig.stream_up()
    assert stream.calls == [("resize", 100, 30)]


# -- defects found here -------------------------------------------------------------------------

@pytest.mark.parametrize("reach", [starting, resuming, reattaching, reattaching_alone])
def test_a_resize_while_the_stream_comes_up_reaches_the_shell(reach):
    rig = reach()
    stream = rig.stream_up()
    rig.lc.resize(120, 40)
    rig.lc.stream_started(rig.core.replay.end, 0)
    assert [c for c in stream.calls if c[0] == "resize"][-1] == ("resize", 120, 40)


def test_a_client_back_while_a_resume_is_under_way_resumes_where_it_was():
    rig = resuming(offset=500)
    rig.lc.detach(rig.client, 0)
    new = rig.attach(500)
    rig.stream_up()
    rig.lc.stream_started(500, 0)
    rig.lc.output(b"more")
    assert new.events == [("started", SID, True), ("output", b"more")]
    assert new.offset == 504


def test_reattached_after_a_gap_the_client_hears_what_was_dropped():
    rig = reattaching(output=b"0123456789")
    rig.stream_up()
    rig.lc.stream_started(25, 15)
    assert ("notice", "shell_restarted") not in rig.client.events
    assert ("dropped", 15, 25) in rig.client.events
    assert rig.client.offset == 25


def test_unsent_bytes_no_longer_held_are_reported_dropped():
    rig = attached(output=b"0123456789abcdefghijklmnopqrst", replay_bytes=16)
    rig.lc.detach(rig.client, 20)
    new = rig.attach()
    assert new.events[:2] == [("started", SID, True), ("dropped", 4, 14)]
    assert new.offset == 30


def test_a_takeover_while_resuming_from_further_on_is_not_told_the_shell_restarted():
    rig = resuming(offset=100)
    new = rig.attach(110)
    rig.stream_up()
    rig.lc.stream_started(100, 0)
    rig.lc.output(b"0123456789abc")
    assert ("notice", "shell_restarted") not in new.events
    assert new.offset == rig.core.replay.end == 113
