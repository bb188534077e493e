"""
Kept sessions and snapshots in the session API (docs/keeping.md):

  - C{GET /api/sessions} lists the caller's kept sessions after its live
    ones (C{"state": "kept"}); C{GET} and C{DELETE /api/sessions/{id}} work
    on a kept one (DELETE removes its container and its volumes);
  - C{POST /api/sessions/{id}/put-away}: stop a live session and keep its
    files (answers the kept session);
  - C{POST /api/sessions/{id}/resume}: make a kept session live again, same
    id, a new shell (answers as C{POST /api/sessions} does, once it runs);
  - C{POST /api/sessions/{id}/fork}: a new session from a copy of a live or
    kept session's files (answers the new one, 201);
  - C{GET /api/snapshots}, C{POST /api/snapshots} (C{{"session": id, "name":
    name}}), C{DELETE /api/snapshots/{name}}, C{POST
    /api/snapshots/{name}/sessions} (a new session from one).

The work is the keeping's (L{capsule.sessions.keeping.Keeping}); new and
resumed sessions pass drain and admission as every new session does
(L{capsule.sessions.service.SessionService}).  Another user's session or
snapshot is a 404, as one that does not exist.  A fork or a snapshot copies
a disk: a caller (its user, or without users its address) has one at a time
(429 C{copy_in_progress} with C{Retry-After} otherwise), and capsule
L{COPIES_AT_ONCE} in all (503 C{copies_busy}).  One change of a session's
state (put away, resume, delete, fork, snapshot) at a time: another meanwhile
is a 409 C{busy}.
"""

from __future__ import annotations

import datetime

from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from capsule.core.admission import QUOTA_EXCEEDED, AdmissionRefused
from capsule.core.errors import CapsuleError, ContainerGone, DockerError, SessionNotFound
from capsule.core.kept import (PUT_AWAY, SNAPSHOT_NOT_FOUND, KeptSession,
                               Snapshot, check_snapshot_name)
from capsule.core.profiles import LABEL_PROFILE
from capsule.core.protocol import ProtocolError, parse_session_id
from capsule.sessions.service import OpenRequest
from capsule.sessions.session import SessionEnded
from capsule.web.api_base import (NO_BODY, ApiError, JsonResource, NotFound, SessionPost,
                                   answer_when, json_request, only_keys, user_of)
from capsule.web.http import client_address, json_body

_log = Logger()

# Disk copies (forks, snapshots, sessions from snapshots) one caller may
# have under way, and capsule in all.
COPIES_PER_CALLER = 1
COPIES_AT_ONCE = 4
# How long a resume, a fork or a session from a snapshot waits for the
# session's shell to run before it answers 504 (it goes on starting).
START_TIMEOUT = 120.0
# What the routes' bodies may hold: a snapshot's session and name.
KEEP_MAX_BODY = NO_BODY
NOT_KEPT = "not_kept"
BUSY = "busy"
COPY_IN_PROGRESS = "copy_in_progress"
COPIES_BUSY = "copies_busy"
SNAPSHOT_EXISTS = "snapshot_exists"


def when(timestamp: float) -> str:
    """
    A time as a sentence says it: C{7 Dec 2026 08:30 UTC}.
    """
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return f"{moment.day} {moment:%b %Y %H:%M} UTC"


def kept_message(kept: KeptSession) -> str:
    """
    What a client that asks for a kept session is told.
    """
    return (f"this session was put away on {when(kept.kept_at)} and is kept until"
            f" {when(kept.expires_at)}: resume it")


