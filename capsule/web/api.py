"""
The session API for programs, under C{/api/sessions}:

  - C{POST /api/sessions}: create a session (no client needed), answer once
    it runs with its id and the page URL that opens it;
  - C{GET /api/sessions}: the caller's sessions; C{GET /api/sessions/{id}}
    one of them; C{DELETE /api/sessions/{id}} ends it;
  - C{POST /api/sessions/{id}/exec}: run a command to completion beside the
    terminal, as C{developer}, and answer with its output and exit code;
  - C{POST /api/sessions/{id}/workspace}: unpack a C{.tar} or C{.tar.gz}
    into C{/workspace}, as C{developer}, after checking every entry;
  - C{GET /api/profiles}: the profiles a client may name.

Authentication and ownership are the site's (L{capsule.auth.gate}): a session of
another user is a 404, exactly as one that does not exist.  New sessions pass
the same admission control as those of C{/ws}.  Every error is JSON:
C{{"error": sentence, "code": word}}.
"""

from __future__ import annotations

import json
import re
import time

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.internet.threads import blockingCallFromThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from capsule.core.admission import QUOTA_EXCEEDED, AdmissionRefused
from capsule.engine.command import utf8_text
from capsule.core.errors import CapsuleError, ContainerGone, DockerUnavailable
from capsule.ops.logformat import short_ids
from capsule.web.http import client_address, json_body, json_error
from capsule.web.streams import ThreadFedProducer
from capsule.core.profiles import DEFAULT_PROFILE, UnknownProfile
from capsule.sessions.service import OpenRequest, SessionService
from capsule.sessions.session import SessionEnded
from capsule.core.protocol import ProtocolError, parse_session_id
from capsule.core.tarcheck import ArchiveRefused, Interrupted, check, rewrite

_log = Logger()

# Bytes of JSON a create request may have, and an exec request (its stdin
# is in it).
CREATE_MAX_BODY = 64 * 1024
# Bytes of body read on a route that takes none (GET, DELETE): enough that
# a method it does not have, sent with a small body, gets its 405.
NO_BODY = 4096
EXEC_MAX_BODY = 8 * 1024 * 1024
# --upload-max-bytes: bytes of archive an upload may send.
UPLOAD_MAX_BYTES = 1024 * 1024 * 1024
# Bytes of file contents an archive may unpack to, per byte it may send.
UNPACK_RATIO = 8

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
UPLOADS_PER_SESSION = 1
UPLOADS_AT_ONCE = 4
# Seconds capsule waits for a command past its own timeout (which
# `timeout -s KILL` enforces in the container) before it lets it go.
EXEC_SLACK = 10.0
UPLOAD_TIMEOUT = 1800.0
# How long a create waits for the session's shell to run.
CREATE_TIMEOUT = 120.0
RETRY_AFTER = 5

MAX_ARGV = 1024
MAX_ARGV_BYTES = 256 * 1024
MAX_ENV = 256
MAX_PATH = 4096
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
_SIZE_MIN, _SIZE_MAX = 1, 1000
# What the runtime (runc) writes, as the exec's output with exit code 126,
# when it cannot enter the exec's working directory.
_CWD_FAILED = re.compile(rb"\AOCI runtime exec failed: .*?chdir to cwd .*? failed: ([^:\r\n]{1,200})")

# The command an upload runs: GNU tar as developer, keeping the modes it
# is given (set-uid and the like are gone by then), not the owners.
UNPACK_ARGV = ("tar", "-x", "-p", "--no-same-owner", "--warning=no-timestamp", "-C",
               "/workspace", "-f", "-")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def _error(request, e: ApiError) -> bytes:
    _log.info("API: {method} {path} refused with {status} {code}: {message!r}",
              method=request.method.decode("latin-1")[:10],
              path=short_ids(request.path.decode("utf-8", "replace")[:120]), status=e.status,
              code=e.code, message=short_ids(e.message[:300]))
    return json_error(request, e.status, e.message, e.code,
                      RETRY_AFTER if e.status in (429, 503) else None, **e.extra)


def _user(request):
    return getattr(request, "capsule_user", None)


