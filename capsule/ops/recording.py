"""
C{--record DIR}: each session's output in asciinema's asciicast v2 format.

One file per session and capsule run, C{DIR/SESSIONID-YYYYmmddTHHMMSSZ.cast}
(the time the recording began, UTC), readable by its owner only: a header
line (version 2, the terminal's width and height, the start as a Unix time,
C{TERM}), then one line per event, C{[seconds, "o", text]} for output and
C{[seconds, "r", "COLSxROWS"]} for a resize.  Output is decoded as UTF-8
with one incremental decoder per session, so a character split between two
chunks is whole in the file; bytes that are not UTF-8 become U+FFFD.

A session's file stops growing at C{max_bytes}: its last line is then a
marker, C{[seconds, "m", "recording cut: ..."]}, and the session goes on
unrecorded.  A session recovered from an earlier run of capsule starts a
new file.

Nothing is written on the reactor thread: each session's lines gather in
memory and go to its file on one thread of the recorder's own, in order,
half a second after the first of them or at once past 64 KiB; what a
session has waiting is bounded by C{max_bytes}.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import time
from dataclasses import dataclass, field

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from capsule.ops.logformat import short_ids
from capsule.ops.playback import DEFAULT_MAX_BYTES as PLAYBACK_MAX_BYTES, playback
from capsule.sessions.observers import SessionObserver

_log = Logger()

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
# Playbacks being read at once (each reads files on the recorder's thread).
PLAYBACKS_AT_ONCE = 2
FLUSH_DELAY = 0.5
FLUSH_SIZE = 64 * 1024
TERM = "xterm-256color"


def header(cols: int, rows: int, timestamp: float, term: str = TERM) -> str:
    "The header line of a recording."
    return json.dumps({"version": 2, "width": cols, "height": rows,
                       "timestamp": int(timestamp), "env": {"TERM": term}}) + "\n"


def event(elapsed: float, kind: str, data: str) -> str:
    "One event line of a recording."
    return json.dumps([round(elapsed, 6), kind, data], ensure_ascii=False) + "\n"


def file_name(session_id: str, started: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    return f"{session_id}-{stamp}.cast"


def check_directory(path: str) -> str | None:
    """
    Make the recordings' directory (C{0700}) if it is missing; say what is
    wrong with it (C{None}: nothing).
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        return f"cannot make {path}: {e.strerror}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable by capsule"
    return None


