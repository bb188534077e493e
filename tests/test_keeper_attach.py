"""
capsule-keeper's attach paths, through pipes and without Docker (see
tests/keeper_harness.py): a new attach replaces the one before it, and an
attach from an offset gets a preamble with exact numbers followed by exactly
the output from there, including when part of it is no longer held.
"""

import time

import pytest

from tests.keeper_harness import keeper, relay  # noqa: F401 (fixtures)

# Prints a numbered text once it is told to, then waits for input and
# answers each line; the terminal echo is off, so output is the shell's own.
LINES = 3000
SHELL = ["sh", "-c", "stty -echo; echo pid:$$.; read go; seq 1 %d; echo END.;"
                     " while read line; do echo got:$line.; done" % LINES]


def printed(pid: bytes) -> bytes:
    """
    Everything SHELL prints, as its terminal delivers it (CR LF).
    """
    text = b"pid:" + pid + b".\n" + b"".join(b"%d\n" % i for i in range(1, LINES + 1)) + b"END.\n"
    return text.replace(b"\n", b"\r\n")


def started(relay, **kwargs):
    """
    A relay whose keeper has printed everything; that relay and the full
    output of the shell.
    """
    first = relay(SHELL, **kwargs)
    offset, dropped, start = first.preamble()
    assert (offset, dropped) == (0, 0)
    end = first.until(b"pid:")
    pid = bytes(first.output[end:first.until(b".", end) - 1])
    first.send(b"go\n")
    first.until(b"END.\r\n", start)
    full = printed(pid)
    assert bytes(first.output[start:]) == full
    return first, full


def test_a_new_attach_replaces_the_one_before(relay):
    """
    The attach before gets C{k} after what it was sent, and exits; the new
    one has the shell's input and output.
    """
    first, full = started(relay)
    second = relay(SHELL, socket=first.socket, offset=len(full))
    assert second.preamble() == (len(full), 0, len(second.output))
    assert first.wait() == (0, "")
    assert first.frames[-1] == (b"k", 0)
    assert [kind for kind, _ in first.frames].count(b"k") == 1
    second.send(b"hello\n")
    second.until(b"got:hello.\r\n")
    assert bytes(second.output).endswith(b"\x1b\\got:hello.\r\n")
    # The shell's answer went to the new attach only.
    assert b"got:" not in first.output


def test_each_attach_replaces_the_last(relay):
    first, full = started(relay)
    attaches = [first]
    for i in range(5):
        attaches.append(relay(SHELL, socket=first.socket, offset=len(full)))
        attaches[-1].preamble()
        assert attaches[-2].wait() == (0, "")
        assert attaches[-2].frames[-1] == (b"k", 0)
    attaches[-1].send(b"last\n")
    attaches[-1].until(b"got:last.\r\n")


def test_an_attach_from_an_offset_gets_exactly_what_follows_it(relay):
    first, full = started(relay)
    for offset in (0, 1, 7, 4000, len(full) - 1, len(full)):
        later = relay(SHELL, socket=first.socket, offset=offset)
        at, dropped, start = later.preamble()
        assert (at, dropped) == (offset, 0)
        # Nothing more comes than the shell printed: after it comes the
        # answer to this input.
        answer = b"got:x%d.\r\n" % offset
        later.send(b"x%d\n" % offset)
        later.until(answer, start)
        assert bytes(later.output[start:]) == full[offset:] + answer
        full += answer


def test_an_offset_past_the_end_resumes_at_the_end(relay):
    """
    An offset the shell has not reached (a client that counted wrong) gets
    the end, and no bytes dropped.
    """
    first, full = started(relay)
    for offset in (len(full) + 1, 2**64 - 1):
        later = relay(SHELL, socket=first.socket, offset=offset)
        at, dropped, start = later.preamble()
        assert (at, dropped) == (len(full), 0)
        later.send(b"y\n")
        later.until(b"got:y.\r\n", start)
        assert bytes(later.output[start:]) == b"got:y.\r\n"
        full += b"got:y.\r\n"


@pytest.mark.parametrize("offset", [0, 100])
def test_an_offset_no_longer_held_says_what_was_dropped(relay, offset):
    """
    With 4096 bytes kept, the oldest were overwritten once they were sent: an
    attach from before them learns how many it lost and gets the rest.
    """
    first, full = started(relay, buffer=4096)
    assert len(full) > 4096 + 100
    second = relay(SHELL, socket=first.socket, offset=offset)
    at, dropped, start = second.preamble()
    assert (at, dropped) == (len(full) - 4096, len(full) - 4096 - offset)
    second.send(b"z\n")
    second.until(b"got:z.\r\n", start)
    assert bytes(second.output[start:]) == full[-4096:] + b"got:z.\r\n"


def test_output_while_nobody_is_attached_keeps_the_newest(relay):
    """
    Detached, the keeper reads the shell's output regardless and keeps the
    newest 4096 bytes of it.
    """
    first = relay(SHELL, buffer=4096)
    start = first.preamble()[2]
    end = first.until(b"pid:", start)
    pid = bytes(first.output[end:first.until(b".", end) - 1])
    full = printed(pid)
    # "go", then the relay's stdin ends: it passes the input on and leaves.
    first.send(b"go\n")
    first.process.stdin.close()
    assert first.wait() == (253, "")
    # Attaches far past the end learn where the end is, until it is all read.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = relay(SHELL, socket=first.socket, offset=2**63)
        at, dropped, _ = probe.preamble()
        assert dropped == 0
        if at == len(full):
            break
        assert at < len(full)
        probe.process.stdin.close()
        assert probe.wait()[0] == 253
    else:
        raise AssertionError(f"the keeper read {at} of {len(full)} bytes")
    last = relay(SHELL, socket=first.socket, offset=0)
    at, dropped, start = last.preamble()
    assert (at, dropped) == (len(full) - 4096, len(full) - 4096)
    last.send(b"w\n")
    last.until(b"got:w.\r\n", start)
    assert bytes(last.output[start:]) == full[-4096:] + b"got:w.\r\n"