def refusal_of(failure) -> ApiError | None:
    """
    The answer to a refusal of the keeping's, or None for a failure of
    another kind (which L{answer_when} answers).
    """
    e = failure.value
    if isinstance(e, ApiError):
        return e
    if isinstance(e, AdmissionRefused):
        return ApiError(429 if e.code == QUOTA_EXCEEDED else 503, e.message, e.code)
    if isinstance(e, (SessionNotFound, ContainerGone)):
        return ApiError(404, e.message, "session_not_found")
    if isinstance(e, SessionEnded):
        return ApiError(503, e.message, "start_failed")
    if isinstance(e, CapsuleError) and e.code == SNAPSHOT_NOT_FOUND:
        return ApiError(404, e.message, e.code)
    if isinstance(e, CapsuleError) and not isinstance(e, DockerError):
        # A refusal of the keeping (kept_limit, snapshot_exists, ...).
        return ApiError(409, e.message, e.code)
    return None


class KeepApi:
    """
    What the kept sessions' and snapshots' routes share: the session API
    (L{capsule.web.api.SessionApi}), the keeping (C{None}: sessions are
    never kept), and what is under way.
    """

    def __init__(self, api, keeping) -> None:
        self.api, self.keeping = api, keeping
        # Disk copies under way, by caller.
        self.copies: dict[str, int] = {}
        # The session ids whose state changes now, and how.
        self.working: dict[str, str] = {}

    # -- looking up --------------------------------------------------------

    def find_kept(self, request, session_id: str) -> Deferred:
        """
        Fire with the caller's kept session C{session_id}, or C{None}.
        """
        if self.keeping is None:
            return defer.succeed(None)
        return maybeDeferred(self.keeping.find, session_id, user_of(request))

    async def kept_or_404(self, request, session_id: str) -> KeptSession:
        kept = await self.find_kept(request, session_id)
        if kept is None:
            raise ApiError(404, f"no live or kept session {session_id}", "session_not_found")
        return kept

    def describe_kept(self, kept: KeptSession) -> dict:
        now = self.api.reactor.seconds()
        return {**kept.describe(now), "status": "kept", "client_attached": False,
                "url": self.api.url(kept.id), "user": kept.user}

    def describe_snapshot(self, snapshot: Snapshot) -> dict:
        return {"name": snapshot.name, "created": snapshot.created, "size": snapshot.size,
                "profile": snapshot.labels.get(LABEL_PROFILE)}

    def listing(self, request, live: list[dict]):
        """
        Answer C{GET /api/sessions}: the C{live} ones, then the kept ones.
        """
        user = user_of(request)
        if self.keeping is None:
            return json_body(request, 200, {"user": user, "sessions": live})

        async def answer():
            kept = await maybeDeferred(self.keeping.kept, user)
            kept = sorted(kept, key=lambda k: k.kept_at)
            return 200, {"user": user, "sessions": live + [self.describe_kept(k) for k in kept]}
        return self.answer(request, answer(), "listing the sessions")

    def answer(self, request, coroutine, what: str):
        """
        Answer C{request} with what C{coroutine} returns (C{(status,
        body)}), or the refusal it raises.
        """
        d = Deferred.fromCoroutine(coroutine)

        def refused(failure):
            refusal = refusal_of(failure)
            return failure if refusal is None else refusal
        d.addErrback(refused)
        return answer_when(request, d, what)

    # -- limits ------------------------------------------------------------

    async def engine(self, request, call, *args):
        """
        C{call(*args)} (engine work: a listing, a removal, a stop) in a
        place among the caller's Docker calls (429 C{too_many_docker_calls}
        past them, as for execs and uploads).
        """
        slot = await self.api.enter_docker(request)
        try:
            return await maybeDeferred(call, *args)
        finally:
            slot.release()

    def keeping_on(self):
        if self.keeping is None:
            raise ApiError(409, "capsule keeps no sessions here", NOT_KEPT)
        return self.keeping

    def claim(self, session_id: str, what: str):
        """
        Mark C{session_id} as changing (C{what}: "being put away", ...);
        return the call that lets it go.

        @raise ApiError: 409 C{busy} if another change is under way, or
            C{export_in_progress} while its workspace is being exported.
        """
        doing = self.working.get(session_id)
        if doing is not None:
            raise ApiError(409, f"session {session_id} is {doing}: try again once that is"
                                " done", BUSY)
        if self.api.exporting(session_id):
            raise ApiError(409, f"the workspace of session {session_id} is being exported:"
                                " Docker holds its container until the export has read it;"
                                " try again once the export is done", "export_in_progress")
        self.working[session_id] = what
        return lambda: self.working.pop(session_id, None)

    def copy_slot(self, request):
        """
        A place among the disk copies (fork, snapshot): return the call that
        gives it back.

        @raise ApiError: 429 C{copy_in_progress} when the caller has one
            under way, 503 C{copies_busy} when capsule has as many as it may.
        """
        user = user_of(request)
        caller = user if user is not None else self.api.client_address(request)
        if self.copies.get(caller, 0) >= COPIES_PER_CALLER:
            self.api.manager.metrics.refused(COPY_IN_PROGRESS)
            who = f"user {user}" if user is not None else caller
            raise ApiError(429, f"{who} has a copy of a session's files under way (a fork or a"
                                f" snapshot; at most {COPIES_PER_CALLER} at once): try again"
                                " once it is done", COPY_IN_PROGRESS)
        if sum(self.copies.values()) >= COPIES_AT_ONCE:
            self.api.manager.metrics.refused(COPIES_BUSY)
            raise ApiError(503, f"capsule copies {COPIES_AT_ONCE} sessions' files already:"
                                " try again shortly", COPIES_BUSY)
        self.copies[caller] = self.copies.get(caller, 0) + 1

        def release():
            left = self.copies.get(caller, 1) - 1
            if left:
                self.copies[caller] = left
            else:
                self.copies.pop(caller, None)
        return release

    def open_request(self, request) -> OpenRequest:
        admission = self.api.sessions.admission
        return OpenRequest(user=user_of(request), address=(
            client_address(request, admission.trusted_proxies)
            if admission is not None else None), door="api")

    async def started(self, session_id: str, request, status: int) -> tuple[int, dict]:
        """
        The answer once the caller's live session C{session_id} runs.
        """
        api = self.api
        session = api.manager.find(session_id, user_of(request))
        if session is None:
            raise ApiError(503, f"session {session_id} ended as it started", "start_failed")
        d = session.started()
        d.addTimeout(START_TIMEOUT, api.reactor)
        try:
            await d
        except defer.TimeoutError:
            raise ApiError(504, f"session {session_id} did not start within"
                                f" {START_TIMEOUT:g} s; it goes on starting",
                           "start_timeout", id=session_id) from None
        return status, api.describe(session)

    # -- the routes' work ----------------------------------------------------

    async def get(self, request, session_id: str) -> tuple[int, dict]:
        return 200, self.describe_kept(await self.kept_or_404(request, session_id))

    async def delete(self, request, session_id: str) -> tuple[int, dict]:
        kept = await self.kept_or_404(request, session_id)
        keeping = self.keeping_on()
        release = self.claim(kept.id, "being deleted")
        try:
            await self.engine(request, keeping.delete, kept.id, user_of(request))
        finally:
            release()
        _log.info("kept session {short}{who} deleted through the API", short=kept.id[:8],
                  who=f" of {kept.user}" if kept.user else "", user=kept.user)
        return 200, {"id": kept.id, "ended": True, "deleted": True}

    async def put_away(self, request, session_id: str) -> tuple[int, dict]:
        keeping = self.keeping_on()
        api = self.api
        session = api.manager.find(session_id, user_of(request))
        if session is None or session.over:
            kept = await self.find_kept(request, session_id)
            if kept is not None:
                return 200, self.describe_kept(kept)
            raise ApiError(404, f"no live session {session_id}", "session_not_found")
        if not session.ready:
            raise ApiError(409, f"session {session_id} is still starting", "starting")
        settings = api.manager.profiles.get(getattr(session, "profile", None))
        if settings is not None and keeping.retention_of(settings) <= 0:
            raise ApiError(409, f"the profile of session {session_id}"
                                f" ({session.profile}) keeps nothing (its retention is 0):"
                                " end the session instead, exporting its workspace first if"
                                " it is worth keeping", NOT_KEPT)
        release = self.claim(session.id, "being put away")
        try:
            kept = await self.engine(request, keeping.put_away, session, PUT_AWAY)
        finally:
            release()
        return 200, self.describe_kept(kept)

    async def resume(self, request, session_id: str) -> tuple[int, dict]:
        api = self.api
        live = api.manager.find(session_id, user_of(request))
        if live is not None and not live.over:
            # Resumed already (by another tab, another call): as it is.
            return await self.started(live.id, request, 200)
        kept = await self.kept_or_404(request, session_id)
        release = self.claim(kept.id, "being resumed")
        try:
            session = await api.sessions.resume(self.open_request(request), kept)
        finally:
            release()
        return await self.started(session.id, request, 200)

    async def source(self, request, session_id: str) -> str | None:
        """
        The profile of the caller's session C{session_id}, live or kept.

        @raise ApiError: 404 if it has none such, 409 if it is still starting.
        """
        live = self.api.manager.find(session_id, user_of(request))
        if live is not None and not live.over:
            if not live.ready:
                raise ApiError(409, f"session {session_id} is still starting", "starting")
            return getattr(live, "profile", None)
        return (await self.kept_or_404(request, session_id)).profile

    async def fork(self, request, session_id: str) -> tuple[int, dict]:
        profile = await self.source(request, session_id)
        self.keeping_on()
        release = self.claim(session_id, "being copied")
        try:
            give_back = self.copy_slot(request)
            try:
                new_id = await self.api.sessions.fork(self.open_request(request), session_id,
                                                      profile)
            finally:
                give_back()
        finally:
            release()
        _log.info("session {short} forked into {new} through the API", short=session_id[:8],
                  new=new_id[:8], user=user_of(request))
        return await self.started(new_id, request, 201)

    async def snapshots(self, request) -> tuple[int, dict]:
        found = ([] if self.keeping is None
                 else await self.engine(request, self.keeping.snapshots, user_of(request)))
        found = sorted(found, key=lambda s: s.created)
        return 200, {"user": user_of(request),
                     "snapshots": [self.describe_snapshot(s) for s in found]}

    async def snapshot(self, request) -> tuple[int, dict]:
        keeping = self.keeping_on()
        body = json_request(request, "a snapshot")
        only_keys(body, {"session", "name"})
        try:
            session_id = parse_session_id(body.get("session"))
        except (ProtocolError, TypeError, AttributeError):
            raise ApiError(400, "session: the id of one of your sessions, live or kept",
                           "bad_request") from None
        try:
            name = check_snapshot_name(body.get("name"))
        except ValueError as e:
            raise ApiError(400, f"name: {e}", "bad_request") from None
        await self.source(request, session_id)
        release = self.claim(session_id, "being copied")
        try:
            give_back = self.copy_slot(request)
            try:
                snapshot = await maybeDeferred(keeping.snapshot, session_id, user_of(request),
                                                  name)
            finally:
                give_back()
        finally:
            release()
        _log.info("snapshot {name} made of session {short} through the API", name=name,
                  short=session_id[:8], user=user_of(request))
        return 201, self.describe_snapshot(snapshot)

    async def named(self, request, name: str) -> Snapshot:
        found = ([] if self.keeping is None
                 else await self.engine(request, self.keeping.snapshots, user_of(request)))
        for snapshot in found:
            if snapshot.name == name:
                return snapshot
        raise ApiError(404, f"no snapshot {name}", SNAPSHOT_NOT_FOUND)

    async def delete_snapshot(self, request, name: str) -> tuple[int, dict]:
        await self.named(request, name)
        await self.engine(request, self.keeping.delete_snapshot, name, user_of(request))
        _log.info("snapshot {name} deleted through the API", name=name, user=user_of(request))
        return 200, {"name": name, "deleted": True}

    async def from_snapshot(self, request, name: str) -> tuple[int, dict]:
        snapshot = await self.named(request, name)
        give_back = self.copy_slot(request)
        try:
            new_id = await self.api.sessions.from_snapshot(
                self.open_request(request), name, snapshot.labels.get(LABEL_PROFILE))
        finally:
            give_back()
        return await self.started(new_id, request, 201)