def tighten_directory(path: str) -> int | None:
    """
    Make the recordings' directory C{path} (made if missing) readable by
    its owner only: its file names are full session ids, and each lets
    whoever reads it into its session.  Return the mode it had when that
    was looser (C{None}: it was tight already, or made now).

    @raise OSError: it cannot be made, or its mode cannot be changed.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    mode = os.stat(path).st_mode & 0o7777
    if not mode & 0o077:
        return None
    os.chmod(path, mode & ~0o077)
    return mode


def _write(path: str, data: bytes, create: bool) -> None:
    "On the recorder's thread: append C{data} to C{path}."
    flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


class RecorderBusy(Exception):
    "A playback cannot be read now; its message says why."


@dataclass(eq=False)
class _Recording:
    """
    One session's recording: what it has written, what waits.
    """

    path: str
    started: float
    session_id: str
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    pending: list[bytes] = field(default_factory=list)
    pending_bytes: int = 0
    written: int = 0  # bytes given to the file, or on their way to it
    created: bool = False
    cut: bool = False
    failed: bool = False
    timer: object = None


class SessionRecorder(Service, SessionObserver):
    """
    Records sessions' output (see the module's description).  The session
    manager tells it of output, resizes and ends; the clock gives the times
    (its C{seconds()} a Unix time, as the reactor's is).

    @ivar directory: where recordings go.
    @ivar max_bytes: bytes after which a session's recording is cut.
    """

    def __init__(self, directory: str, clock, max_bytes: int = DEFAULT_MAX_BYTES,
                 run_in_thread=None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._clock = clock
        self._recordings: dict[str, _Recording] = {}
        self._writes: set[Deferred] = set()
        self._pool: ThreadPool | None = None
        self._run = run_in_thread
        self._reading = 0

    # -- the service ---------------------------------------------------

    def startService(self) -> None:
        try:
            loose = tighten_directory(self.directory)
        except OSError as e:
            _log.warn("cannot make the recordings' directory {path} readable by capsule only"
                      " ({error}): whoever can list it reads full session ids",
                      path=self.directory, error=e.strerror)
        else:
            if loose is not None:
                _log.info("the recordings' directory {path} was mode {old:04o}: made it {new:04o}"
                          " (its file names are session ids)", path=self.directory, old=loose,
                          new=loose & ~0o077)
        if self._run is None:
            self._pool = ThreadPool(1, 1, name="capsule-recorder")
            self._pool.start()
            self._run = lambda f, *a: deferToThreadPool(self._clock, self._pool, f, *a)
        super().startService()

    def stopService(self) -> Deferred:
        """
        Write what waits; the sessions go on (with capsule-keeper they
        outlive capsule), and a later run records them in new files.
        """
        super().stopService()
        for recording in list(self._recordings.values()):
            self._flush(recording)
        self._recordings.clear()
        d = DeferredList(list(self._writes)) if self._writes else succeed(None)

        def stop(_):
            if self._pool is not None:
                self._pool.stop()
                self._pool = None
                self._run = None

        return d.addBoth(stop)

    # -- playback ---------------------------------------------------------

    @property
    def reading(self) -> int:
        "Playbacks being read now."
        return self._reading

    def playback(self, session_id: str, since: float,
                 max_bytes: int = PLAYBACK_MAX_BYTES) -> Deferred:
        """
        C{session_id}'s recording since the Unix time C{since}
        (L{capsule.ops.playback.playback}), read on the recorder's thread
        after what the session has waiting is written: a Deferred that
        fires with a L{capsule.ops.playback.Playback}, or fails with
        L{capsule.ops.playback.NotRecorded}.

        @raise RecorderBusy: L{PLAYBACKS_AT_ONCE} are being read, or the
            recorder is not running.
        """
        if self._run is None or not self.running:
            raise RecorderBusy("capsule is stopping: recordings cannot be read now")
        if self._reading >= PLAYBACKS_AT_ONCE:
            raise RecorderBusy(f"capsule reads {PLAYBACKS_AT_ONCE} recordings already:"
                               " try again shortly")
        recording = self._recordings.get(session_id)
        if recording is not None:
            self._flush(recording)
        self._reading += 1
        d = self._run(playback, self.directory, session_id, since, max_bytes)

        def done(result):
            self._reading -= 1
            return result

        return d.addBoth(done)

    # -- what the session manager tells (ISessionObserver) ----------------

    def session_output(self, session, data: bytes) -> None:
        if not self.running:
            # Stopped (capsule is stopping): what follows is not recorded.
            return
        recording = self._recordings.get(session.id)
        if recording is None:
            recording = self._begin(session)
        if recording.cut or recording.failed:
            return
        text = recording.decoder.decode(data)
        if text:
            self._add(recording, event(self._elapsed(recording), "o", text))

    def session_resized(self, session, cols: int, rows: int) -> None:
        recording = self._recordings.get(session.id)
        if recording is None or recording.cut or recording.failed:
            # Not begun: the header will have the size.
            return
        self._add(recording, event(self._elapsed(recording), "r", f"{cols}x{rows}"))

    def session_ended(self, session) -> None:
        recording = self._recordings.pop(session.id, None)
        if recording is None:
            return
        if not (recording.cut or recording.failed):
            rest = recording.decoder.decode(b"", final=True)
            if rest:
                self._add(recording, event(self._elapsed(recording), "o", rest))
        self._flush(recording)

    # -- within ----------------------------------------------------------

    def _begin(self, session) -> _Recording:
        # The header's timestamp is a whole second: events' times count
        # from it, so that it plus an event's time is when it happened
        # (playback reads them so).
        now = math.floor(self._clock.seconds())
        cols, rows = session.core.size
        recording = _Recording(os.path.join(self.directory, file_name(session.id, now)), now,
                               session.id)
        self._recordings[session.id] = recording
        self._add(recording, header(cols, rows, now))
        return recording

    def _elapsed(self, recording: _Recording) -> float:
        return max(0.0, self._clock.seconds() - recording.started)

    def _add(self, recording: _Recording, line: str) -> None:
        data = line.encode("utf-8")
        if recording.written + recording.pending_bytes + len(data) > self.max_bytes:
            recording.cut = True
            data = event(self._elapsed(recording), "m",
                         f"recording cut: it reached --record-max-bytes ({self.max_bytes})"
                         ).encode("utf-8")
        recording.pending.append(data)
        recording.pending_bytes += len(data)
        if recording.pending_bytes >= FLUSH_SIZE or recording.cut:
            self._flush(recording)
        elif recording.timer is None:
            recording.timer = self._clock.callLater(FLUSH_DELAY, self._flush, recording)

    def _flush(self, recording: _Recording) -> None:
        if recording.timer is not None:
            if recording.timer.active():
                recording.timer.cancel()
            recording.timer = None
        if not recording.pending or recording.failed or self._run is None:
            return
        data = b"".join(recording.pending)
        recording.pending, recording.pending_bytes = [], 0
        recording.written += len(data)
        create, recording.created = not recording.created, True
        d = self._run(_write, recording.path, data, create)
        self._writes.add(d)

        def failed(f):
            if not recording.failed:
                recording.failed = True
                # The file's name is the session's full id: the log names
                # the session by its prefix, as every line does.
                _log.error("cannot write the recording of session {session_id} in {path}:"
                           " {error}; this session is no longer recorded",
                           session_id=recording.session_id[:8], path=self.directory,
                           error=short_ids(f.getErrorMessage()))

        d.addErrback(failed)
        d.addBoth(lambda _: self._writes.discard(d))
