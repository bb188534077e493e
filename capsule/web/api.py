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
  - C{/api/sessions/{id}/shares}: read-only links to watch the session
    (L{capsule.web.shares});
  - C{/api/sessions/{id}/ports}: the ports listening in it, with their
    preview addresses (L{capsule.web.ports}); C{/ports/{port}}: its preview
    made public, and links to it (L{capsule.web.preview_api});
  - C{GET /api/sessions/{id}/recording?since=T}: what it printed since
    then, as asciicast v2 (L{capsule.web.recording});
  - C{/api/sessions/{id}/put-away}, C{resume}, C{fork}: kept sessions
    (L{capsule.web.keep_api}, which also serves C{/api/snapshots}); a kept
    session is listed, read and deleted as a live one is;
  - C{GET /api/profiles}: the profiles a client may name.

Authentication and ownership are the site's (L{capsule.auth.gate}): a session of
another user is a 404, exactly as one that does not exist.  New sessions pass
the same admission control as those of C{/ws}.  Every error is JSON:
C{{"error": sentence, "code": word}}.
"""

from __future__ import annotations


from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource

from capsule.core.admission import CLUSTER_FULL, QUOTA_EXCEEDED, AdmissionRefused
from capsule.core.errors import CapsuleError
from capsule.web.http import client_address, json_body
from capsule.core.profiles import DEFAULT_PROFILE, UnknownProfile
from capsule.sessions.call_gate import CallGate, TooManyCalls
from capsule.sessions.service import OpenRequest, SessionService
from capsule.sessions.session import SessionEnded
from capsule.core.protocol import ProtocolError, parse_session_id

from capsule.auth.gate import AuthRefused
from capsule.web.api_base import (NO_BODY, RETRY_AFTER, ApiError, JsonResource, NotFound, Slot,
                                   answer_when, integer_field, json_request, only_keys,
                                   text_field, user_of)
from capsule.web.bodies import BodyRefused
from capsule.web.ports import PortAddresses, PortsResource
from capsule.web.recording import RecordingResource
from capsule.web.replica_api import adopting
from capsule.web.shares import SharesResource
from capsule.web.keep_api import KeepApi, session_child
from capsule.web.exec import (EXEC_MAX_BODY, EXEC_WRITE_TIMEOUT, EXECS_PER_SESSION, ExecResource,
                              OutputBudget)
from capsule.web.upload import (UPLOAD_MAX_BYTES, UPLOADS_AT_ONCE, UPLOADS_PER_SESSION,
                                UploadResource, check_archive_type)

_log = Logger()

# Bytes of JSON a create request may have, and an exec request (its stdin
# is in it).
CREATE_MAX_BODY = 64 * 1024
# How long a create waits for the session's shell to run.
CREATE_TIMEOUT = 120.0
_SIZE_MIN, _SIZE_MAX = 1, 1000
# Docker calls one caller may have under way at once, and waiting past
# those (make_site sets them from the Docker threads).
DOCKER_CALLS_PER_CALLER = 4
DOCKER_CALLS_WAITING = 16


class SessionApi:
    """
    What the API's resources share: the manager, the session service that
    opens sessions (its admission control and drain), the limits.
    """

    def __init__(self, manager, docker, reactor, sessions: SessionService,
                 authenticator=None, public_url: str | None = None,
                 upload_max_bytes: int = UPLOAD_MAX_BYTES,
                 answer_timeout: float = EXEC_WRITE_TIMEOUT, exporting=None,
                 docker_calls: CallGate | None = None, client_address=client_address,
                 spectators=None, previews=None, port_addresses=None, keeping=None,
                 recorder=None) -> None:
        # The sessions' recorder (capsule.ops.recording, --record), or None.
        self.recorder = recorder
        # The previews of sessions' ports (capsule.web.preview.PreviewRouter),
        # or None: no previews.
        self.previews = previews
        # Where a session's ports are opened (capsule.web.ports).
        self.port_addresses = (port_addresses if port_addresses is not None
                               else PortAddresses(public_url))
        # The share links and their spectators (capsule.sessions.spectators),
        # or None: sessions cannot be shared.
        self.spectators = spectators
        self.manager, self.docker, self.reactor = manager, docker, reactor
        # Whether an export streams a session's workspace now (by id):
        # Docker holds its container meanwhile (capsule.web.export).
        self.exporting = exporting if exporting is not None else (lambda session_id: False)
        # The Docker calls each caller has under way (capsule.sessions.call_gate).
        self.docker_calls = (docker_calls if docker_calls is not None
                             else CallGate(DOCKER_CALLS_PER_CALLER, DOCKER_CALLS_WAITING))
        self.client_address = client_address
        self.sessions = sessions
        # Who requests act for (capsule.auth), or None: anyone.
        self.authenticator = authenticator
        self.public_url = public_url.rstrip("/") if public_url else None
        self.upload_max_bytes = upload_max_bytes
        self.execs: dict[str, int] = {}
        # Bytes of exec answers held or owed, counted as JSON (capsule.web.exec).
        self.output = OutputBudget()
        # Seconds an exec's answer waits for a client that reads none of it.
        self.answer_timeout = answer_timeout
        self.uploads: dict[str, int] = {}
        # The upload feeders at work (capsule.web.upload), stopped when capsule stops.
        self.feeders: set = set()
        # The pool's work under way; whether capsule stops.
        self._jobs: set[Deferred] = set()
        self.stopping = False
        self._pool: ThreadPool | None = None
        # Kept sessions and snapshots (capsule.web.keep_api).
        self.keep = KeepApi(self, keeping if keeping is not None else sessions.keeping)

    @property
    def output_reserved(self) -> int:
        """
        Bytes of exec answers held or owed now, all users together.
        """
        return self.output.held

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
        session = self.manager.find(session_id, user_of(request))
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

    def not_exporting(self, session) -> None:
        """
        @raise ApiError: 409 while an export streams C{session}'s workspace:
            Docker holds the container until it is read, and a call into it
            would wait that long.
        """
        if self.exporting(session.id):
            raise ApiError(409, f"the workspace of session {session.id} is being exported:"
                                " Docker holds its container until the export has read it;"
                                " try again once the export is done", "export_in_progress")

    def enter_docker(self, request) -> Deferred:
        """
        A place among the Docker calls of the request's caller (its user,
        or without users its client address): a Deferred that fires with a
        L{Slot} once it is its turn.

        @raise ApiError: 429 if the caller has as many calls waiting as it may.
        """
        user = user_of(request)
        caller = user if user is not None else self.client_address(request)
        try:
            return self.docker_calls.enter(caller)
        except TooManyCalls as e:
            self.manager.metrics.refused("too_many_docker_calls")
            who = f"user {user}" if user is not None else caller
            raise ApiError(429, f"{who} has {e.limit} Docker calls under way and {e.waiting}"
                                " waiting (the most it may): try again shortly",
                           "too_many_docker_calls") from None

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
        self.manager.visited(session)

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

    def body_limit(self, path: bytes, request=None):
        """
        Bytes of body a path of the API accepts (C{None}: not the API's).

        An exec's or an upload's body, from C{request} whose headers are in,
        is decided before it is read (a L{Deferred} of its limit, or
        L{BodyRefused}): the caller is authenticated, the session must be
        theirs and running, and the request takes its exec or upload slot
        then (L{exec_slot}, L{upload_slot}).
        """
        parts = path.split(b"?", 1)[0].split(b"/")
        if parts in ([b"", b"api", b"profiles"], [b"", b"api", b"openapi.json"]):
            return NO_BODY
        if parts[:3] != [b"", b"api", b"sessions"]:
            return None
        rest = parts[3:]
        if rest in ([], [b""]):
            return CREATE_MAX_BODY
        if len(rest) == 1 or (len(rest) in (2, 3) and rest[1] == b"shares") or (
                len(rest) >= 2 and rest[1] == b"ports"):
            return NO_BODY
        if len(rest) == 2 and rest[1] in (b"exec", b"workspace"):
            limit = EXEC_MAX_BODY if rest[1] == b"exec" else self.upload_max_bytes
            method = getattr(request, "declared_method", b"POST")
            if request is None or method not in (b"POST", b""):
                return NO_BODY if request is not None else limit
            length = getattr(request, "declared_length", None)
            if length == 0 or (length is not None and length > limit):
                # No body to keep out, or one refused for its size alone.
                return limit
            try:
                session_id = parse_session_id(rest[0].decode("utf-8", "replace"))
            except ProtocolError:
                return NO_BODY
            return Deferred.fromCoroutine(self._admit(request, session_id, rest[1], limit))
        return None

    async def _admit(self, request, session_id: str, what: bytes, limit: int) -> int:
        """
        Decide on the body of an exec or an upload (C{what}) into
        C{session_id} from C{request}'s headers: return its limit, or
        raise L{BodyRefused}.
        """
        user = None
        if self.authenticator is not None:
            try:
                user = await self.authenticator.user_of(request)
            except AuthRefused as e:
                raise BodyRefused(
                    e.status, e.message, "throttled" if e.status == 429 else "unauthenticated",
                    e.retry_after, {b"WWW-Authenticate": b'Bearer realm="capsule"'}
                    if e.status == 401 else None) from None
            request.capsule_authenticated = user
        request.capsule_user = user
        replicas = self.manager.replicas
        if replicas is not None and session_id not in self.manager.sessions:
            # Another replica's session is taken over first (on a cluster).
            try:
                await replicas.adopt(session_id, user)
            except CapsuleError as e:
                raise BodyRefused(503, e.message, e.code) from None
        try:
            session = self.running(request, session_id)
            if what == b"exec":
                self.exec_slot(request, session)
            else:
                check_archive_type(request)
                self.upload_slot(request, session)
        except ApiError as e:
            raise BodyRefused(e.status, e.message, e.code,
                              RETRY_AFTER if e.status in (429, 503) else None,
                              **e.extra) from None
        return limit

    def _slot(self, request, counts: dict[str, int], session) -> Slot:
        slot = getattr(request, "capsule_slot", None)
        if slot is not None and slot.counts is counts and slot.session_id == session.id:
            return slot
        slot = Slot(counts, session.id)
        request.capsule_slot = slot
        on_done = getattr(request, "on_done", None)
        if on_done is not None:
            on_done(slot.release)
        else:
            request.notifyFinish().addBoth(lambda _: slot.release())
        return slot

    def exec_slot(self, request, session) -> Slot:
        """
        The exec slot C{request} took in C{session} (when its headers
        came), or a new one.

        @raise ApiError: 429 when the session runs as many commands as it may.
        """
        slot = getattr(request, "capsule_slot", None)
        if slot is None or slot.counts is not self.execs:
            running = self.execs.get(session.id, 0)
            if running >= EXECS_PER_SESSION:
                raise ApiError(429, f"session {session.id} runs {running} commands already"
                                    f" (at most {EXECS_PER_SESSION} at once)", "too_many_execs")
        return self._slot(request, self.execs, session)

    def upload_slot(self, request, session) -> Slot:
        """
        The upload slot C{request} took in C{session} (when its headers
        came), or a new one.

        @raise ApiError: 429 when an upload into the session is under way, or
            capsule unpacks as many as it may.
        """
        slot = getattr(request, "capsule_slot", None)
        if slot is None or slot.counts is not self.uploads:
            if self.uploads.get(session.id, 0) >= UPLOADS_PER_SESSION:
                raise ApiError(429, f"an upload into session {session.id} is under way",
                               "upload_in_progress")
            if sum(self.uploads.values()) >= UPLOADS_AT_ONCE:
                raise ApiError(429, f"capsule unpacks {UPLOADS_AT_ONCE} uploads already: try"
                                    " again shortly", "too_many_uploads")
        return self._slot(request, self.uploads, session)


class SessionsResource(JsonResource):
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
            return NotFound()
        # Another replica's session is taken over first (on a cluster).
        return adopting(self.api, session_id, lambda: SessionResource(self.api, session_id))

    def render_GET(self, request):
        user = user_of(request)
        sessions = sorted(self.api.manager.of_user(user), key=lambda s: s.core.created_at)
        return self.api.keep.listing(request, [self.api.describe(s) for s in sessions])

    def render_POST(self, request):
        api = self.api
        body = json_request(request, "creating a session", empty_ok=True)
        only_keys(body, {"profile", "cols", "rows", "repository"})
        cols = integer_field(body, "cols", 80, _SIZE_MIN, _SIZE_MAX)
        rows = integer_field(body, "rows", 24, _SIZE_MIN, _SIZE_MAX)
        profile = text_field(body, "profile", 64)
        repository = text_field(body, "repository", 2048)
        user = user_of(request)
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
        return answer_when(request, self._started(session), "creating a session")

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
            if session.failed_code == CLUSTER_FULL:
                # The cluster has no room (its quota): a refusal, as
                # admission's for want of room.
                return ApiError(503, failure.value.message, CLUSTER_FULL)
            return ApiError(503, failure.value.message, "start_failed")
        return d.addCallbacks(started, failed)


class SessionResource(JsonResource):
    """
    C{/api/sessions/{id}}: its state (GET), its end (DELETE); a kept
    session's too (L{capsule.web.keep_api}).
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
        if name == b"shares":
            return SharesResource(self.api, self.session_id)
        if name == b"ports":
            return PortsResource(self.api, self.session_id)
        if name == b"recording":
            return RecordingResource(self.api, self.session_id)
        if name == b"":
            return self
        return session_child(self.api.keep, name, self.session_id) or NotFound()

    def render_GET(self, request):
        session = self.api.manager.find(self.session_id, user_of(request))
        if session is None or session.over:
            keep = self.api.keep
            return keep.answer(request, keep.get(request, self.session_id), "a kept session")
        return json_body(request, 200, self.api.describe(session))

    def render_DELETE(self, request):
        session = self.api.manager.find(self.session_id, user_of(request))
        if session is None or session.over:
            keep = self.api.keep
            return keep.answer(request, keep.delete(request, self.session_id),
                               "deleting a kept session")
        user = user_of(request)
        _log.info("session {short}{who} ended through the API", short=session.id[:8],
                  who=f" by {user}" if user else "", user=user)
        session.core.owner_ended = True
        self.api.manager.end(session, "the session was ended through the API")
        return json_body(request, 200, {"id": session.id, "ended": True})


class ProfilesResource(JsonResource):
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
        config = getattr(self.api.manager, "config", None)
        default = getattr(config, "default_profile", DEFAULT_PROFILE)
        return json_body(request, 200, {"default": default, "profiles": [
            {"name": name, "description": profile.description}
            for name, profile in sorted(profiles.items())]})


class ApiResource(Resource):
    """
    C{/api}: its named children (sessions, export, openapi.json, admin);
    anything else is a JSON 404.
    """

    def getChild(self, name, request):
        return NotFound()

    def render(self, request):
        return NotFound().render(request)
