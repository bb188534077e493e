"""
"While you were away": a session's recording (L{capsule.ops.recording})
since a moment, as one asciicast v2 a player plays from its start.

A session's recording is one file per capsule run that recorded it
(C{DIR/SESSIONID-YYYYmmddTHHMMSSZ.cast}, in the order of their names).
L{playback} reads the file that was being written at C{since} and those
after it, and gives:

 - a header with the terminal's size at C{since} and C{since} as its
   C{timestamp};
 - the lead-in: the last L{LEAD_BYTES} (at most) of output before C{since}
   in that file, from a line's start, as one event at 0 s, so that the
   player's screen looks like the one its owner left; then a marker
   (C{"m"}) "you left here";
 - every event since C{since}, its time rebased so that the first one is
   at 0 s (and a marker where a later capsule run's file begins, or where
   the recording began after C{since}: the output before that was not
   recorded);
 - at most C{max_bytes} in all: what is past that is left out and a last
   marker says so (L{Playback.cut}).

Files are read here, in the caller's thread (the recorder's own: never the
reactor), line by line; lines before C{since} only have their time looked
at.  A line that is not an event is skipped.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from dataclasses import dataclass

# Output before `since` replayed at once as the screen that was left.
LEAD_BYTES = 64 * 1024
# Bytes of asciicast one answer holds, by default.
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
# The longest header line read (the recorder's are ~100 bytes).
MAX_HEADER = 64 * 1024
# A recording's file: the session's id, then when it began.
_NAME = re.compile(r"^(?P<id>[0-9a-f-]{36})-(?P<stamp>\d{8}T\d{6}Z)\.cast$")
_TIME = re.compile(rb"^\[\s*([0-9.eE+-]+)\s*,")

LEFT_MARKER = "you left here"


class NotRecorded(Exception):
    "The session has no recording in the directory."


@dataclass(frozen=True)
class Playback:
    """
    @ivar data: the asciicast, UTF-8.
    @ivar parts: the files it was read from.
    @ivar events: the events since C{since} it holds.
    @ivar cut: whether events were left out at its end (C{max_bytes}).
    """

    data: bytes
    parts: int
    events: int
    cut: bool


def recording_files(directory: str, session_id: str) -> list[str]:
    """
    The paths of C{session_id}'s recording files, oldest first.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _NAME.match(name)
        if match and match.group("id") == session_id:
            found.append(name)
    return [os.path.join(directory, name) for name in sorted(found)]


def _header(f) -> dict | None:
    line = f.readline(MAX_HEADER)
    try:
        head = json.loads(line)
    except ValueError:
        return None
    if (not isinstance(head, dict) or head.get("version") != 2
            or not isinstance(head.get("timestamp"), (int, float))):
        return None
    return head


def _time(line: bytes) -> float | None:
    "An event line's time, without decoding the rest of it."
    match = _TIME.match(line)
    if match is None:
        return None
    try:
        return float(match.group(1))
    except ValueError:
        return None


def _event(line: bytes) -> list | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if (isinstance(event, list) and len(event) == 3 and isinstance(event[0], (int, float))
            and isinstance(event[1], str) and isinstance(event[2], str)):
        return event
    return None


def _size(head: dict) -> tuple[int, int]:
    width, height = head.get("width"), head.get("height")
    if type(width) is int and type(height) is int and width > 0 and height > 0:
        return width, height
    return 80, 24


def _resized(text: str, size: tuple[int, int]) -> tuple[int, int]:
    cols, _, rows = text.partition("x")
    if cols.isdigit() and rows.isdigit() and int(cols) > 0 and int(rows) > 0:
        return int(cols), int(rows)
    return size


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))


def _line(at: float, kind: str, data: str) -> bytes:
    return (json.dumps([round(max(0.0, at), 6), kind, data], ensure_ascii=False)
            + "\n").encode("utf-8")


