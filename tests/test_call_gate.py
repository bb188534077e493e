"""
L{CallGate}: Docker calls in flight per caller, so that one caller can
never hold every Docker thread.
"""

import pytest
from twisted.internet.defer import CancelledError

from capsule.sessions.call_gate import CallGate, TooManyCalls


def _slots(gate, caller, n):
    got = []
    for _ in range(n):
        gate.enter(caller).addCallback(got.append)
    return got


def test_a_caller_gets_its_limit_at_once_and_the_next_in_turn():
    gate = CallGate(limit=2, waiting=3)
    got = _slots(gate, "alice", 4)
    assert len(got) == 2
    assert (gate.under_way("alice"), gate.queued("alice")) == (2, 2)
    got[0].release()
    # The freed place goes to the next call in line, not back to the pool.
    assert len(got) == 3
    assert (gate.under_way("alice"), gate.queued("alice")) == (2, 1)
    for slot in got[1:]:
        slot.release()
    assert len(got) == 4
    got[3].release()
    assert (gate.under_way("alice"), gate.queued("alice")) == (0, 0)


def test_another_caller_is_not_held_by_one_at_its_limit():
    gate = CallGate(limit=1, waiting=2)
    _slots(gate, "alice", 3)
    with pytest.raises(TooManyCalls) as refused:
        gate.enter("alice")
    assert (refused.value.limit, refused.value.waiting) == (1, 2)
    assert "alice has 1 Docker calls under way and 2 waiting" in str(refused.value)
    assert len(_slots(gate, "bob", 1)) == 1


def test_a_refusal_keeps_no_state():
    gate = CallGate(limit=1, waiting=0)
    [slot] = _slots(gate, "alice", 1)
    for _ in range(100):
        with pytest.raises(TooManyCalls):
            gate.enter("alice")
    assert gate.queued("alice") == 0 and gate._queues == {}
    slot.release()
    assert gate._under_way == {}


def test_a_slot_is_given_back_once():
    gate = CallGate(limit=2, waiting=0)
    first, second = _slots(gate, "alice", 2)
    first.release()
    first.release()
    assert gate.under_way("alice") == 1
    second.release()
    assert gate.under_way("alice") == 0


def test_a_waiting_call_that_is_cancelled_gives_its_turn_up():
    gate = CallGate(limit=1, waiting=2)
    [slot] = _slots(gate, "alice", 1)
    waiting = gate.enter("alice")
    later = []
    gate.enter("alice").addCallback(later.append)
    errors = []
    waiting.addErrback(errors.append)
    waiting.cancel()
    assert errors[0].check(CancelledError)
    assert gate.queued("alice") == 1
    slot.release()
    assert len(later) == 1 and gate.under_way("alice") == 1


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        CallGate(limit=0, waiting=1)
    with pytest.raises(ValueError):
        CallGate(limit=1, waiting=-1)
