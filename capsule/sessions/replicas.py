"""
Replicas of capsule that share one cluster (docs/kubernetes.md): any
replica serves any session.

Each replica says it lives (L{IDockerAPI.renew_replica}: on a cluster, a
Lease C{capsule-replica-NAME} renewed every L{RENEW} seconds, good for
L{LEASE} seconds); each session's container says which replica holds it,
and whose session it is (L{OWNER_ANNOTATION}, written once its user's
session starts).  A replica asked for a session it does not know finds its
container by label, checks that it is the asker's (another user's session
is, to the asker, one that does not exist), takes it over
(L{IDockerAPI.claim_container}: of replicas that try at once, one wins) and
attaches the client as to a session of its own earlier run, with exact
replay from the client's offset (the keeper holds the output).  The
replica that served it hears from the keeper that its attach was replaced
(L{Replicas.replaced}) and, once the pod says another replica holds it,
lets it go (L{Replicas.let_go}): a client attached there is told the
session was taken over, as by another tab, and the session is forgotten
there, its container left alone.

A replica never removes, expires or keeps a container another live
replica holds: at the end of a session's grace period it asks again who
holds it, and one another replica took is forgotten here, its container
left alone.  The sessions of a replica whose Lease lapsed are orphans: any
replica adopts them (at start, and in the orphan sweep), each then waits
its grace period for its client as a recovered session does.  Warm
sessions are their replica's own.

With one server (the Docker engine) there is nothing of this: no
L{Replicas} is made.
"""

from __future__ import annotations

import json
import uuid

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from capsule.core.errors import CapsuleError, ContainerGone, DockerUnavailable
from capsule.core.profiles import LABEL_PROFILE, LABEL_USER
from capsule.sessions.keeping import LABEL_WARM, own_volumes
from capsule.sessions.observers import SessionObserver
from capsule.sessions.session import LABEL_SESSION

_log = Logger()

# Whose session a container holds: JSON C{{"user": NAME or null}}.
OWNER_ANNOTATION = "capsule.io/owner"
# A replica's Lease lasts this long; it is renewed every RENEW seconds.
LEASE = 15.0
RENEW = 5.0
# What a container's owner is when it says none (a warm one never handed).
UNKNOWN = object()


def owner_of(container: dict):
    """
    The user whose session a listed container holds (C{None}: a session
    without a user), or L{UNKNOWN}.
    """
    text = (container.get("annotations") or {}).get(OWNER_ANNOTATION)
    try:
        found = json.loads(text) if text else None
    except ValueError:
        return UNKNOWN
    if not isinstance(found, dict) or "user" not in found:
        return UNKNOWN
    user = found["user"]
    return user if user is None or isinstance(user, str) else UNKNOWN


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


