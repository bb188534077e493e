"""
L{ExportQueue}: the export workers, shared fairly between client addresses;
L{Spool}: what an export holds between Docker's stream and its client.
"""

import threading

import pytest

from capsule.web.export import ExportQueue, TooManyExports
from capsule.web.streams import Spool, SpoolBudget, SpoolClosed, SpoolStalled


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


def test_a_worker_given_back_goes_on_while_its_export_still_counts():
    # Docker's stream is read (the spool holds the rest): the worker serves
    # the next export, and the client's download still counts against it.
    queue = ExportQueue(workers=1, per_client=2)
    first = queue.join("a")
    second = queue.join("a")
    assert not second.ready.called
    first.release()
    assert second.ready.called and queue.running == 1
    with pytest.raises(TooManyExports):
        queue.join("a")
    first.done()
    second.done()
    assert (queue.running, queue.of("a")) == (0, 0)


# -- the spool between Docker's stream and the client ---------------------------


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _drain(spool, most=7):
    out = b""
    while data := spool.take(most):
        out += data
    return out


def test_the_spool_gives_back_what_it_was_given_in_order_through_memory_and_file(tmp_path):
    budget = SpoolBudget(total=1000, memory=40)
    spool = Spool(budget, limit=500, memory=20, directory=str(tmp_path))
    pieces = [bytes([i]) * 10 for i in range(30)]
    written = b""
    for piece in pieces[:20]:
        spool.thd_put(piece, stall=1)
        written += piece
    # 20 bytes in memory, the rest in the file; the budget counts them all.
    assert (budget.held, budget.in_memory, spool.pending) == (200, 20, 200)
    got = spool.take(15) + spool.take(100)
    for piece in pieces[20:]:
        spool.thd_put(piece, stall=1)
        written += piece
    got += _drain(spool)
    assert got == written
    assert (budget.held, budget.in_memory, spool.pending, spool.taken) == (0, 0, 0, 300)
    spool.close()


def test_a_spool_full_of_what_its_reader_does_not_take_stalls_its_writer():
    clock = _Clock()
    budget = SpoolBudget(total=1000)
    spool = Spool(budget, limit=30, clock=clock)
    spool.thd_put(b"x" * 30, stall=5)
    failed = []

    def writer():
        try:
            spool.thd_put(b"y" * 10, stall=5)
        except SpoolStalled as e:
            failed.append(e)
    thread = threading.Thread(target=writer)
    thread.start()
    # The reader takes nothing; time passes.
    while not failed:
        clock.now += 1
        with budget.condition:
            budget.condition.notify_all()
        thread.join(0.01)
    thread.join()
    assert failed[0].own
    assert failed[0].message == ("its client read nothing for 5 s while its spool was full"
                                 " (30 bytes)")
    spool.close()
    assert budget.held == 0


def test_a_reader_that_takes_makes_room_for_the_writer():
    budget = SpoolBudget(total=1000)
    spool = Spool(budget, limit=10)
    spool.thd_put(b"a" * 10, stall=30)
    thread = threading.Thread(target=spool.thd_put, args=(b"b" * 10, 30))
    thread.start()
    assert spool.take(10) == b"a" * 10
    thread.join(10)
    assert not thread.is_alive()
    assert _drain(spool) == b"b" * 10


def test_the_shared_budget_bounds_every_spool():
    budget = SpoolBudget(total=25, memory=0)
    one, other = Spool(budget, limit=100), Spool(budget, limit=100)
    one.thd_put(b"1" * 20, stall=1)
    with pytest.raises(SpoolStalled) as stalled:
        other.thd_put(b"2" * 10, stall=0.05)
    assert not stalled.value.own
    assert "capsule's export spool was full (25 bytes)" in stalled.value.message
    assert budget.full() is False and budget.held == 20
    one.close()
    other.thd_put(b"2" * 10, stall=1)
    assert _drain(other) == b"2" * 10


def test_closing_the_spool_frees_the_writer_and_its_budget():
    budget = SpoolBudget(total=1000)
    spool = Spool(budget, limit=10)
    spool.thd_put(b"a" * 10, stall=30)
    errors = []

    def writer():
        try:
            spool.thd_put(b"b", stall=30)
        except SpoolClosed as e:
            errors.append(e)
    thread = threading.Thread(target=writer)
    thread.start()
    spool.close()
    thread.join(10)
    assert len(errors) == 1 and budget.held == 0 and budget.in_memory == 0
    assert spool.take(10) == b""
    with pytest.raises(SpoolClosed):
        spool.thd_put(b"c", stall=1)
