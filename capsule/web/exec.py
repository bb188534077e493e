"""
C{POST /api/sessions/{id}/exec}: run a command to completion beside the
terminal, as C{developer}, and answer with its output and exit code, within
the limits here (argv, environment, output, time, execs at once).
"""

from __future__ import annotations

import re
import time

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from capsule.engine.command import utf8_text

from capsule.web.api_base import (ApiError, SessionPost, answer_when, count_down, integer_field,
                                  json_request, only_keys, text_field)

_log = Logger()

EXEC_MAX_BODY = 8 * 1024 * 1024
EXEC_TIMEOUT = 60.0
EXEC_MAX_TIMEOUT = 600.0
EXEC_OUTPUT = 1024 * 1024
EXEC_MAX_OUTPUT = 16 * 1024 * 1024
# Commands one session may run at once; uploads one session, and the
# server, may unpack at once.
EXECS_PER_SESSION = 4
# Bytes of output all running commands together may hold (each holds up to
# twice its max_output until it ends): past it a new one gets 503.
EXEC_OUTPUT_BUDGET = 256 * 1024 * 1024
# Seconds capsule waits for a command past its own timeout (which
# `timeout -s KILL` enforces in the container) before it lets it go.
EXEC_SLACK = 10.0
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
    only_keys(body, {"argv", "stdin", "cwd", "env", "timeout", "max_output"})
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
    return {"argv": [str(a) for a in argv], "stdin": stdin.encode("utf-8", "surrogatepass"),
            "cwd": cwd, "env": env, "timeout": float(timeout), "max_output": max_output}


def timed_argv(argv: list[str], timeout: float) -> list[str]:
    """
    C{argv} under coreutils' C{timeout}, which kills it (and what it
    started) with SIGKILL after C{timeout} seconds.
    """
    return ["timeout", "-s", "KILL", "--", f"{timeout:g}", *argv]


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
        running = api.execs.get(session.id, 0)
        if running >= EXECS_PER_SESSION:
            raise ApiError(429, f"session {session.id} runs {running} commands already (at"
                                f" most {EXECS_PER_SESSION} at once)", "too_many_execs")
        reserve = 2 * wanted["max_output"]
        if api.output_reserved + reserve > EXEC_OUTPUT_BUDGET:
            raise ApiError(503, "the commands running now may return as much output as capsule"
                                " holds at once: try again shortly, or ask for less"
                                " (max_output)", "busy")
        turn = api.enter_docker(request)
        api.execs[session.id] = running + 1
        api.output_reserved += reserve
        api.touch(session)
        d = Deferred.fromCoroutine(self._run(session, spec, wanted, turn))

        def release(result):
            api.output_reserved -= reserve
            return result
        return answer_when(request, d.addBoth(release), "an exec")

    async def _run(self, session, spec, wanted, turn):
        api = self.api
        keep = api.hold(session)
        slot = None
        try:
            slot = await turn
            # Its turn may have come after the session ended.
            api.ended_meanwhile(session, "the command waited")
            started = time.monotonic()

            async def stdin(transport) -> None:
                # The exec is made and its stream open: no Docker thread is
                # held while the command runs.
                slot.release()
                if wanted["stdin"]:
                    transport.write(wanted["stdin"])
            result = await api.docker.run_command(
                session.container_id, timed_argv(wanted["argv"], wanted["timeout"]),
                spec.user, wanted["cwd"], {**spec.environment, **wanted["env"]},
                stdin, wanted["max_output"], wanted["timeout"] + EXEC_SLACK)
        finally:
            if slot is not None:
                slot.release()
            keep.stop()
            count_down(api.execs, session.id)
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
        timed_out = result.cut or (result.exit_code == 137 and elapsed >= wanted["timeout"])
        _log.info("session {short}: {program!r} exited {code} in {elapsed:.2f} s{how}",
                  short=session.id[:8], program=wanted["argv"][0][:100],
                  code=result.exit_code, elapsed=elapsed,
                  how=" (timed out)" if timed_out else "")
        return 200, {
            "stdout": utf8_text(result.stdout, result.truncated_stdout),
            "stderr": utf8_text(result.stderr, result.truncated_stderr),
            "exit_code": result.exit_code, "timed_out": timed_out,
            "truncated": {"stdout": result.truncated_stdout,
                          "stderr": result.truncated_stderr},
            "duration": round(elapsed, 3)}


def session_spec(manager, session):
    settings = getattr(session, "settings", None)
    return settings.spec if settings is not None else manager.config.spec
