from twisted.internet.task import Clock

from capsule.coalesce import Coalescer


def make(delay=0.002, limit=100):
    clock, sent = Clock(), []
    return clock, sent, Coalescer(clock, sent.append, delay=delay, limit=limit)


def test_a_lone_chunk_goes_out_at_once():
    clock, sent, c = make()
    c.push(b"a")
    assert sent == [b"a"]


def test_chunks_right_after_a_send_are_gathered():
    clock, sent, c = make()
    c.push(b"a")
    c.push(b"b")
    c.push(b"c")
    assert sent == [b"a"]
    clock.advance(0.002)
    assert sent == [b"a", b"bc"]


def test_after_a_quiet_spell_the_next_chunk_goes_at_once():
    clock, sent, c = make()
    c.push(b"a")
    clock.advance(1)
    c.push(b"b")
    assert sent == [b"a", b"b"]


def test_limit_flushes_early():
    clock, sent, c = make(limit=10)
    c.push(b"a")
    c.push(b"x" * 6)
    c.push(b"y" * 6)
    assert sent == [b"a", b"x" * 6 + b"y" * 6]
    assert c.pending == 0


def test_discard_cancels():
    clock, sent, c = make()
    c.push(b"a")
    c.push(b"b")
    c.discard()
    clock.advance(1)
    assert sent == [b"a"] and clock.getDelayedCalls() == []
