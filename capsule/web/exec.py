"""
C{POST /api/sessions/{id}/exec}: run a command to completion beside the
terminal, as C{developer}, and answer with its output and exit code, within
the limits here (argv, environment, output, time, execs at once).

What an answer costs is bounded whatever the bytes are: each stream goes
as JSON text when it is UTF-8 that escaping at most doubles, else as base64
(L{encode_output}); the answer is written piece by piece as its client
reads (L{capsule.web.api_base.StreamedAnswer}), so capsule holds the raw
output and never its JSON; its size, counted as JSON, is held against a
budget per user and one for the server (L{OutputBudget}) until it is
written, or dropped because its client stopped reading.

An exec's processes carry a mark in their environment (L{EXEC_MARK}, a
random id per exec): past its timeout, every process of the container that
carries it is killed (L{kill_marked_argv}), those that left the exec's
process group (C{setsid}) included.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
import secrets
import time
from typing import Iterator

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from capsule.engine.command import whole_characters

from capsule.web.api_base import (ApiError, SessionPost, StreamedAnswer, answer_when,
                                  integer_field, json_request, only_keys, text_field)

_log = Logger()

EXEC_MAX_BODY = 8 * 1024 * 1024
EXEC_TIMEOUT = 60.0
EXEC_MAX_TIMEOUT = 600.0
EXEC_OUTPUT = 1024 * 1024
EXEC_MAX_OUTPUT = 16 * 1024 * 1024
# Commands one session may run at once; uploads one session, and the
# server, may unpack at once.
EXECS_PER_SESSION = 4
# Bytes of answers, counted as JSON, that all execs together may hold or
# owe their clients (each counts answer_bound(max_output) from its start,
# then its answer's size until that is written): past it a new one gets
# 503 busy.  capsule holds at most half of it (the raw output).
EXEC_OUTPUT_BUDGET = 512 * 1024 * 1024
# The same, for the execs of one user (with users): past it, 429
# answers_pending.
EXEC_OUTPUT_PER_USER = 256 * 1024 * 1024
# Seconds an answer waits for a client that takes none of it in before it
# is dropped and its connection closed (the tuning knob
# answer-write-timeout).
EXEC_WRITE_TIMEOUT = 30.0
# Seconds capsule waits for a command past its own timeout (which
# `timeout -s KILL` enforces in the container) before it lets it go.
EXEC_SLACK = 10.0
# Seconds past its timeout after which capsule kills what a command that
# still runs started (the processes that carry its mark).
KILL_AFTER = 1.0
# Seconds capsule waits for that kill.
KILL_TIMEOUT = 30.0
# The environment variable that marks an exec's processes.
EXEC_MARK = "CAPSULE_EXEC_ID"
ENCODINGS = ("auto", "base64")
MAX_ARGV = 1024
MAX_ARGV_BYTES = 256 * 1024
MAX_ENV = 256
MAX_PATH = 4096
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
# What the runtime (runc) writes, as the exec's output with exit code 126,
# when it cannot enter the exec's working directory.
_CWD_FAILED = re.compile(rb"\AOCI runtime exec failed: .*?chdir to cwd .*? failed: ([^:\r\n]{1,200})")


def exec_request(body: dict, workdir: str) -> dict:
    """
    An exec request's fields, checked, with their defaults.

    @raise ApiError: for one that is missing, of the wrong type or too large.
    """
    only_keys(body, {"argv", "stdin", "cwd", "env", "timeout", "max_output",
                     "output_encoding"})
    argv = body.get("argv")
    if (not isinstance(argv, list) or not argv or len(argv) > MAX_ARGV
            or not all(isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]):
        raise ApiError(400, f"argv must be a list of 1 to {MAX_ARGV} strings without NUL, the"
                            " first not empty", "bad_request")
    if sum(len(a.encode("utf-8", "surrogatepass")) + 1 for a in argv) > MAX_ARGV_BYTES:
        raise ApiError(400, f"argv is longer than {MAX_ARGV_BYTES} bytes", "bad_request")
    stdin = body.get("stdin")
    stdin = "" if stdin is None else stdin
    if not isinstance(stdin, str):
        # Any text, NUL included: it goes through a pipe, not a C string.
        raise ApiError(400, "stdin must be a string", "bad_request")
    cwd = text_field(body, "cwd", MAX_PATH)
    cwd = workdir if cwd is None else cwd
    if not cwd.startswith("/"):
        raise ApiError(400, "cwd must be an absolute path", "bad_request")
    env = body.get("env")
    env = {} if env is None else env
    if (not isinstance(env, dict) or len(env) > MAX_ENV
            or not all(isinstance(k, str) and _ENV_NAME.match(k) and isinstance(v, str)
                       and "\0" not in v and len(v) <= 65536 for k, v in env.items())):
        raise ApiError(400, f"env must be an object of at most {MAX_ENV} names (letters,"
                            " digits, _) to strings without NUL", "bad_request")
    timeout = body.get("timeout", EXEC_TIMEOUT)
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not 0 < timeout <= EXEC_MAX_TIMEOUT):
        raise ApiError(400, f"timeout must be a number of seconds above 0, at most"
                            f" {EXEC_MAX_TIMEOUT:g}", "bad_request")
    max_output = integer_field(body, "max_output", EXEC_OUTPUT, 0, EXEC_MAX_OUTPUT)
    encoding = body.get("output_encoding", "auto")
    if encoding not in ENCODINGS:
        raise ApiError(400, "output_encoding must be \"auto\" (text when it is UTF-8, else"
                            " base64) or \"base64\"", "bad_request")
    return {"argv": [str(a) for a in argv], "stdin": stdin.encode("utf-8", "surrogatepass"),
            "cwd": cwd, "env": env, "timeout": float(timeout), "max_output": max_output,
            "output_encoding": encoding}


def timed_argv(argv: list[str], timeout: float) -> list[str]:
    """
    C{argv} under coreutils' C{timeout}, which kills it (and what it
    started in its process group) with SIGKILL after C{timeout} seconds.
    """
    return ["timeout", "-s", "KILL", "--", f"{timeout:g}", *argv]


# Kills, with SIGKILL, every process whose environment holds the line $1
# (that its user may read: the exec's user's), again until none is left
# (one may have forked meanwhile); in as few processes as can be, should
# the exec have filled the container's --pids.
_KILL_MARKED = (
    'm=$1; for round in 1 2 3 4 5 6 7 8 9 10; do set --;'
    ' for f in $(grep -lzxF -e "$m" /proc/[0-9]*/environ 2>/dev/null); do'
    ' f=${f#/proc/}; set -- "$@" "${f%/environ}"; done;'
    ' [ $# -eq 0 ] && exit 0; kill -9 "$@" 2>/dev/null; done; exit 1')


def kill_marked_argv(mark: str) -> list[str]:
    """
    The command that kills every process of the exec marked C{mark}.
    """
    return ["sh", "-c", _KILL_MARKED, "capsule-exec-kill", f"{EXEC_MARK}={mark}"]


# -- what an answer costs ----------------------------------------------------

MIB = 1024 * 1024
# Bytes of an answer besides its two streams (names, exit code, duration...).
ANSWER_OVERHEAD = 1024
# Bytes of output looked at, and encoded, at once.
_SCAN = 1024 * 1024
_TEXT_PIECE = 64 * 1024
_BASE64_PIECE = 48 * 1024  # a multiple of 3: the pieces' base64 joins into the whole's
# Bytes JSON's escapes may add to a stream of text beyond its own size:
# text that escapes would grow more goes as base64 (small output keeps its
# few control characters as text).
TEXT_SLACK = 64 * 1024
# What JSON escapes in a string (of text that is UTF-8, written as such):
# these as two characters (\n), the other control characters as six (\u0001).
_SHORT_ESCAPES = b'"\\\b\f\n\r\t'
_LONG_ESCAPES = bytes(b for b in range(32) if b not in b"\b\f\n\r\t")


def base64_length(size: int) -> int:
    return 4 * ((size + 2) // 3)


def stream_bound(max_output: int) -> int:
    """
    The most bytes a stream of at most C{max_output} bytes takes in an
    answer: text grows at most twice (plus L{TEXT_SLACK}), base64 by a
    third.
    """
    return max(min(6 * max_output, 2 * max_output + TEXT_SLACK), base64_length(max_output))


def answer_bound(max_output: int) -> int:
    """
    The most bytes the answer of an exec of C{max_output} takes.
    """
    return 2 * stream_bound(max_output) + ANSWER_OVERHEAD


def json_text_length(data: bytes) -> int | None:
    """
    The length of C{data} as the inside of a JSON string (UTF-8 written as
    such, control characters escaped), or C{None} if it is not UTF-8.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    length = len(data)
    for at in range(0, max(len(data), 1), _SCAN):
        chunk = data[at : at + _SCAN]
        try:
            decoder.decode(chunk, at + _SCAN >= len(data))
        except UnicodeDecodeError:
            return None
        length += len(chunk) - len(chunk.translate(None, _SHORT_ESCAPES))
        length += 5 * (len(chunk) - len(chunk.translate(None, _LONG_ESCAPES)))
    return length


