from twisted.internet.task import Clock

from capsule.core.coalesce import Coalescer


def make(delay=0.002, limit=100, burst=10):
    clock, sent = Clock(), []
    return clock, sent, Coalescer(clock, sent.append, delay=delay, limit=limit, burst=burst)


def test_a_lone_chunk_goes_out_at_once():
    clock, sent, c = make()
    c.push(b"a")
    assert sent == [b"a"]


def test_quick_small_replies_are_not_held():
    clock, sent, c = make(burst=10)
    for ch in b"abc":
        c.push(bytes([ch]))
    assert sent == [b"a", b"b", b"c"]


def test_a_flood_is_gathered_until_the_window_ends():
    clock, sent, c = make(burst=10)
    c.push(b"x" * 8)
    c.push(b"y" * 8)  # over the burst within the window: held
    c.push(b"z" * 8)
    assert sent == [b"x" * 8]
    clock.advance(0.002)
    assert sent == [b"x" * 8, b"y" * 8 + b"z" * 8]


def test_after_a_quiet_spell_the_next_chunk_goes_at_once():
    clock, sent, c = make(burst=1)
    c.push(b"aa")
    clock.advance(1)
    c.push(b"bb")
    assert sent == [b"aa", b"bb"]


def test_limit_flushes_early():
    clock, sent, c = make(limit=10, burst=1)
    c.push(b"a")
    c.push(b"x" * 6)
    c.push(b"y" * 6)
    assert sent == [b"a", b"x" * 6 + b"y" * 6]
    assert c.pending == 0


def test_discard_cancels():
    clock, sent, c = make(burst=0)
    c.push(b"a")
    c.push(b"b")
    c.discard()
    clock.advance(1)
    assert sent == [b"a"] and clock.getDelayedCalls() == []