def playback(directory: str, session_id: str, since: float,
             max_bytes: int = DEFAULT_MAX_BYTES, lead_bytes: int = LEAD_BYTES) -> Playback:
    """
    C{session_id}'s recording since the Unix time C{since} (see the
    module's description).

    @raise NotRecorded: it has no recording in C{directory}.
    """
    paths = recording_files(directory, session_id)
    if not paths:
        raise NotRecorded(session_id)
    heads = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                heads.append((path, _header(f)))
        except OSError:
            heads.append((path, None))
    readable = [(path, head) for path, head in heads if head is not None]
    if not readable:
        raise NotRecorded(session_id)
    # The file being written at `since`: the last one begun by then (the
    # first one when all began after it).
    first = 0
    for index, (_, head) in enumerate(readable):
        if head["timestamp"] <= since:
            first = index
    chosen = readable[first:]
    size = _size(chosen[0][1])
    env = chosen[0][1].get("env")
    term = env.get("TERM") if isinstance(env, dict) else None
    lead: deque[bytes] = deque()  # raw lines of output before `since`
    lead_held = 0
    body: list[bytes] = []
    held = 0
    base: float | None = None  # the Unix time of the first event since `since`
    events = 0
    cut = False
    notes: list[tuple[float, str]] = []
    if chosen[0][1]["timestamp"] > since:
        notes.append((chosen[0][1]["timestamp"],
                      f"the recording begins at {_clock(chosen[0][1]['timestamp'])}:"
                      " nothing earlier was recorded"))

    def add(line: bytes) -> bool:
        nonlocal held, cut
        if held + len(line) > max_bytes:
            cut = True
            return False
        body.append(line)
        held += len(line)
        return True

    for part, (path, head) in enumerate(chosen):
        start = head["timestamp"]
        if part > 0:
            notes.append((start, f"capsule restarted: its next recording begins at"
                                 f" {_clock(start)}"))
        try:
            f = open(path, "rb")
        except OSError:
            notes.append((start, "a part of this recording could not be read"))
            continue
        with f:
            f.readline(MAX_HEADER)
            for line in f:
                at = _time(line)
                if at is None:
                    continue
                at += start
                if at < since:
                    # Only its kind is looked at now: the lead-in's lines
                    # are decoded at the end, the last few alone.
                    kind = line[:48]
                    if b', "r", ' in kind:
                        event = _event(line)
                        if event is not None:
                            size = _resized(event[2], size)
                    elif b', "o", ' in kind and lead_bytes > 0:
                        lead.append(line)
                        lead_held += len(line)
                        while lead and lead_held - len(lead[0]) >= 2 * lead_bytes:
                            lead_held -= len(lead.popleft())
                    continue
                event = _event(line)
                if event is None:
                    continue
                if base is None:
                    base = at
                while notes and notes[0][0] <= at:
                    note_at, text = notes.pop(0)
                    if not add(_line(max(0.0, note_at - base), "m", text)):
                        break
                if cut or not add(_line(at - base, event[1], event[2])):
                    break
                events += 1
        if cut:
            break
    if base is None:
        base = since
    for note_at, text in notes:
        if cut or not add(_line(max(0.0, note_at - base), "m", text)):
            break
    head = {"version": 2, "width": size[0], "height": size[1],
            "timestamp": int(since),
            "env": {"TERM": term if isinstance(term, str) else "xterm-256color"}}
    opening: list[bytes] = [(json.dumps(head) + "\n").encode("utf-8")]
    texts = [event[2] for event in map(_event, lead) if event is not None]
    text = "".join(texts).encode("utf-8")
    if len(text) > lead_bytes:
        # From the start of a line: not from the middle of an escape.
        text = text[-lead_bytes:]
        newline = text.find(b"\n")
        text = text[newline + 1:] if newline >= 0 else b""
    if text:
        opening.append(_line(0.0, "o", text.decode("utf-8", "replace")))
    opening.append(_line(0.0, "m", LEFT_MARKER))
    if cut:
        end = _line(body_end(body), "m",
                    f"cut here: what followed is more than one playback holds ({max_bytes}"
                    " bytes); jump to now for the live terminal")
        body.append(end)
    data = b"".join(opening) + b"".join(body)
    return Playback(data=data, parts=len(chosen), events=events, cut=cut)


def body_end(body: list[bytes]) -> float:
    "The time of the last event line in C{body} (0 for none)."
    for line in reversed(body):
        at = _time(line)
        if at is not None:
            return at
    return 0.0