class EncodedOutput:
    """
    One stream of an exec's output as the JSON string that carries it:
    C{encoding} C{"utf-8"} (its text) or C{"base64"}; C{length} is the
    string's in the answer, quotes left out.
    """

    def __init__(self, data: bytes, encoding: str, length: int) -> None:
        self._data, self.encoding, self.length = data, encoding, length

    def pieces(self) -> Iterator[bytes]:
        """
        The string's bytes, a piece at a time; the output is let go of once
        they are all made.
        """
        data, self._data = self._data, b""
        if self.encoding == "base64":
            for at in range(0, len(data), _BASE64_PIECE):
                yield base64.b64encode(data[at : at + _BASE64_PIECE])
            return
        decoder = codecs.getincrementaldecoder("utf-8")()
        for at in range(0, len(data), _TEXT_PIECE):
            text = decoder.decode(data[at : at + _TEXT_PIECE], at + _TEXT_PIECE >= len(data))
            yield json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8")


def encode_output(data: bytes, truncated: bool, always_base64: bool = False) -> EncodedOutput:
    """
    A stream of output as the answer carries it: as text when it is UTF-8
    (once a character the cut split at its end is left out) that JSON's
    escapes at most double (plus L{TEXT_SLACK}), else (or C{always_base64})
    as base64 of every byte kept.
    """
    if not always_base64:
        text = whole_characters(data) if truncated else data
        length = json_text_length(text)
        if length is not None and length <= 2 * len(text) + TEXT_SLACK:
            return EncodedOutput(text, "utf-8", length)
    return EncodedOutput(data, "base64", base64_length(len(data)))


