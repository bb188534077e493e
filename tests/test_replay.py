from capsule.core.replay import ReplayBuffer


def test_offsets_and_since():
    buffer = ReplayBuffer(10)
    buffer.append(b"abc")
    buffer.append(b"defg")
    assert (buffer.start, buffer.end, len(buffer)) == (0, 7, 7)
    assert buffer.since(0) == (b"abcdefg", 0)
    assert buffer.since(3) == (b"defg", 0)
    assert buffer.since(7) == (b"", 0)


def test_old_output_is_dropped_and_counted():
    buffer = ReplayBuffer(5)
    for chunk in (b"abc", b"def", b"gh"):
        buffer.append(chunk)
    assert (buffer.start, buffer.end) == (3, 8)
    assert buffer.since(0) == (b"defgh", 3)
    assert buffer.since(4) == (b"efgh", 0)


def test_chunk_larger_than_limit():
    buffer = ReplayBuffer(4)
    buffer.append(b"x")
    buffer.append(b"0123456789")
    assert buffer.since(0) == (b"6789", 7)
    assert buffer.end == 11


def test_zero_limit_keeps_offsets_only():
    buffer = ReplayBuffer(0)
    buffer.append(b"abc")
    assert buffer.end == 3 and len(buffer) == 0
    assert buffer.since(0) == (b"", 3)


def test_offsets_beyond_end_are_clamped():
    buffer = ReplayBuffer(8)
    buffer.append(b"abc")
    assert buffer.since(99) == (b"", 0)
    assert buffer.since(-5) == (b"abc", 0)
