"""
The terminal output that the live clients (tests, bench, soak) wait on.
"""

import re

import pytest

from tests.support.clients import Output
from tests.support.live import WaitFailed


def results(d):
    found = []
    d.addBoth(found.append)
    return found


def test_a_marker_split_across_chunks_is_found():
    out = Output()
    found = results(out.wait_for(b"42__RDY", 10))
    for piece in (b"echo ...\r\n4", b"2__", b"RDY\r\n$ "):
        assert found == []
        out.feed(piece)
    assert found == [len(b"echo ...\r\n42__RDY\r\n$ ")]


def test_only_output_after_since_counts():
    out = Output()
    out.feed(b"MARK before")
    found = results(out.wait_for(b"MARK", 10))
    assert found == []
    out.feed(b" and MARK after")
    assert found == [out.total]
    assert results(out.wait_for(b"MARK", 10, since=0)) == [out.total]


def test_keep_bounds_what_is_kept_but_not_what_is_counted():
    out = Output(keep=10)
    for _ in range(100):
        out.feed(b"0123456789")
    assert out.total == 1000 and out.chunks == 100
    assert len(out.kept) <= 20 and out.kept.endswith(b"0123456789")
    found = results(out.wait_for(b"END", 10))
    out.feed(b"xxEN")
    out.feed(b"Dyy")
    assert found == [1007]


def test_a_pattern_fires_with_its_match():
    out = Output()
    out.feed(b"abB\r\nhello\r\n")
    found = results(out.wait_for(re.compile(rb"abB\r\n(.*?)abE\r\n", re.S), 10, since=0))
    assert found == []
    out.feed(b"abE\r\n")
    assert found[0].group(1) == b"hello\r\n"


def test_clear_forgets_what_was_kept():
    out = Output()
    out.feed(b"old MARK")
    out.clear()
    assert out.kept == b""
    found = results(out.wait_for(re.compile(b"MARK"), 10, since=out.start))
    assert found == []
    out.feed(b"new MARK")
    assert found[0].group(0) == b"MARK"


def test_waiters_fail_when_the_stream_ends():
    out = Output()
    out.feed(b"last words")
    found = results(out.wait_for(b"never", 10))
    out.lost("the WebSocket closed (1006)")
    with pytest.raises(WaitFailed, match=r"the WebSocket closed \(1006\).*last words"):
        found[0].raiseException()
    later = results(out.wait_for(b"never", 10))
    with pytest.raises(WaitFailed, match="the WebSocket closed"):
        later[0].raiseException()