def _json_request(request, what: str, empty_ok: bool = False) -> dict:
    """
    The JSON object a request's body holds (with C{empty_ok}, none is C{{}}).

    @raise ApiError: for another content type, or a body that is not one.
    """
    data = request.content.read()
    if empty_ok and not data:
        return {}
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if kind != b"application/json":
        raise ApiError(415, f"{what} takes a JSON body (Content-Type: application/json)",
                       "unsupported_media_type")
    try:
        body = json.loads(data)
    except ValueError as e:
        raise ApiError(400, f"the body is not JSON: {e}", "bad_request") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON nests too deeply", "bad_request") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "bad_request")
    return body


def _only(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(map(str, unknown))[:200]}; known:"
                            f" {', '.join(sorted(allowed))}", "bad_request")


def _integer(body: dict, name: str, default, low: int, high: int):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}",
                       "bad_request")
    return value


def _text(body: dict, name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or "\0" in value:
        raise ApiError(400, f"{name} must be a string of at most {limit} characters"
                            " without NUL", "bad_request")
    return value


class _JsonResource(Resource):
    """
    A resource whose every answer, errors included, is JSON; a method it
    does not have is a 405 that says which it has.
    """

    methods: tuple[bytes, ...] = ()

    def render(self, request):
        # HEAD is GET without the body, which twisted.web leaves out.
        method = b"GET" if request.method == b"HEAD" else request.method
        if method not in self.methods:
            allowed = b", ".join(self.methods)
            request.setHeader(b"allow", allowed)
            return json_error(request, 405, f"{request.method.decode('latin-1')[:20]} is not"
                              f" allowed here; use {allowed.decode()}", "method_not_allowed")
        try:
            return getattr(self, "render_" + method.decode("ascii"))(request)
        except ApiError as e:
            return _error(request, e)

    def getChild(self, name, request):
        return _NotFound()


class _NotFound(Resource):
    isLeaf = True

    def render(self, request):
        path = request.path.decode("utf-8", "replace")[:200]
        return json_error(request, 404, f"no such API route: {path} (see /api/openapi.json)",
                          "not_found")


def _answer(request, d: Deferred, what: str):
    """
    Answer with the C{(status, body)} C{d} fires with, or the L{ApiError}
    it fails with, unless the client left meanwhile.
    """
    gone = []
    request.notifyFinish().addErrback(gone.append)

    def answer(result):
        if isinstance(result, ApiError):
            data = _error(request, result)
        else:
            status, body = result
            data = json_body(request, status, body)
        if not gone:
            request.write(data)
            request.finish()

    def failed(failure):
        if failure.check(ApiError):
            return failure.value
        if failure.check(ContainerGone):
            return ApiError(404, failure.value.message, "session_not_found")
        if failure.check(DockerUnavailable):
            return ApiError(503, failure.value.message, "docker_unavailable")
        _log.failure("{what} failed", failure, what=what)
        message = failure.value.message if failure.check(CapsuleError) else "internal error"
        return ApiError(500, f"{what} failed: {message}", "internal_error")

    d.addErrback(failed)
    d.addCallback(answer)
    d.addErrback(lambda f: _log.failure("answering {what} failed", f, what=what))
    return NOT_DONE_YET


class SessionApi:
    """
    What the API's resources share: the manager, the session service that
    opens sessions (its admission control and drain), the limits.
    """

    def __init__(self, manager, docker, reactor, sessions: SessionService,
                 authenticator=None, public_url: str | None = None,
                 upload_max_bytes: int = UPLOAD_MAX_BYTES) -> None:
        self.manager, self.docker, self.reactor = manager, docker, reactor
        self.sessions = sessions
        # Who requests act for (capsule.auth), or None: anyone.
        self.authenticator = authenticator
        self.public_url = public_url.rstrip("/") if public_url else None
        self.upload_max_bytes = upload_max_bytes
        self.execs: dict[str, int] = {}
        # Bytes of output the running commands may hold (2 * max_output each).
        self.output_reserved = 0
        self.uploads: dict[str, int] = {}
        self.feeders: set[_Feeder] = set()
        # The pool's work under way; whether capsule stops.
        self._jobs: set[Deferred] = set()
        self.stopping = False
        self._pool: ThreadPool | None = None

    # -- what a session looks like ---------------------------------------

    def url(self, session_id: str) -> str:
        path = f"/?session_id={session_id}"
        return self.public_url + path if self.public_url else path

    def describe(self, session) -> dict:
        core = session.core
        return {"id": session.id, "status": session.status(), "state": session.status(),
                "created": core.created_at, "client_attached": session.client is not None,
                "profile": getattr(session, "profile", "shell"), "url": self.url(session.id),
                "user": core.user}

    def find(self, request, session_id: str):
        """
        The caller's live session C{session_id}.

        @raise ApiError: 404 if it is not one.
        """
        session = self.manager.find(session_id, _user(request))
        if session is None or session.over:
            raise ApiError(404, f"no live session {session_id}", "session_not_found")
        return session

    def running(self, request, session_id: str):
        """
        The caller's session C{session_id}, with a container to work in.
        """
        session = self.find(request, session_id)
        if not session.ready:
            raise ApiError(409, f"session {session_id} is still starting", "starting")
        return session

    def ended_meanwhile(self, session, what: str) -> None:
        """
        @raise ApiError: 404 if C{session} ended while C{what} ran in it
            (its container went with it, so what it answers says nothing).
        """
        if session.over or session.id not in self.manager.sessions:
            raise ApiError(404, f"session {session.id} ended while {what} ran:"
                                f" {session.core.message or 'it is gone'}", "session_not_found")

    def touch(self, session) -> None:
        """
        A use through the API counts as a visit (a session without a client
        is kept for the grace period from now) and as activity (for
        C{--idle-timeout}).
        """
        now = self.reactor.seconds()
        session.core.active_at = max(session.core.active_at, now)
        if session.core.left_at is not None:
            session.core.left_at = now

    def hold(self, session) -> LoopingCall:
        """
        Keep C{session} from expiring while a call works in it (until the
        returned call is stopped).
        """
        keep = LoopingCall(self.touch, session)
        keep.clock = self.reactor
        keep.start(max(0.1, min(5.0, self.manager.config.grace / 4)), now=True)
        return keep

    # -- the upload pool ---------------------------------------------------

    def in_thread(self, function, *args) -> Deferred:
        """
        Run C{function(*args)} on the upload pool.
        """
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=UPLOADS_AT_ONCE,
                                    name="capsule-upload")
            self._pool.start()
            self.reactor.addSystemEventTrigger("before", "shutdown", self._stop_uploads)
            self.reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        d = deferToThreadPool(self.reactor, self._pool, function, *args)
        self._jobs.add(d)

        def done(result):
            self._jobs.discard(d)
            return result
        return d.addBoth(done)

    def _stop_uploads(self) -> Deferred:
        """
        capsule stops: the uploads' threads give up at their next read or
        write, and the pool's stop (which waits for them, blocking the
        reactor) comes once they all did, since a thread may need the
        reactor until then.
        """
        self.stopping = True
        for feeder in list(self.feeders):
            feeder.stopProducing()
        waits = []
        for job in list(self._jobs):
            wait: Deferred = Deferred()
            job.addBoth(lambda result, wait=wait: (wait.callback(None), result)[1])
            waits.append(wait)
        return DeferredList(waits)

    def body_limit(self, path: bytes, request=None) -> int | None:
        """
        Bytes of body a path of the API accepts (C{None}: not the API's).
        An upload's large limit is only for a session that exists and, with
        users, for a C{request} that carries credentials (checked once its
        body is in): any other body is refused before it is read.
        """
        parts = path.split(b"?", 1)[0].split(b"/")
        if parts in ([b"", b"api", b"profiles"], [b"", b"api", b"openapi.json"]):
            return NO_BODY
        if parts[:3] != [b"", b"api", b"sessions"]:
            return None
        rest = parts[3:]
        if rest in ([], [b""]):
            return CREATE_MAX_BODY
        if len(rest) == 1:
            return NO_BODY
        if len(rest) == 2 and rest[1] == b"exec":
            return EXEC_MAX_BODY
        if len(rest) == 2 and rest[1] == b"workspace":
            session = self.manager.sessions.get(rest[0].decode("ascii", "replace"))
            if session is None or (request is not None
                                   and not self._may_upload(request, session)):
                return 0
            return self.upload_max_bytes
        return None

    def _may_upload(self, request, session) -> bool:
        """
        Whether C{request}, whose headers are in, may send an upload's body:
        without users, yes; with users, if it carries credentials (an
        C{Authorization} header, the proxy's user header, or the cookie of
        a login of the session's owner), which are checked once it is in.
        """
        authenticator = self.authenticator
        if authenticator is None:
            return True
        return authenticator.has_credentials_for(request, session.core.user)