class Replicas(SessionObserver):
    """
    This replica among the others (see the module's docstring).

    @param manager: the sessions (L{capsule.sessions.manager.SessionManager}).
    @param docker: the engine (L{capsule.core.interfaces.IDockerAPI}).
    @param replica: this replica's name.
    @param lease: how long this replica's liveness holds once said.
    @param renew: how often it is said again.
    @ivar live: the replicas found live at the last renewal (this one too).
    """

    def __init__(self, manager, docker, clock, replica: str, lease: float = LEASE,
                 renew: float = RENEW) -> None:
        self._manager = manager
        self._docker = docker
        self._clock = clock
        self.replica = replica
        self._lease = lease
        self._renewing = task.LoopingCall(self.renew)
        self._renewing.clock = clock
        self._renew = renew
        self.live: set[str] = {replica}
        self._adopting: dict[str, Deferred] = {}
        # Sessions whose holder was checked at the end of their grace
        # period, and may go.
        self._checked: set[str] = set()
        self._checking: set[str] = set()
        self._warned = False

    # -- liveness ------------------------------------------------------------

    def start(self) -> None:
        self._renewing.start(self._renew, now=True)

    def stop(self) -> Deferred:
        """
        Stop renewing, and say this replica is gone: its sessions are
        orphans at once, for the others to adopt.
        """
        if self._renewing.running:
            self._renewing.stop()
        d = self._docker.drop_replica(self.replica)
        d.addErrback(lambda f: _log.warn("could not drop replica {replica}'s lease: {e}",
                                         replica=self.replica, e=f.getErrorMessage()))
        return d

    def renew(self) -> Deferred:
        """
        Say this replica lives, and learn which others do.
        """
        async def renew():
            try:
                await self._docker.renew_replica(self.replica, self._lease)
                self.live = set(await self._docker.live_replicas()) | {self.replica}
            except CapsuleError as e:
                if not self._warned:
                    _log.warn("could not renew replica {replica}'s lease: {message}",
                              replica=self.replica, message=e.message)
                    self._warned = True
                return
            self._warned = False
        return Deferred.fromCoroutine(renew())

    def held_elsewhere(self, holder: str | None) -> bool:
        """
        Whether a container held by C{holder} is another live replica's.
        """
        return holder is not None and holder != self.replica and holder in self.live

    # -- containers of the cluster --------------------------------------------

    async def sift(self, found: list[dict]) -> list[dict]:
        """
        Of the listed containers C{found}, those this replica may treat as
        its own: its own, those no replica holds, and the orphans of lapsed
        replicas, which it takes over (those another takes first are left
        out, as those of live replicas are).
        """
        self.live = set(await self._docker.live_replicas()) | {self.replica}
        mine = []
        for container in found:
            holder = container.get("replica")
            if holder is None or holder == self.replica:
                mine.append(container)
                continue
            if holder in self.live:
                continue
            try:
                taken = await self._docker.claim_container(container["id"], self.replica,
                                                           holder)
            except ContainerGone:
                continue
            if taken:
                _log.info("took over container {container} of replica {holder}, whose lease"
                          " lapsed", container=container["id"][:12], holder=holder)
                container["replica"] = self.replica
                mine.append(container)
        return mine

    async def adopt_orphans(self, found: list[dict]) -> int:
        """
        Of containers taken over from lapsed replicas (L{sift}), register
        the running sessions as sessions of an earlier run: each waits for
        its client, then ends or is kept.  Return how many.
        """
        manager = self._manager
        count = 0
        for container in found:
            session_id = container["labels"].get(LABEL_SESSION)
            if (container.get("replica") == self.replica and container["state"] == "running"
                    and session_id and _is_uuid(session_id)
                    and session_id not in manager.sessions
                    and container["labels"].get(LABEL_WARM) != "true"
                    and owner_of(container) is not UNKNOWN):
                self.register(container, owner_of(container))
                count += 1
        return count

    def register(self, container: dict, user: str | None):
        """
        A session found in C{container}: registered as one of an earlier
        run (the next attach replays from the client's offset).
        """
        manager = self._manager
        session = manager.recovered_session(container["labels"][LABEL_SESSION],
                                            container["id"], user)
        manager.recovery.assign_profile(session, container["labels"].get(LABEL_PROFILE))
        session.own_volumes = own_volumes(container["labels"])
        session.events.recover()
        return session

    # -- a session another replica served ----------------------------------------

    def adopt(self, session_id: str, user: str | None) -> Deferred:
        """
        Find the session C{session_id} of C{user} in the cluster and take
        it over; fire with whether it is now a session here.  Fail with
        L{DockerUnavailable} when another replica took it at the same time.
        """
        if session_id in self._adopting:
            d = Deferred()
            self._adopting[session_id].addBoth(lambda r: (d.callback(r), r)[1])
            return d
        d = Deferred.fromCoroutine(self._adopt(session_id, user))
        self._adopting[session_id] = d

        def done(result):
            self._adopting.pop(session_id, None)
            return result
        return d.addBoth(done)

    async def _adopt(self, session_id: str, user: str | None) -> bool:
        manager = self._manager
        if session_id in manager.sessions:
            return True
        if not _is_uuid(session_id):
            return False
        found = await self._docker.list_containers({**manager.labels,
                                                    LABEL_SESSION: session_id})
        found = [c for c in found if c["state"] == "running"
                 and c["labels"].get(LABEL_WARM) != "true" and owner_of(c) is not UNKNOWN]
        if not found or not manager.config.keeper:
            return False
        container = found[0]
        if owner_of(container) != user:
            # Another user's session is, to this one, no session at all.
            return False
        holder = container.get("replica")
        if holder != self.replica:
            taken = await self._docker.claim_container(container["id"], self.replica, holder)
            if not taken:
                raise DockerUnavailable(f"session {session_id} was just taken over by another"
                                        " capsule replica: try again")
        if session_id in manager.sessions:
            return True
        self._checked.discard(session_id)
        self.register(container, user)
        _log.info("session {session_id}{who} taken over from replica {holder}",
                  session_id=session_id[:8], holder=holder or "(none)",
                  who=f" of {user}" if user else "", user=user)
        return True

    # -- what happens to sessions here ------------------------------------------

    def session_started(self, session, warm: bool, seconds: float) -> None:
        """
        A user's session started here: its container says whose it is, and
        that this replica holds it.
        """
        container_id = session.container_id
        if container_id is None:
            return
        owner = json.dumps({"user": session.core.user})
        d = self._docker.claim_container(
            container_id, self.replica, self.replica, annotations={OWNER_ANNOTATION: owner},
            labels={LABEL_USER: session.core.user} if session.core.user else None)
        d.addErrback(lambda f: _log.warn(
            "could not mark session {session_id}'s container as its user's: {e}",
            session_id=session.id[:8], e=f.getErrorMessage()))

    def session_ended(self, session) -> None:
        self._checked.discard(session.id)

    def may_expire(self, session) -> bool:
        """
        Whether C{session}, at the end of its grace period, may be ended or
        kept now.  The first time, no: who holds its container is asked, and
        it expires again once known to be this replica's; one another
        replica took is forgotten here, its container left alone.
        """
        if session.id in self._checked:
            self._checked.discard(session.id)
            return True
        if session.id in self._checking or session.container_id is None:
            return session.container_id is None
        self._checking.add(session.id)
        d = self._docker.container_holder(session.container_id)

        def known(holder):
            self._checking.discard(session.id)
            if self._manager.sessions.get(session.id) is not session:
                return
            if holder is not None and holder != self.replica:
                self.let_go(session, holder)
                return
            self._checked.add(session.id)
            self._manager.expire(session)

        def failed(failure):
            self._checking.discard(session.id)
            if failure.check(ContainerGone):
                self._checked.add(session.id)
                self._manager.expire(session)
                return
            _log.warn("could not ask who holds session {session_id}'s container: {e}",
                      session_id=session.id[:8], e=failure.getErrorMessage())
        d.addCallbacks(known, failed)
        return False

    def unless_elsewhere(self, session, action) -> Deferred:
        """
        Call C{action} (which returns a Deferred) unless C{session}'s
        container is held by another replica now (it took the session
        over): then leave the container alone, unless its owner asked for
        its end here.  Fire with C{action}'s result, or C{None}.
        """
        container_id = session.container_id

        async def check():
            try:
                holder = await self._docker.container_holder(container_id)
            except ContainerGone:
                holder = None
            except CapsuleError as e:
                # Not known: leaving a container is the safe way (the
                # orphan sweep of its holder, or of whoever adopts it,
                # removes it).
                _log.warn("could not ask who holds session {session_id}'s container, so it"
                          " is left alone: {message}", session_id=session.id[:8],
                          message=e.message)
                return None
            if session.core.owner_ended:
                # Its owner asked for its end: wherever it is served.
                if holder is not None and holder != self.replica:
                    _log.info("session {session_id} ended by its owner here: its container"
                              " goes, though replica {holder} served it",
                              session_id=session.id[:8], holder=holder)
                return await action()
            if holder is not None and holder != self.replica:
                _log.info("session {session_id} ended here; its container is left to replica"
                          " {holder}, which serves it now", session_id=session.id[:8],
                          holder=holder)
                return None
            return await action()
        return Deferred.fromCoroutine(check())

    def replaced(self, session, otherwise) -> Deferred:
        """
        C{session}'s keeper said that another attach replaced this
        replica's, and its stream closed
        (L{capsule.engine.keeper_stream.ShellFacts.replaced}).  When
        another replica holds its container now, that replica took the
        session over: it is let go here (L{let_go}: its client hears so as
        from another tab, its container is left alone).  Otherwise (held
        here or by nobody, gone, or who holds it cannot be asked) call
        C{otherwise}, which finds out why the stream closed as for any
        other stream.
        """
        container_id = session.container_id

        async def check():
            try:
                holder = await self._docker.container_holder(container_id)
            except CapsuleError:
                # (Gone: the diagnosis says so; the API away: so does it.)
                holder = None
            if self._manager.sessions.get(session.id) is not session:
                # Over meanwhile (every way there forgets it).
                return
            if holder is not None and holder != self.replica:
                self.let_go(session, holder)
                return
            otherwise()
        d = Deferred.fromCoroutine(check())
        d.addErrback(lambda f: _log.failure("letting session {session_id} go to another"
                                            " replica failed", f, session_id=session.id[:8]))
        return d

    def let_go(self, session, holder: str) -> None:
        """
        Forget C{session} here: replica C{holder} serves it now.  Its
        client, if one is attached here, is told the session was taken over
        (as by another tab: it may take it back); its container is the
        other replica's, never touched from here.
        """
        _log.info("session {session_id} is served by replica {holder} now: forgotten here",
                  session_id=session.id[:8], holder=holder)
        session.events.moved(f"the session is served by another capsule replica ({holder})"
                             " now")


class ReplicaService(Service):
    """
    Renews this replica's liveness while capsule runs (L{Replicas.start}),
    and says it is gone as capsule stops (L{Replicas.stop}).
    """

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas

    def startService(self) -> None:
        super().startService()
        self.replicas.start()

    def stopService(self) -> Deferred:
        super().stopService()
        return self.replicas.stop()
