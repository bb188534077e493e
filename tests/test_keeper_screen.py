"""
capsule-keeper keeping a session's screen across a stop (see "The screen
across a stop" in docker/keeper/capsule-keeper.c), through pipes and without
Docker (tests/keeper_harness.py): a server started with CAPSULE_KEEPER_SCREEN
loads the saved screen as the start of its output, marked, at the offsets it
had, and saves its ring while it runs, at its end and on SIGTERM or SIGHUP.
The file is the session's to write: whatever is there, the keeper reads a
bounded part of a regular file only, and runs on.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import time
from pathlib import Path

import pytest

from capsule.core.keeper import SCREEN_ENV, SCREEN_MAX_END, encode_screen, parse_screen
from tests.keeper_harness import keeper, relay  # noqa: F401 (fixtures)

# Says so when it starts and when it ends, and answers each line.
SHELL = ["sh", "-c", "stty -echo; echo start:${CAPSULE_KEEPER_SCREEN-unset}.;"
                     " while read line; do echo got:$line.; done"]
# Prints nothing until it is told to.
QUIET = ["sh", "-c", "stty -echo; while read line; do echo got:$line.; done"]

MARKER = re.compile(
    rb"\x18\x1b\[\?1047l\x1b\[!p\x1b\[\?1000l\x1b\[\?1002l\x1b\[\?1003l\x1b\[\?1006l\x1b\[\?2004l"
    rb"\r\n\x1b\[0m\x1b\[2m\xe2\x94\x80\xe2\x94\x80 resumed \d{4}-\d\d-\d\d \d\d:\d\d UTC: the"
    rb" screen above is from before the session was put away \xe2\x94\x80\xe2\x94\x80"
    rb"\x1b\[0m\r\n")
MARKER_BYTES = len(b"\x18\x1b[?1047l\x1b[!p\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l"
                   b"\x1b[?2004l\r\n\x1b[0m\x1b[2m") + len(
    "── resumed 2026-12-07 08:40 UTC: the screen above is from before the session was put"
    " away ──".encode()) + len(b"\x1b[0m\r\n")


@pytest.fixture
def screen(tmp_path) -> Path:
    return tmp_path / "home" / ".cache" / "capsule" / "screen"


def start(relay, path, command=SHELL, **kwargs):
    "A relay that starts a keeper keeping its screen at C{path}."
    return relay(command, env={SCREEN_ENV: str(path)}, **kwargs)


def after_preamble(r) -> tuple[int, int, bytes]:
    """
    The preamble's offset and dropped count, and the output after it so far.
    """
    offset, dropped, end = r.preamble()
    return offset, dropped, bytes(r.output[end:])


def saved(path: Path, wanted: bytes, timeout: float = 10) -> tuple[bytes, int]:
    """
    The screen file, parsed, once it holds C{wanted}.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            data, end = parse_screen(path.read_bytes())
            if wanted in data:
                return data, end
        except FileNotFoundError:
            data = None
        if time.monotonic() > deadline:
            raise AssertionError(f"no {wanted!r} in {path} within {timeout} s: {data!r}")
        time.sleep(0.05)