# -- the resources -------------------------------------------------------------

class _SessionAction(SessionPost):
    """
    C{POST /api/sessions/{id}/<action>}: no body.
    """

    action = ""

    def __init__(self, keep: KeepApi, session_id: str) -> None:
        super().__init__(keep.api, session_id)
        self.keep = keep

    def render_POST(self, request):
        method = getattr(self.keep, self.action.replace("-", "_"))
        return self.keep.answer(request, method(request, self.session_id),
                                f"{self.action} of a session")


class PutAwayResource(_SessionAction):
    action = "put-away"


class ResumeResource(_SessionAction):
    action = "resume"


class ForkResource(_SessionAction):
    action = "fork"


ACTIONS = {b"put-away": PutAwayResource, b"resume": ResumeResource, b"fork": ForkResource}


def session_child(keep: KeepApi, name: bytes, session_id: str):
    """
    The child C{name} of C{/api/sessions/{id}} that is the keeping's, or None.
    """
    kind = ACTIONS.get(name)
    return None if kind is None else kind(keep, session_id)


class SnapshotsResource(JsonResource):
    """
    C{/api/snapshots}: the caller's (GET), a new one (POST); its children
    are snapshots by name.
    """

    methods = (b"GET", b"POST")

    def __init__(self, keep: KeepApi) -> None:
        super().__init__()
        self.keep = keep

    def getChild(self, name: bytes, request):
        if name == b"":
            return self
        try:
            text = check_snapshot_name(name.decode("utf-8", "replace"))
        except ValueError:
            return NotFound()
        return SnapshotResource(self.keep, text)

    def render_GET(self, request):
        return self.keep.answer(request, self.keep.snapshots(request), "listing snapshots")

    def render_POST(self, request):
        return self.keep.answer(request, self.keep.snapshot(request), "making a snapshot")


