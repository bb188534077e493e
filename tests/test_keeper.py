import pytest

from capsule.keeper import Preamble, PreambleReader, keeper_argv
from capsule.replay import ReplayBuffer

PRE = b"\x1b_capsule-keeper;offset=1234;dropped=56\x1b\\"


def test_argv():
    assert keeper_argv(("bash", "-l"), offset=7, buffer=2048, socket="/s") == [
        "capsule-keeper", "-r", "-b", "4096", "-o", "7", "/s", "--", "bash", "-l"]


def test_frames_round_trip():
    from capsule.keeper import MAX_FRAME, FrameReader, encode_input, encode_window
    reader = FrameReader()
    data = encode_input(b"x" * (MAX_FRAME + 10)) + encode_window(132, 40)
    frames = []
    for i in range(0, len(data), 7):
        frames += reader.feed(data[i : i + 7])
    assert [(k, len(p)) for k, p in frames] == [(b"i", MAX_FRAME), (b"i", 10), (b"w", 4)]
    assert frames[2][1] == b"\x00\x84\x00\x28"


def test_demultiplexer():
    from capsule.exec_process import Demultiplexer
    demux = Demultiplexer()
    stream = b"\x01\x00\x00\x00\x00\x00\x00\x03abc" + b"\x02\x00\x00\x00\x00\x00\x00\x02no"
    pieces = []
    for byte in stream:
        pieces += demux.feed(bytes([byte]))
    assert pieces == [(1, b"abc"), (2, b"no")]


def test_preamble_whole():
    reader = PreambleReader()
    assert reader.feed(PRE + b"$ ") == (Preamble(1234, 56), b"$ ")
    assert reader.feed(b"more") == (None, b"more")


@pytest.mark.parametrize("cut", range(1, len(PRE)))
def test_preamble_in_pieces(cut):
    reader = PreambleReader()
    assert reader.feed(PRE[:cut]) == (None, b"")
    assert reader.feed(PRE[cut:] + b"x") == (Preamble(1234, 56), b"x")


def test_no_keeper_means_everything_is_output():
    reader = PreambleReader()
    assert reader.feed(b"bash: capsule-keeper: not found\r\n") == (
        None, b"bash: capsule-keeper: not found\r\n")
    assert reader.missing


def test_malformed_preamble_is_output():
    reader = PreambleReader()
    junk = b"\x1b_capsule-keeper;offset=x\x1b\\rest"
    assert reader.feed(junk) == (None, junk)
    assert reader.missing


def test_replay_restart_at():
    buffer = ReplayBuffer(8)
    buffer.append(b"abc")
    buffer.restart_at(100)
    buffer.append(b"xy")
    assert (buffer.start, buffer.end) == (100, 102)
    assert buffer.since(0) == (b"xy", 100)
    assert buffer.since(101) == (b"y", 0)
