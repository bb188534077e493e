"""
Forks and snapshots of sessions (docs/keeping.md): a fork is a new session
(new id, same user and profile) made from a copy of a running or kept
session's file system; a snapshot is a named copy a user keeps until
deleting it, and starts sessions from.  Used by the kept sessions'
L{capsule.sessions.keeping.Keeping}, which offers these calls as its own
(C{manager.keeping.fork(...)}).

Snapshots are images of repository L{SNAPSHOT_REPOSITORY} with copies of
the session's anonymous volumes (the engine's, L{capsule.engine.snapshots});
a session made from one owns its copies (label L{LABEL_OWN_VOLUMES}).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import replace

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from capsule.core.errors import CapsuleError, DockerError, SessionNotFound
from capsule.core.kept import KEPT_LIMIT, SNAPSHOT_NOT_FOUND, Snapshot, check_snapshot_name
from capsule.core.profiles import DEFAULT_PROFILE, LABEL_PROFILE, LABEL_USER
from capsule.core.ratelog import RateLimitedLog
from capsule.core.spec import ContainerSpec
from capsule.engine import forks as engine_forks
from capsule.sessions.session import LABEL_SESSION

_log = Logger()

# The volumes a session made from a snapshot, or forked, mounts (copies,
# its own: removed with it): "MOUNT=NAME" joined by ",".
LABEL_OWN_VOLUMES = engine_forks.LABEL_OWN_VOLUMES
LABEL_SNAPSHOT = "io.capsule.snapshot"
# The image repository of snapshots and forks.
SNAPSHOT_REPOSITORY = "capsule-snapshot"


class KeptLimit(CapsuleError):
    """
    A user keeps as many snapshots as allowed.
    """

    code = KEPT_LIMIT


class SnapshotNotFound(CapsuleError):
    code = SNAPSHOT_NOT_FOUND


class SnapshotExists(CapsuleError):
    code = "snapshot_exists"


def user_hash(user: str | None) -> str:
    """
    A user's part of a snapshot's image tag: short, and no name in it.
    """
    return hashlib.sha256((user or "").encode("utf-8")).hexdigest()[:12]


def own_volumes(labels: dict) -> dict[str, str]:
    """
    The volumes (mount point -> name) a container made from a snapshot
    owns, from its labels.
    """
    volumes = {}
    for part in (labels.get(LABEL_OWN_VOLUMES) or "").split(","):
        mount, sep, name = part.partition("=")
        if sep and mount.startswith("/") and name:
            volumes[mount] = name
    return volumes


def own_volumes_label(volumes: dict[str, str]) -> str:
    return ",".join(f"{mount}={name}" for mount, name in sorted(volumes.items()))


def from_snapshot(spec: ContainerSpec, snapshot: Snapshot) -> ContainerSpec:
    """
    A session's container C{spec} made from C{snapshot} instead: of its
    image, mounting its volumes (but where the spec mounts a volume of its
    own), which the container owns (a label says which).
    """
    taken = {target for _, target in spec.volumes}
    volumes = spec.volumes + tuple((name, mount) for mount, name in
                                   sorted(snapshot.volumes.items()) if mount not in taken)
    labels = spec.labels
    if snapshot.volumes:
        labels = {**labels, LABEL_OWN_VOLUMES: own_volumes_label(snapshot.volumes)}
    return replace(spec, image=snapshot.image, labels=labels, volumes=volumes)


def holder_spec(spec: ContainerSpec) -> ContainerSpec:
    """
    A container that mounts a named snapshot's volumes, to be copied from
    (L{Forks.start_snapshot}), from a session's C{spec} made from it
    (L{from_snapshot}): without secrets, never given to anyone, owning
    nothing.
    """
    labels = {k: v for k, v in spec.labels.items() if k != LABEL_OWN_VOLUMES}
    return replace(spec, labels=labels, secrets={}, environment={})


class Forks:
    """
    Forking and snapshotting the sessions of one server (running or kept:
    C{keeping}'s, L{capsule.sessions.keeping.Keeping}, which made it).
    """

    def __init__(self, manager, docker, clock, keeping) -> None:
        self._manager = manager
        self._docker = docker
        self._clock = clock
        self._keeping = keeping
        # Refusals a client can repeat at will: logged at a bounded rate.
        self._refusals = RateLimitedLog(_log)

    async def make_container(self, session, spec: ContainerSpec) -> str:
        """
        A fork's container, and the volume copies it owns (its label says).
        """
        container_id = await self._docker.fork_container(session.fork_of, session.id, spec)
        try:
            found = await self._docker.list_containers({**self._manager.labels,
                                                        LABEL_SESSION: session.id})
        except DockerError as e:
            _log.warn("the volumes of fork {session_id} are not known: {error}",
                      session_id=session.id[:8], error=e.message)
        else:
            for container in found:
                if container["id"] == container_id:
                    session.own_volumes = own_volumes(container["labels"])
        return container_id

    def _source(self, session_id: str, user: str | None):
        """
        The container id and profile of a running or kept session of
        C{user}; raise L{SessionNotFound}.
        """
        live = self._manager.find(session_id, user)
        if live is not None and live.ready:
            return live.container_id, live.profile, live.core.user
        kept = self._keeping.find(session_id, user)
        if kept is not None:
            return kept.container_id, kept.profile, kept.user
        raise SessionNotFound(f"session {session_id} does not exist")

    def _snapshot_labels(self, user: str | None, profile: str, **more) -> dict[str, str]:
        return {**self._manager.labels, LABEL_USER: user or "", LABEL_PROFILE: profile, **more}

    def fork(self, session_id: str, user: str | None) -> Deferred:
        """
        A new session (new id, same user and profile) from a copy of a
        running or kept session's file system, waiting for its client like
        one made by the API; fire with its id.
        """
        return Deferred.fromCoroutine(self._fork(session_id, user))

    async def _fork(self, session_id: str, user: str | None) -> str:
        container_id, profile, owner = self._source(session_id, user)
        # The engine copies the source's files into the new session's
        # container (IDockerAPI.fork_container).
        session = self._manager.create(None, 80, 24, user=owner, profile=profile,
                                       fork_of=container_id)
        await session.started()
        new = session.id
        _log.info("session {session_id}{who} forked into {new}", session_id=session_id[:8],
                  new=new[:8], who=f" of {owner}" if owner else "", user=owner)
        return new

    async def _session_from(self, snapshot: Snapshot, user: str | None, profile: str) -> str:
        """
        A new session from a temporary snapshot, which it owns: its volumes
        become the session's, its image's tag goes once the container
        exists (its layers stay while used).
        """
        manager = self._manager
        try:
            session = manager.create(None, 80, 24, user=user, profile=profile,
                                     snapshot=snapshot)
            await session.started()
        except BaseException:
            await self._docker.remove_snapshot(snapshot)
            raise
        try:
            await self._docker.remove_snapshot(replace(snapshot, volumes={}))
        except Exception as e:
            _log.warn("could not remove the temporary image {image}: {error}",
                      image=snapshot.image, error=_error(e))
        return session.id

    def snapshots(self, user: str | None) -> Deferred:
        """
        C{user}'s named snapshots, oldest first.
        """
        d = self._docker.list_snapshots(self._snapshot_labels_of(user))
        return d.addCallback(lambda found: sorted(
            (s for s in found if s.name), key=lambda s: s.created))

    def _snapshot_labels_of(self, user: str | None) -> dict[str, str]:
        return {**self._manager.labels, LABEL_USER: user or ""}

    def snapshot(self, session_id: str, user: str | None, name: str) -> Deferred:
        """
        A named copy of a running or kept session's file system.  Fail with
        C{ValueError} for a bad name, L{SnapshotExists}, L{KeptLimit} past
        --max-snapshots-per-user, L{SessionNotFound}.
        """
        return Deferred.fromCoroutine(self._snapshot(session_id, user, name))

    async def _snapshot(self, session_id: str, user: str | None, name: str) -> Snapshot:
        check_snapshot_name(name)
        container_id, profile, owner = self._source(session_id, user)
        mine = await self.snapshots(owner)
        if any(s.name == name for s in mine):
            raise SnapshotExists(f"there is a snapshot named {name} already: delete it, or"
                                 " choose another name")
        if len(mine) >= self._keeping.config.max_snapshots:
            self._refusals.warn(self._clock.seconds(), owner or "", KEPT_LIMIT,
                                "snapshot refused{who}: {count} snapshots, the most allowed"
                                " (--max-snapshots-per-user)",
                                who=f" to {owner}" if owner else "", count=len(mine),
                                user=owner)
            raise KeptLimit(f"you keep {len(mine)} snapshots, the most allowed"
                            f" ({self._keeping.config.max_snapshots}): delete one first")
        tag = f"{self._manager.config.instance}-{user_hash(owner)}-{name}"
        snapshot = await self._docker.snapshot_container(
            container_id, SNAPSHOT_REPOSITORY, tag,
            self._snapshot_labels(owner, profile, **{LABEL_SNAPSHOT: name}))
        _log.info("session {session_id}{who} saved as snapshot {name}",
                  session_id=session_id[:8], name=name, who=f" of {owner}" if owner else "",
                  user=owner)
        return snapshot

    async def _named(self, name: str, user: str | None) -> Snapshot:
        for snapshot in await self.snapshots(user):
            if snapshot.name == name:
                return snapshot
        raise SnapshotNotFound(f"there is no snapshot named {name}")

    def delete_snapshot(self, name: str, user: str | None) -> Deferred:
        """
        Remove a named snapshot (its image and volumes); fail with
        L{SnapshotNotFound}.
        """
        async def delete():
            snapshot = await self._named(name, user)
            await self._docker.remove_snapshot(snapshot)
            _log.info("snapshot {name}{who} deleted", name=name,
                      who=f" of {user}" if user else "", user=user)
        return Deferred.fromCoroutine(delete())

    def start_snapshot(self, name: str, user: str | None) -> Deferred:
        """
        A new session from a named snapshot (the snapshot stays as it is:
        the session gets copies of its volumes); fire with its id.
        """
        return Deferred.fromCoroutine(self._start_snapshot(name, user))

    async def _start_snapshot(self, name: str, user: str | None) -> str:
        snapshot = await self._named(name, user)
        profile = snapshot.labels.get(LABEL_PROFILE) or DEFAULT_PROFILE
        if profile not in self._manager.profiles:
            profile = DEFAULT_PROFILE
        # A container that mounts the snapshot's volumes, never started: its
        # copy is the new session's (the snapshot's own volumes stay its).
        holder_id = str(uuid.uuid4())
        spec = self._manager.snapshot_holder_spec(holder_id, snapshot, profile)
        holder = await self._docker.create_session_container(holder_id, spec)
        try:
            copy = await self._docker.snapshot_container(
                holder, SNAPSHOT_REPOSITORY,
                f"{self._manager.config.instance}-fork-{uuid.uuid4().hex[:16]}",
                self._snapshot_labels(user, profile, **{"io.capsule.fork": "true"}))
        finally:
            await self._docker.remove_container(holder)
        new = await self._session_from(copy, user, profile)
        _log.info("session {new}{who} started from snapshot {name}", new=new[:8], name=name,
                  who=f" of {user}" if user else "", user=user)
        return new


def _error(e: Exception) -> str:
    return getattr(e, "message", None) or str(e) or type(e).__name__