class SnapshotResource(JsonResource):
    """
    C{/api/snapshots/{name}}: its end (DELETE); C{sessions} (POST): a new
    session from it.
    """

    methods = (b"DELETE",)

    def __init__(self, keep: KeepApi, name: str) -> None:
        super().__init__()
        self.keep, self.name = keep, name

    def getChild(self, name: bytes, request):
        if name == b"sessions":
            return SnapshotSessionsResource(self.keep, self.name)
        if name == b"":
            return self
        return NotFound()

    def render_DELETE(self, request):
        return self.keep.answer(request, self.keep.delete_snapshot(request, self.name),
                                "deleting a snapshot")


class SnapshotSessionsResource(JsonResource):
    """
    C{POST /api/snapshots/{name}/sessions}: a new session from the snapshot.
    """

    isLeaf = True
    methods = (b"POST",)

    def __init__(self, keep: KeepApi, name: str) -> None:
        super().__init__()
        self.keep, self.name = keep, name

    def render_POST(self, request):
        return self.keep.answer(request, self.keep.from_snapshot(request, self.name),
                                "starting a session from a snapshot")


def body_limit(path: bytes, request=None):
    """
    Bytes of body the keeping's routes accept (C{None}: not theirs).
    """
    parts = path.split(b"?", 1)[0].split(b"/")
    if parts[:3] == [b"", b"api", b"snapshots"]:
        return KEEP_MAX_BODY
    if parts[:3] == [b"", b"api", b"sessions"] and len(parts) == 5 and parts[4] in ACTIONS:
        return KEEP_MAX_BODY
    return None