class SessionsResource(_JsonResource):
    """
    C{/api/sessions}: list (GET) and create (POST); its children are sessions.
    """

    methods = (b"GET", b"POST")

    def __init__(self, api: SessionApi) -> None:
        super().__init__()
        self.api = api

    def getChild(self, name: bytes, request):
        if name == b"":
            return self
        try:
            session_id = parse_session_id(name.decode("utf-8", "replace"))
        except ProtocolError:
            return _NotFound()
        return SessionResource(self.api, session_id)

    def render_GET(self, request):
        user = _user(request)
        sessions = sorted(self.api.manager.of_user(user), key=lambda s: s.core.created_at)
        return json_body(request, 200, {"user": user, "sessions": [
            self.api.describe(s) for s in sessions]})

    def render_POST(self, request):
        api = self.api
        body = _json_request(request, "creating a session", empty_ok=True)
        _only(body, {"profile", "cols", "rows", "repository"})
        cols = _integer(body, "cols", 80, _SIZE_MIN, _SIZE_MAX)
        rows = _integer(body, "rows", 24, _SIZE_MIN, _SIZE_MAX)
        profile = _text(body, "profile", 64)
        repository = _text(body, "repository", 2048)
        user = _user(request)
        service = api.sessions
        admission = service.admission
        open_request = OpenRequest(
            user=user, address=(client_address(request, admission.trusted_proxies)
                                if admission is not None else None),
            profile=profile, size=(cols, rows), repository=repository, door="api")
        try:
            session = service.open(None, open_request)
        except AdmissionRefused as e:
            raise ApiError(429 if e.code == QUOTA_EXCEEDED else 503, e.message,
                           e.code) from None
        except UnknownProfile as e:
            raise ApiError(400, e.message, e.code,
                           profiles=sorted(api.manager.profiles)) from None
        except CapsuleError as e:
            raise ApiError(400, e.message, e.code) from None
        return _answer(request, self._started(session), "creating a session")

    def _started(self, session) -> Deferred:
        """
        Fire with the answer once the session runs, or with why not.
        """
        api = self.api
        d = session.started()
        d.addTimeout(CREATE_TIMEOUT, api.reactor)

        def started(session):
            return 201, api.describe(session)

        def failed(failure):
            if failure.check(defer.TimeoutError):
                return ApiError(504, f"session {session.id} did not start within"
                                     f" {CREATE_TIMEOUT:g} s; it goes on starting",
                                "start_timeout", id=session.id)
            failure.trap(SessionEnded)
            return ApiError(503, failure.value.message, "start_failed")
        return d.addCallbacks(started, failed)


