import pytest

from capsule.core.keeper import Preamble, PreambleReader, keeper_argv
from capsule.core.replay import ReplayBuffer

PRE = b"\x1b_capsule-keeper;offset=1234;dropped=56\x1b\\"


def test_argv():
    assert keeper_argv(("bash", "-l"), offset=7, buffer=2048, socket="/s") == [
        "capsule-keeper", "-r", "-b", "4096", "-o", "7", "/s", "--", "bash", "-l"]


def test_frames_round_trip():
    from capsule.core.keeper import MAX_FRAME, FrameReader, encode_input, encode_window
    reader = FrameReader()
    data = encode_input(b"x" * (MAX_FRAME + 10)) + encode_window(132, 40)
    frames = []
    for i in range(0, len(data), 7):
        frames += reader.feed(data[i : i + 7])
    assert [(k, len(p)) for k, p in frames] == [(b"i", MAX_FRAME), (b"i", 10), (b"w", 4)]
    assert frames[2][1] == b"\x00\x84\x00\x28"


def test_demultiplexer():
    from capsule.engine.exec_process import Demultiplexer
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


# -- fail closed (issue 9) ---------------------------------------------------------

def test_frame_reader_fails_closed_at_the_header():
    import struct
    from capsule.core.keeper import RELAY_FRAMES, FrameError, FrameReader
    reader = FrameReader(RELAY_FRAMES)
    with pytest.raises(FrameError) as e:
        reader.feed(b"o\x00\x00\x00\x02ok" + b"o\xff\xff\xff\xff")
    assert e.value.frames == [(b"o", b"ok")]
    assert e.value.message == "a 'o' frame of 4294967295 bytes (0..65536 allowed)"
    assert reader._buffer == b""
    with pytest.raises(FrameError) as e:
        reader.feed(b"o" + struct.pack(">I", 1) + b"!")
    assert e.value.frames == [] and reader._buffer == b""


@pytest.mark.parametrize("header,message", [
    (b"z\x00\x00\x00\x00", "a frame of unknown type b'z'"),
    (b"x\x00\x00\x00\x03", "a 'x' frame of 3 bytes (4..4 allowed)"),
    (b"k\x00\x00\x00\x01", "a 'k' frame of 1 bytes (0..0 allowed)"),
    (b"o\x00\x01\x00\x01", "a 'o' frame of 65537 bytes (0..65536 allowed)"),
])
def test_relay_frames_of_other_kinds_or_sizes(header, message):
    from capsule.core.keeper import RELAY_FRAMES, FrameError, FrameReader
    reader = FrameReader(RELAY_FRAMES)
    with pytest.raises(FrameError, match=message.replace("(", r"\(").replace(")", r"\)")):
        for byte in header:
            reader.feed(bytes([byte]))


def test_exit_status_is_a_shells():
    from capsule.core.keeper import exit_status
    assert exit_status(b"\x00\x00\x00\xff") == 255
    with pytest.raises(ValueError):
        exit_status(b"\x00\x00\x01\x00")


@pytest.mark.parametrize("offset,dropped,wanted,ok", [
    (0, 0, 0, True),
    (300, 0, 300, True),       # what was asked for
    (100, 60, 40, True),       # 40 is older than what the keeper holds (from 100)
    (10, 0, 300, True),        # the shell restarted: its offsets began again
    (2**53, 0, None, True),
    (2**53 + 1, 0, None, False),
    (10**60 - 1, 0, None, False),
    (5, 6, None, False),
    (301, 0, 300, False),      # past what was asked for, none dropped
    (100, 50, 40, False),      # dropped does not explain the start
])
def test_check_preamble(offset, dropped, wanted, ok):
    from capsule.core.keeper import check_preamble
    assert (check_preamble(Preamble(offset, dropped), wanted) is None) is ok


def test_rate_limited_log():
    from twisted.logger import Logger
    from capsule.core.ratelog import RateLimitedLog
    events = []
    log = RateLimitedLog(Logger(observer=events.append), interval=60)
    assert log.error(0, "s1", "k", "one {x}", x=1)
    assert not any(log.error(t, "s1", "k", "one {x}", x=1) for t in range(1, 60))
    assert log.error(0, "s2", "k", "other")
    assert log.error(0, "s1", "j", "another kind")
    assert log.error(60, "s1", "k", "one {x}", x=1)
    assert [e.get("more") for e in events] == [None, None, None, 59]
    log.error(61, "s1", "k", "one")
    log.forget("s1")
    assert events[-1]["more"] == 1 and events[-1]["kind"] == "k"