def server_pid(r) -> int:
    """
    The keeper server of relay C{r}: the process other than the relay whose
    command line names its socket.
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != r.process.pid:
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if r.socket.encode() in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    [pid] = found
    return pid


def gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.05)


# -- loading --------------------------------------------------------------------------------

def test_a_saved_screen_comes_first_marked_and_the_offsets_go_on(relay, screen):
    old = b"$ make\r\nbuilt 3 targets\r\n$ "
    screen.parent.mkdir(parents=True)
    screen.write_bytes(encode_screen(old, 5000))
    r = start(relay, screen)
    offset, dropped, _ = after_preamble(r)
    # Asked for 0: the bytes before the saved ones are gone, and said so.
    assert (offset, dropped) == (5000 - len(old), 5000 - len(old))
    end = r.until(b"start:")
    out = bytes(r.output[r.preamble()[2]:end])
    assert out.startswith(old)
    marker = MARKER.fullmatch(out[len(old):-len(b"start:")])
    assert marker, out
    assert len(marker.group(0)) == MARKER_BYTES
    # The variable is the keeper's: the shell does not have it.
    r.until(b"start:unset.\r\n")
    r.send(b"hi\n")
    r.until(b"got:hi.\r\n")


def test_an_attach_from_an_offset_before_the_stop_gets_exactly_what_it_lacked(relay, screen):
    """
    A client that had the output up to OFFSET before the stop asks for
    OFFSET and gets the rest of the saved screen, the marker, the new
    output: nothing twice, nothing missing.
    """
    old = b"0123456789"
    screen.parent.mkdir(parents=True)
    screen.write_bytes(encode_screen(old, 1000))
    first = start(relay, screen, offset=997)
    offset, dropped, _ = after_preamble(first)
    assert (offset, dropped) == (997, 0)
    first.until(b"start:unset.\r\n")
    assert bytes(first.output[first.preamble()[2]:]).startswith(b"789\x18")
    first.send(b"new\n")
    first.until(b"got:new.\r\n")
    new = b"start:unset.\r\ngot:new.\r\n"
    # One that had it all: the marker and what follows only.
    second = relay(SHELL, socket=first.socket, offset=1000)
    offset, dropped, out = after_preamble(second)
    assert (offset, dropped) == (1000, 0)
    second.until(b"got:new.\r\n")
    out = bytes(second.output[second.preamble()[2]:])
    assert MARKER.fullmatch(out[:-len(new)]) and out.endswith(new)
    # One from past the end (another shell's offsets): the end, nothing dropped.
    third = relay(SHELL, socket=first.socket, offset=10**9)
    assert after_preamble(third)[:2] == (1000 + MARKER_BYTES + len(new), 0)


def test_a_file_without_a_header_is_all_screen_from_offset_0(relay, screen):
    screen.parent.mkdir(parents=True)
    screen.write_bytes(b"\x1b_capsule-screen;start=99999999999999999\x1b\\old")
    r = start(relay, screen, command=QUIET)
    offset, dropped, _ = after_preamble(r)
    assert (offset, dropped) == (0, 0)
    r.until(b"\x1b[0m\r\n")
    out = bytes(r.output[r.preamble()[2]:])
    assert out.startswith(b"\x1b_capsule-screen;start=99999999999999999\x1b\\old\x18")


def test_an_end_past_the_largest_believed_is_no_header(relay, screen):
    screen.parent.mkdir(parents=True)
    screen.write_bytes(encode_screen(b"x", SCREEN_MAX_END))
    assert after_preamble(start(relay, screen, command=QUIET))[:2] == (SCREEN_MAX_END - 1,
                                                                         SCREEN_MAX_END - 1)
    other = screen.with_name("other")
    other.write_bytes(b"\x1b_capsule-screen;start=%d\x1b\\x" % (SCREEN_MAX_END + 1))
    assert after_preamble(start(relay, other, command=QUIET))[:2] == (0, 0)


def test_only_the_newest_buffer_bytes_are_loaded(relay, screen):
    body = bytes(range(48, 58)) * 1000  # 10000 bytes
    screen.parent.mkdir(parents=True)
    screen.write_bytes(encode_screen(body, 20000))
    r = start(relay, screen, command=QUIET, buffer=4096)
    offset, dropped, _ = after_preamble(r)
    # The ring holds 4096 bytes: the marker and the newest of the screen.
    kept = 4096 - MARKER_BYTES
    assert (offset, dropped) == (20000 - kept, 20000 - kept)
    r.until(b"\x1b[0m\r\n")
    out = bytes(r.output[r.preamble()[2]:])
    assert out[:kept] == body[-kept:] and MARKER.fullmatch(out[kept:])


def test_an_empty_file_or_none_loads_nothing(relay, screen):
    screen.parent.mkdir(parents=True)
    screen.write_bytes(b"")
    r = start(relay, screen)
    assert after_preamble(r)[:2] == (0, 0)
    end = r.until(b"start:unset.\r\n")
    assert bytes(r.output[r.preamble()[2]:end]) == b"start:unset.\r\n"


# -- hostile files ----------------------------------------------------------------------------

def fresh_start(r) -> None:
    "The keeper loaded nothing: offsets from 0, the shell's output first."
    offset, dropped, _ = after_preamble(r)
    assert (offset, dropped) == (0, 0)
    end = r.until(b"start:unset.\r\n")
    assert bytes(r.output[r.preamble()[2]:end]) == b"start:unset.\r\n"
    r.send(b"alive\n")
    r.until(b"got:alive.\r\n")


def test_a_symbolic_link_is_neither_followed_nor_replaced(relay, screen, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not the screen")
    screen.parent.mkdir(parents=True)
    screen.symlink_to(target)
    r = start(relay, screen)
    fresh_start(r)
    r.stop()  # the server saved as it could meanwhile
    assert screen.is_symlink() and target.read_bytes() == b"not the screen"
    assert sorted(p.name for p in screen.parent.iterdir()) == ["screen"]


def test_a_fifo_neither_blocks_nor_loads_nor_is_replaced(relay, screen):
    screen.parent.mkdir(parents=True)
    os.mkfifo(screen)
    r = start(relay, screen)
    fresh_start(r)
    r.stop()
    assert stat.S_ISFIFO(screen.lstat().st_mode)


def test_a_directory_is_neither_read_nor_replaced(relay, screen):
    screen.mkdir(parents=True)
    (screen / "inside").write_bytes(b"x")
    r = start(relay, screen)
    fresh_start(r)
    r.send(b"again\n")
    r.until(b"got:again.\r\n")
    r.stop()
    assert screen.is_dir() and (screen / "inside").read_bytes() == b"x"
    assert [p.name for p in screen.parent.iterdir()] == ["screen"]  # no temporary file left


def test_a_device_is_neither_read_nor_replaced(relay, screen):
    screen.parent.mkdir(parents=True)
    try:  # /dev/zero's twin, in the test's own directory
        os.mknod(screen, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("making a device node needs privileges")
    r = start(relay, screen)
    fresh_start(r)
    r.stop()
    assert stat.S_ISCHR(screen.lstat().st_mode)
    assert sorted(p.name for p in screen.parent.iterdir()) == ["screen"]


def test_a_huge_file_loads_only_its_end(relay, screen):
    screen.parent.mkdir(parents=True)
    header = b"\x1b_capsule-screen;start=0\x1b\\"
    with open(screen, "wb") as f:  # sparse: 64 GiB of nothing, then the screen's end
        f.write(header)
        f.seek(64 << 30)
        f.write(b"the end")
    body = screen.stat().st_size - len(header)
    assert body == (64 << 30) + 7 - len(header)
    r = start(relay, screen, command=QUIET, buffer=4096)
    offset, dropped, _ = after_preamble(r)
    # The ring holds the newest 4096 bytes, then the marker pushes the oldest out.
    kept = 4096 - MARKER_BYTES
    assert (offset, dropped) == (body - kept, body - kept)
    r.until(b"\x1b[0m\r\n")
    out = bytes(r.output[r.preamble()[2]:])
    assert out[:kept] == b"\0" * (kept - 7) + b"the end" and MARKER.fullmatch(out[kept:])


def test_a_relative_path_is_ignored(relay, tmp_path):
    r = relay(SHELL, env={SCREEN_ENV: "relative/screen"})
    fresh_start(r)
    r.stop()
    assert not (Path.cwd() / "relative").exists()


# -- saving -----------------------------------------------------------------------------------

def test_output_is_saved_while_the_session_runs(relay, screen):
    """
    The directory is made, private; the file holds the ring and the
    offset after it, and is written again as output comes.
    """
    r = start(relay, screen)
    r.until(b"start:unset.\r\n")
    data, end = saved(screen, b"start:unset.")
    assert data == b"start:unset.\r\n" and end == len(data)
    assert stat.S_IMODE(screen.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(screen.stat().st_mode) == 0o600
    r.send(b"one\n")
    data, end = saved(screen, b"got:one.")
    assert data == b"start:unset.\r\ngot:one.\r\n" and end == len(data)
    # Nothing else is left in the directory.
    assert [p.name for p in screen.parent.iterdir()] == ["screen"]


# Answers each line; "big" prints 20000 bytes at once.
BIG = ["sh", "-c", "stty -echo; echo start.; while read line; do case $line in"
                   " big) head -c 20000 /dev/zero | tr '\\0' x; echo;; *) echo got:$line.;;"
                   " esac; done"]


def test_saves_append_to_the_file_the_keeper_left(relay, screen):
    """
    The output since the last save is added to the file; a file that is
    not the one the keeper left (replaced, written to) is written anew:
    either way it holds what the keeper holds.
    """
    r = start(relay, screen, command=BIG)
    r.until(b"start.\r\n")
    saved(screen, b"start.")
    inode = screen.stat().st_ino
    r.send(b"one\n")
    assert saved(screen, b"got:one.") == (b"start.\r\ngot:one.\r\n", 18)
    assert screen.stat().st_ino == inode  # appended, not replaced
    # Replaced (as capsule's own save does): written anew.
    screen.write_bytes(encode_screen(b"capsule's", 9))
    r.send(b"two\n")
    data, end = saved(screen, b"got:two.")
    assert (data, end) == (b"start.\r\ngot:one.\r\ngot:two.\r\n", 28)
    # Written to by the session: written anew.
    with open(screen, "ab") as f:
        f.write(b"junk")
    r.send(b"three\n")
    data, end = saved(screen, b"got:three.")
    assert b"junk" not in data and end == 40


def test_more_than_the_ring_since_the_last_save_writes_the_file_anew(relay, screen):
    r = start(relay, screen, command=BIG, buffer=4096)
    r.until(b"start.\r\n")
    saved(screen, b"start.")
    since = 0
    for _ in range(3):
        r.send(b"big\nafter\n")
        since = r.until(b"got:after.\r\n", since)
    r.send(b"end\n")
    r.until(b"got:end.\r\n")
    data, end = saved(screen, b"got:end.")
    whole = bytes(r.output[r.preamble()[2]:])
    assert end == len(whole) and data == whole[-len(data):]
    assert 4096 <= len(data) <= 2 * 4096 + 64
    assert screen.stat().st_size <= 64 + 2 * 4096


def test_a_saved_screen_is_saved_again_with_its_marker(relay, screen):
    screen.parent.mkdir(parents=True)
    screen.write_bytes(encode_screen(b"before", 100))
    r = start(relay, screen)
    r.until(b"start:unset.\r\n")
    data, end = saved(screen, b"start:unset.")
    assert data.startswith(b"before\x18") and MARKER.search(data)
    assert end == 100 + MARKER_BYTES + len(b"start:unset.\r\n")


def test_nothing_is_saved_without_the_variable(relay, tmp_path):
    r = relay(SHELL)
    r.until(b"start:unset.\r\n")
    r.send(b"x\n")
    r.until(b"got:x.\r\n")
    r.stop()
    assert list(tmp_path.iterdir()) == [tmp_path / "sanitizer-logs"]


# The shell prints "first", and "second" a moment later: within SAVE_MS of
# the save "first" caused, so that only what follows saves "second".
TWO = ["sh", "-c", "stty -echo; echo first.; sleep 0.3; echo second.; read line; echo got:$line."]


def test_the_screen_is_saved_when_the_server_ends(relay, screen):
    r = start(relay, screen, command=["sh", "-c", "echo first.; sleep 0.3; echo second.;"
                                                  " exit 3"])
    r.until(b"first.")
    pid = server_pid(r)
    r.wait()
    assert r.status == 3
    gone(pid)
    data, _ = saved(screen, b"second.", timeout=0)
    assert data == b"first.\r\nsecond.\r\n"


def test_the_screen_is_saved_on_sigterm_and_the_server_ends(relay, screen):
    r = start(relay, screen, command=TWO)
    r.until(b"second.\r\n")
    pid = server_pid(r)
    os.kill(pid, signal.SIGTERM)
    gone(pid)
    data, _ = saved(screen, b"second.", timeout=0)
    assert data == b"first.\r\nsecond.\r\n"


def test_the_screen_is_saved_on_sighup_and_the_server_goes_on(relay, screen):
    r = start(relay, screen, command=TWO)
    r.until(b"second.\r\n")
    os.kill(server_pid(r), signal.SIGHUP)
    assert saved(screen, b"second.", timeout=1.5)[0] == b"first.\r\nsecond.\r\n"
    r.send(b"still\n")
    r.until(b"got:still.")


def test_an_idle_server_does_not_wake_up(relay, screen):
    """
    Saved and nobody attached, a server with nothing to do sleeps: no
    timer for the screen while it has nothing new.
    """
    r = start(relay, screen)
    r.until(b"start:unset.\r\n")
    saved(screen, b"start:unset.")
    pid = server_pid(r)
    r.stop()

    def switches() -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", status).group(1))
    time.sleep(0.5)  # the relay's leaving is handled
    before = switches()
    time.sleep(2.5)  # longer than SAVE_MS
    assert switches() == before