class SessionResource(_JsonResource):
    """
    C{/api/sessions/{id}}: its state (GET), its end (DELETE).
    """

    methods = (b"GET", b"DELETE")

    def __init__(self, api: SessionApi, session_id: str) -> None:
        super().__init__()
        self.api, self.session_id = api, session_id

    def getChild(self, name: bytes, request):
        if name == b"exec":
            return ExecResource(self.api, self.session_id)
        if name == b"workspace":
            return UploadResource(self.api, self.session_id)
        if name == b"":
            return self
        return _NotFound()

    def render_GET(self, request):
        session = self.api.find(request, self.session_id)
        return json_body(request, 200, self.api.describe(session))

    def render_DELETE(self, request):
        session = self.api.find(request, self.session_id)
        user = _user(request)
        _log.info("session {short}{who} ended through the API", short=session.id[:8],
                  who=f" by {user}" if user else "", user=user)
        self.api.manager.end(session, "the session was ended through the API")
        return json_body(request, 200, {"id": session.id, "ended": True})


class ProfilesResource(_JsonResource):
    """
    C{GET /api/profiles}: the profiles a client may name, with their
    descriptions (never their images, secrets or limits).
    """

    methods = (b"GET",)

    def __init__(self, api: SessionApi) -> None:
        super().__init__()
        self.api = api

    def render_GET(self, request):
        profiles = getattr(self.api.manager, "profiles", {})
        return json_body(request, 200, {"default": DEFAULT_PROFILE, "profiles": [
            {"name": name, "description": profile.description}
            for name, profile in sorted(profiles.items())]})