def answer_pieces(stdout: EncodedOutput, stderr: EncodedOutput, rest: dict
                  ) -> tuple[int, Iterator[bytes]]:
    """
    The answer's length, and its bytes, a piece at a time: C{{"stdout",
    "stderr", "stdout_encoding", "stderr_encoding", **rest}}.
    """
    head, middle = b'{"stdout": "', b'", "stderr": "'
    tail = b'", ' + json.dumps({"stdout_encoding": stdout.encoding,
                                "stderr_encoding": stderr.encoding, **rest})[1:].encode()
    length = len(head) + stdout.length + len(middle) + stderr.length + len(tail)

    def pieces():
        yield head
        yield from stdout.pieces()
        yield middle
        yield from stderr.pieces()
        yield tail
    return length, pieces()


class OutputBudget:
    """
    Bytes of exec answers capsule holds or owes its clients, counted as
    JSON: for the server, and per user (with users: C{None}, anyone without
    users, has the server's alone).
    """

    def __init__(self, total: int = EXEC_OUTPUT_BUDGET,
                 per_user: int = EXEC_OUTPUT_PER_USER) -> None:
        self.total, self.per_user = total, per_user
        self.held = 0
        self.by_user: dict[str | None, int] = {}

    def take(self, user: str | None, size: int) -> "OutputHold":
        """
        Hold C{size} bytes for C{user}.

        @raise ApiError: 429 C{answers_pending} past the user's share, 503
            C{busy} past the server's.
        """
        mine = self.by_user.get(user, 0)
        if user is not None and mine + size > self.per_user:
            raise ApiError(429, f"your commands' answers not yet read may take"
                                f" {_mib(mine)} MiB, and this one {_mib(size)} MiB more (at"
                                f" most {_mib(self.per_user)} MiB per user): read them first,"
                                " or ask for less (max_output)", "answers_pending")
        if self.held + size > self.total:
            raise ApiError(503, "the commands running now may return as much output as"
                                " capsule holds at once: try again shortly, or ask for less"
                                " (max_output)", "busy")
        self.by_user[user] = mine + size
        self.held += size
        return OutputHold(self, user, size)

    def _give_back(self, user: str | None, size: int) -> None:
        self.held -= size
        left = self.by_user.get(user, 0) - size
        if left > 0:
            self.by_user[user] = left
        else:
            self.by_user.pop(user, None)


class OutputHold:
    """
    Bytes held in an L{OutputBudget}, until L{release}d.
    """

    def __init__(self, budget: OutputBudget, user: str | None, size: int) -> None:
        self._budget, self._user, self.size = budget, user, size

    def shrink(self, size: int) -> None:
        """
        Hold C{size} bytes from now on, if that is fewer.
        """
        if size < self.size:
            self._budget._give_back(self._user, self.size - size)
            self.size = size

    def release(self) -> None:
        self.shrink(0)


def _mib(size: int) -> str:
    return f"{size / MIB:.0f}" if size >= MIB else f"{size / MIB:.2f}"


