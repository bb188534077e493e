"""
L{ExportQueue}: the export workers, shared fairly between client addresses.
"""

import pytest

from capsule.web.export import ExportQueue, TooManyExports


def test_a_freed_worker_goes_to_the_client_with_fewest_running():
    queue = ExportQueue(workers=1, per_client=2)
    started = []
    tickets = {}
    for name in ("a1", "a2", "b1", "c1"):
        tickets[name] = queue.join(name[0])
        tickets[name].ready.addCallback(lambda _, name=name: started.append(name))
    assert started == ["a1"]
    tickets["a1"].done()
    # Not a2, which asked first: b, and then c, were not served yet.
    assert started == ["a1", "b1"]
    tickets["b1"].done()
    assert started == ["a1", "b1", "c1"]
    tickets["c1"].done()
    assert started == ["a1", "b1", "c1", "a2"]
    tickets["a2"].done()
    assert (queue.running, queue.waiting(), queue.of("a")) == (0, 0, 0)


def test_round_robin_among_clients_with_equal_shares():
    queue = ExportQueue(workers=2, per_client=3)
    a = [queue.join("a") for _ in range(3)]
    b = [queue.join("b") for _ in range(3)]
    assert [t.ready.called for t in a + b] == [True, True, False, False, False, False]
    a[0].done()
    # b has none running, a has one.
    assert [t.ready.called for t in a + b] == [True, True, False, True, False, False]
    a[1].done()
    # One each running: a was served longest ago.
    assert [t.ready.called for t in a + b] == [True, True, True, True, False, False]
    b[0].done()
    assert b[1].ready.called and not b[2].ready.called


def test_a_client_over_its_limit_is_refused():
    queue = ExportQueue(workers=4, per_client=2)
    first, second = queue.join("a"), queue.join("a")
    with pytest.raises(TooManyExports):
        queue.join("a")
    assert queue.join("b").ready.called
    first.done()
    first.done()  # once only
    assert queue.of("a") == 1
    queue.join("a")
    with pytest.raises(TooManyExports):
        queue.join("a")
    assert second.running


def test_a_waiting_export_that_is_cancelled_gives_its_place_up():
    queue = ExportQueue(workers=1, per_client=2)
    running = queue.join("a")
    waiting = queue.join("b")
    errors = []
    waiting.ready.addErrback(errors.append)
    waiting.ready.cancel()
    assert len(errors) == 1
    assert (queue.of("b"), queue.waiting()) == (0, 0)
    later = queue.join("c")
    running.done()
    assert later.ready.called and queue.running == 1