def exec_request(body: dict, workdir: str) -> dict:
    """
    An exec request's fields, checked, with their defaults.

    @raise ApiError: for one that is missing, of the wrong type or too large.
    """
    _only(body, {"argv", "stdin", "cwd", "env", "timeout", "max_output"})
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
    cwd = _text(body, "cwd", MAX_PATH)
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
    max_output = _integer(body, "max_output", EXEC_OUTPUT, 0, EXEC_MAX_OUTPUT)
    return {"argv": [str(a) for a in argv], "stdin": stdin.encode("utf-8", "surrogatepass"),
            "cwd": cwd, "env": env, "timeout": float(timeout), "max_output": max_output}


def timed_argv(argv: list[str], timeout: float) -> list[str]:
    """
    C{argv} under coreutils' C{timeout}, which kills it (and what it
    started) with SIGKILL after C{timeout} seconds.
    """
    return ["timeout", "-s", "KILL", "--", f"{timeout:g}", *argv]


class _SessionPost(_JsonResource):
    """
    A session's POST resource (C{/api/sessions/{id}/...}): a leaf, of the
    session C{session_id}.
    """

    isLeaf = True
    methods = (b"POST",)

    def __init__(self, api: SessionApi, session_id: str) -> None:
        super().__init__()
        self.api, self.session_id = api, session_id


def _count_down(counts: dict[str, int], session_id: str) -> None:
    """
    One fewer of a session's running requests in C{counts}; none is no key.
    """
    left = counts.get(session_id, 1) - 1
    if left:
        counts[session_id] = left
    else:
        counts.pop(session_id, None)


class ExecResource(_SessionPost):
    """
    C{POST /api/sessions/{id}/exec}.
    """

    def render_POST(self, request):
        api = self.api
        session = api.running(request, self.session_id)
        spec = _spec(api.manager, session)
        wanted = exec_request(_json_request(request, "exec"), spec.workdir)
        running = api.execs.get(session.id, 0)
        if running >= EXECS_PER_SESSION:
            raise ApiError(429, f"session {session.id} runs {running} commands already (at"
                                f" most {EXECS_PER_SESSION} at once)", "too_many_execs")
        reserve = 2 * wanted["max_output"]
        if api.output_reserved + reserve > EXEC_OUTPUT_BUDGET:
            raise ApiError(503, "the commands running now may return as much output as capsule"
                                " holds at once: try again shortly, or ask for less"
                                " (max_output)", "busy")
        api.execs[session.id] = running + 1
        api.output_reserved += reserve
        api.touch(session)
        d = Deferred.fromCoroutine(self._run(session, spec, wanted))

        def release(result):
            api.output_reserved -= reserve
            return result
        return _answer(request, d.addBoth(release), "an exec")

    async def _run(self, session, spec, wanted):
        api = self.api
        started = time.monotonic()
        keep = api.hold(session)
        try:
            result = await api.docker.run_command(
                session.container_id, timed_argv(wanted["argv"], wanted["timeout"]),
                spec.user, wanted["cwd"], {**spec.environment, **wanted["env"]},
                wanted["stdin"], wanted["max_output"], wanted["timeout"] + EXEC_SLACK)
        finally:
            keep.stop()
            _count_down(api.execs, session.id)
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


def _spec(manager, session):
    settings = getattr(session, "settings", None)
    return settings.spec if settings is not None else manager.config.spec


ARCHIVE_TYPES = (b"application/x-tar", b"application/gzip", b"application/x-gzip",
                 b"application/octet-stream", b"application/x-compressed-tar")