class ExecResource(SessionPost):
    """
    C{POST /api/sessions/{id}/exec}.
    """

    def render_POST(self, request):
        api = self.api
        session = api.running(request, self.session_id)
        api.not_exporting(session)
        spec = session_spec(api.manager, session)
        wanted = exec_request(json_request(request, "exec"), spec.workdir)
        # Taken when the headers came (capsule.web.api), or now.
        slot = api.exec_slot(request, session)
        try:
            hold = api.output.take(session.core.user, answer_bound(wanted["max_output"]))
            try:
                turn = api.enter_docker(request)
            except BaseException:
                hold.release()
                raise
        except BaseException:
            slot.release()
            raise
        api.touch(session)
        d = Deferred.fromCoroutine(self._run(session, spec, wanted, slot, hold, turn))

        def failed(failure):
            hold.release()
            return failure
        return answer_when(request, d.addErrback(failed), "an exec")

    async def _run(self, session, spec, wanted, slot, hold: OutputHold, turn):
        api = self.api
        keep = api.hold(session)
        docker_slot = None
        timer = None
        mark = secrets.token_hex(16)
        killer = []

        def overdue():
            killer.append(Deferred.fromCoroutine(self._kill(session, spec, mark)))
        try:
            # A place among its caller's Docker calls (see capsule.sessions.call_gate).
            docker_slot = await turn
            # Its turn may have come after the session ended.
            api.ended_meanwhile(session, "the command waited")
            started = time.monotonic()
            # What it started is killed should it outlive its timeout.
            timer = api.reactor.callLater(wanted["timeout"] + KILL_AFTER, overdue)

            async def stdin(transport) -> None:
                # The exec is made and its stream open: no Docker thread is
                # held while the command runs.
                docker_slot.release()
                if wanted["stdin"]:
                    transport.write(wanted["stdin"])
            result = await api.docker.run_command(
                session.container_id, timed_argv(wanted["argv"], wanted["timeout"]),
                spec.user, wanted["cwd"],
                {**spec.environment, **wanted["env"], EXEC_MARK: mark},
                stdin, wanted["max_output"], wanted["timeout"] + EXEC_SLACK)
        finally:
            if timer is not None and timer.active():
                timer.cancel()
            if docker_slot is not None:
                docker_slot.release()
            keep.stop()
            slot.release()
            api.touch(session)
        api.ended_meanwhile(session, "the command")
        elapsed = time.monotonic() - started
        cwd_failed = (_CWD_FAILED.search(result.stdout[:2000])
                      if result.exit_code == 126 else None)
        if cwd_failed:
            # The runtime could not enter cwd; it says so in the output.
            raise ApiError(400, f"cwd {wanted['cwd'][:200]}: the command cannot be run there"
                                f" ({cwd_failed.group(1).decode('utf-8', 'replace')})",
                           "bad_cwd")
        timed_out = bool(result.cut or killer
                         or (result.exit_code == 137 and elapsed >= wanted["timeout"]))
        if timed_out:
            if not killer:
                # It ended, but what it started may not have.
                overdue()
            await killer[0]
        _log.info("session {short}: {program!r} exited {code} in {elapsed:.2f} s{how}",
                  short=session.id[:8], program=wanted["argv"][0][:100],
                  code=result.exit_code, elapsed=elapsed,
                  how=" (timed out)" if timed_out else "")
        always_base64 = wanted["output_encoding"] == "base64"
        stdout = encode_output(result.stdout, result.truncated_stdout, always_base64)
        stderr = encode_output(result.stderr, result.truncated_stderr, always_base64)
        length, pieces = answer_pieces(stdout, stderr, {
            "exit_code": result.exit_code, "timed_out": timed_out,
            "truncated": {"stdout": result.truncated_stdout,
                          "stderr": result.truncated_stderr},
            "duration": round(elapsed, 3)})
        # Held from now on: the answer's own size, until it is written.
        hold.shrink(length)
        return 200, StreamedAnswer(
            length, pieces, api.reactor, api.answer_timeout,
            f"session {session.id[:8]}'s exec of {wanted['argv'][0][:100]!r}",
            on_end=lambda written: hold.release())

    async def _kill(self, session, spec, mark: str) -> None:
        """
        Kill every process of the exec marked C{mark} that its container
        still runs; a failure is logged, never raised.
        """
        try:
            result = await self.api.docker.run_command(
                session.container_id, kill_marked_argv(mark), spec.user, "/", {}, b"", 4096,
                KILL_TIMEOUT)
        except Exception as e:
            _log.warn("session {short}: could not kill what a command past its timeout"
                      " started: {error}", short=session.id[:8], error=str(e)[:300])
            return
        if result.exit_code != 0:
            _log.warn("session {short}: what a command past its timeout started may outlive"
                      " it: its kill exited {code}: {stderr!r}", short=session.id[:8],
                      code=result.exit_code, stderr=result.stderr[:300])


def session_spec(manager, session):
    settings = getattr(session, "settings", None)
    return settings.spec if settings is not None else manager.config.spec