class UploadResource(_SessionPost):
    """
    C{POST /api/sessions/{id}/workspace}: a .tar or .tar.gz body, unpacked
    into C{/workspace} once every entry was checked (L{capsule.core.tarcheck}).
    """

    def render_POST(self, request):
        api = self.api
        session = api.running(request, self.session_id)
        kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if kind not in ARCHIVE_TYPES:
            raise ApiError(415, "an upload's body is a .tar or .tar.gz archive (Content-Type:"
                                " application/x-tar, application/gzip or"
                                " application/octet-stream)", "unsupported_media_type")
        if api.uploads.get(session.id, 0) >= UPLOADS_PER_SESSION:
            raise ApiError(429, f"an upload into session {session.id} is under way",
                           "upload_in_progress")
        if sum(api.uploads.values()) >= UPLOADS_AT_ONCE:
            raise ApiError(429, f"capsule unpacks {UPLOADS_AT_ONCE} uploads already: try"
                                " again shortly", "too_many_uploads")
        api.uploads[session.id] = api.uploads.get(session.id, 0) + 1
        api.touch(session)
        return _answer(request, Deferred.fromCoroutine(self._upload(request, session)),
                       "an upload")

    async def _upload(self, request, session):
        api = self.api
        body = _Stoppable(request.content, api)
        keep = api.hold(session)
        try:
            try:
                summary = await api.in_thread(check, body,
                                              api.upload_max_bytes * UNPACK_RATIO)
            except ArchiveRefused as e:
                _log.info("refused an upload into session {short}: {message}",
                          short=session.id[:8], message=e.message)
                raise ApiError(400, e.message, e.code, entry=e.entry) from None
            except _FeedAborted:
                raise ApiError(503, "capsule is stopping: send the upload again once it is"
                                    " back", "restarting") from None
            spec = _spec(api.manager, session)
            feeder = _Feeder(api, body)
            result = await api.docker.run_command(
                session.container_id, timed_argv(list(UNPACK_ARGV), UPLOAD_TIMEOUT), spec.user,
                spec.workdir, dict(spec.environment), feeder.feed, 64 * 1024,
                UPLOAD_TIMEOUT + EXEC_SLACK)
        finally:
            keep.stop()
            _count_down(api.uploads, session.id)
            api.touch(session)
        api.ended_meanwhile(session, "the upload")
        if result.exit_code != 0:
            stderr = utf8_text(result.stderr, result.truncated_stderr).strip()
            _log.warn("an upload into session {short} failed: tar exited {code}: {stderr}",
                      short=session.id[:8], code=result.exit_code, stderr=repr(stderr[-500:]))
            raise ApiError(422, f"unpacking failed (tar exited {result.exit_code}):"
                                f" {stderr[-2000:]}", "unpack_failed")
        _log.info("unpacked {entries} entries ({size} bytes) into session {short}",
                  entries=summary.entries, size=summary.size, short=session.id[:8])
        return 200, {"entries": summary.entries, "files": summary.files,
                     "directories": summary.directories, "links": summary.links,
                     "bytes": summary.size, "compressed": summary.compressed}


class _FeedAborted(Interrupted):
    pass


class _Stoppable:
    """
    An upload's body, whose reads fail once capsule stops.
    """

    def __init__(self, body, api: SessionApi) -> None:
        self._body, self._api = body, api

    def read(self, size: int = -1) -> bytes:
        if self._api.stopping:
            raise _FeedAborted("capsule is stopping")
        return self._body.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._body.seek(offset, whence)

    def tell(self) -> int:
        return self._body.tell()


class _Feeder(ThreadFedProducer):
    """
    Rewrites a checked archive on a worker thread into an exec's input,
    waiting while that input is full: one buffer in memory at a time.
    """

    def __init__(self, api: SessionApi, body) -> None:
        super().__init__()
        self._api = api
        self._body = body
        self._consumer = None
        self._stopped = False

    def feed(self, consumer) -> Deferred:
        self._consumer = consumer
        consumer.registerProducer(self, True)
        self._body.seek(0)
        self._api.feeders.add(self)
        d = self._api.in_thread(rewrite, self._body, self._thd_write)

        def done(result):
            self._api.feeders.discard(self)
            consumer.unregisterProducer()
            return result

        def gone(failure):
            # The command ended before it read everything: its exit code
            # and its stderr say why.
            failure.trap(_FeedAborted)
        return d.addBoth(done).addErrback(gone)

    def _thd_write(self, chunk: bytes) -> None:
        if self._api.stopping:
            raise _FeedAborted("capsule is stopping")
        blockingCallFromThread(self._api.reactor, self._write, chunk)

    def _write(self, chunk: bytes):
        if self._stopped or getattr(self._consumer, "disconnected", False):
            raise _FeedAborted("the unpacking command went away")
        self._consumer.write(chunk)
        return self._written()

    def stopProducing(self) -> None:
        self._stopped = True
        self._release(_FeedAborted("the unpacking command went away"))


class ApiResource(Resource):
    """
    C{/api}: its named children (sessions, export, openapi.json, admin);
    anything else is a JSON 404.
    """

    def getChild(self, name, request):
        return _NotFound()

    def render(self, request):
        return _NotFound().render(request)
