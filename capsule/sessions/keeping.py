"""
Kept sessions (docs/keeping.md): a session whose grace period ended, whose
owner put it away, that was idle past its profile's limit, or whose
container stopped under it is I{kept} where its profile's retention is more
than 0: its screen is saved in its container, its container is stopped (its
memory and CPU are free again) and its file system stays until its
retention runs out.  It can then be resumed (same id, a new shell), deleted,
forked; snapshots are named copies of a session's file system.

Kept sessions are found from the engine alone (the stopped containers of
this instance), so that they outlive a restart of capsule; what the engine
does not carry (why a session was put away, and whose it is) is kept in a
small JSON file beside the owners' (L{KeptRecords}).  An engine that can
keep it with the session (C{note_kept}: the Kubernetes engine, on the
session's volume claim) is given it too, and its record is read where the
file has none: another server of the same sessions (a replica) finds them
whole.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from capsule.core.errors import CapsuleError, ContainerGone, SessionNotFound
from capsule.core.keeper import encode_screen
from capsule.core.kept import (GRACE, KEPT_FOR_ENV, PUT_AWAY, REASONS, SCREEN_MAX_BYTES,
                               STOPPED, KeptSession, closing_outcome, duration_text,
                               screen_path)
from capsule.core.profiles import DEFAULT_PROFILE, LABEL_PROFILE
# (Forks and snapshots, and the records' file, have modules of their own;
# their names are also this module's, as they were before.)
from capsule.sessions.forks import (LABEL_OWN_VOLUMES, LABEL_SNAPSHOT,  # noqa: F401
                                    SNAPSHOT_REPOSITORY, Forks, KeptLimit, SnapshotExists,
                                    SnapshotNotFound, own_volumes, own_volumes_label,
                                    user_hash)
from capsule.sessions.kept_records import KeptRecords

_log = Logger()

LABEL_SESSION = "io.capsule.session"
# A warm container (made for a pool, never taken yet): stopped, it is
# nobody's session and goes as a leftover.
LABEL_WARM = "io.capsule.warm"

# The uid and gid of the session image's user, who owns the saved screen.
SESSION_UID = SESSION_GID = 1000

DEFAULT_RETENTION = 7 * 86400.0
# How often the sizes of kept sessions are asked of the engine (by the sweep).
SIZE_REFRESH = 300.0
# Seconds after a session's own copies of snapshot volumes were let go that
# they are pruned once more: the engine leaves a copy younger than its
# grace (600 s, a copy another fork may be about to mount) to a later prune.
PRUNE_AGAIN = 660.0


class NotKept(CapsuleError):
    """
    The session cannot be put away (its profile keeps nothing, or it is
    starting or over).
    """

    code = "not_kept"


@dataclass(frozen=True)
class KeepingConfig:
    """
    @ivar retention: seconds a kept session of a profile without its own
        C{retention} is kept (--retention; 0: sessions are removed, as
        before kept sessions).
    @ivar max_kept: kept sessions per user; putting one more away removes
        the user's oldest first.
    @ivar max_kept_bytes: bytes the kept sessions of a user may hold (their
        writable layers); past it, the oldest go first.
    @ivar max_snapshots: named snapshots per user (more: C{kept_limit}).
    @ivar state_dir: where the records of kept sessions are written
        (C{kept-INSTANCE.json}); C{None}: kept in memory only.
    """

    retention: float = DEFAULT_RETENTION
    max_kept: int = 20
    max_kept_bytes: int = 20 * 1024 ** 3
    max_snapshots: int = 20
    state_dir: str | None = None


def when(seconds: float) -> str:
    """
    A time as people read it in a message: C{14 Dec 2026 10:05 UTC}.
    """
    return time.strftime("%d %b %Y %H:%M UTC", time.gmtime(seconds))


def kept_message(reason: str, until: float, why: str | None = None) -> str:
    """
    What the client of a session being put away is told (its
    C{session_ended} message); C{why}: what happened to it, where more is
    known than the reason (its container stopped: how).
    """
    if why is not None:
        why = f"{why}: the session is kept"
    else:
        why = {
            PUT_AWAY: "the session was put away",
            GRACE: "the session was put away: its last tab closed and the grace period ended",
            STOPPED: ("the session's container stopped (the host or the Docker engine"
                      " restarted): the session is kept"),
        }.get(reason, f"the session was put away ({REASONS.get(reason, reason)})")
    return (f"{why}; its files are kept until {when(until)}: resume it to go on"
            " (a new shell, the same files)")


def _is_uuid(value) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except (TypeError, ValueError, AttributeError):
        return False


class Keeping:
    """
    The kept sessions of one server, and putting away, resuming, deleting,
    forking and snapshotting sessions.  Made by the manager
    (L{capsule.sessions.manager.SessionManager.keeping}).

    @param manager: the live sessions' registry.
    @param owners: the owners' file (L{capsule.sessions.owners.OwnerFile}),
        asked whose a stopped container found at start is; C{None}: no users.
    """

    def __init__(self, manager, docker, clock, config: KeepingConfig | None = None,
                 owners=None) -> None:
        self._manager = manager
        self._docker = docker
        self._clock = clock
        self.config = config or KeepingConfig()
        self._owners = owners
        self._records = KeptRecords(self.config.state_dir, manager.config.instance)
        self._kept: dict[str, KeptSession] = {}
        # Sessions being put away: their reasons, and who waits for them.
        self._reasons: dict[str, str] = {}
        self._waiting: dict[str, list[Deferred]] = {}
        self._storing: set[str] = set()
        # Those being put away, listed and found as kept already (a resume
        # or a delete waits for the put away: C{_stores}).
        self._pending: dict[str, KeptSession] = {}
        self._stores: dict[str, Deferred] = {}
        # Kept sessions being resumed or deleted: by id, what waits for it.
        self._busy: dict[str, Deferred] = {}
        self._sizes_at = float("-inf")
        self._prune_at: float | None = None
        # Kept sessions whose container could not be stopped (the engine
        # failed): the sweep tries again.
        self._unstopped: set[str] = set()
        # Forking and snapshotting sessions, running or kept here.
        self.forks = Forks(manager, docker, clock, self)

    # -- what is kept ------------------------------------------------------------

    def retention_of(self, settings) -> float:
        """
        The seconds a kept session of profile C{settings} is kept (0: its
        sessions are removed, not kept).
        """
        retention = getattr(settings, "retention", None)
        return self.config.retention if retention is None else float(retention)

    def environment(self, settings) -> dict[str, str]:
        """
        What a session of profile C{settings} is told of its retention, in
        its environment (the image's banner says it): C{CAPSULE_KEPT_FOR},
        where its sessions are kept.
        """
        retention = self.retention_of(settings)
        return {KEPT_FOR_ENV: duration_text(retention)} if retention > 0 else {}

    def _settings(self, session):
        return session.settings or self._manager.profiles[DEFAULT_PROFILE]

    def on_close(self, session) -> dict:
        """
        What closing the last tab of C{session} does (see
        L{closing_outcome}); where it would be kept and its user keeps as
        many sessions as allowed, C{"removes_oldest"}: how many of the
        user's oldest kept sessions would go to make room.
        """
        outcome = closing_outcome(self.retention_of(self._settings(session)),
                                  self._manager.config.grace, self._clock.seconds())
        if outcome["outcome"] == "kept":
            over = len(self.kept(session.core.user)) + 1 - self.config.max_kept
            if over > 0:
                outcome["removes_oldest"] = over
        return outcome

    def kept(self, user: str | None) -> list[KeptSession]:
        """
        C{user}'s kept sessions, oldest put away first (C{None}: those of
        nobody, which is everyone's where capsule has no users).
        """
        return sorted((k for k in self._everyone() if k.user == user),
                      key=lambda k: k.kept_at)

    def _everyone(self) -> list[KeptSession]:
        return [*self._kept.values(),
                *(k for i, k in self._pending.items() if i not in self._kept)]

    def kept_all(self) -> list[KeptSession]:
        """
        Every kept session (the admin API's).
        """
        return sorted(self._everyone(), key=lambda k: k.kept_at)

    def find(self, session_id: str, user: str | None) -> KeptSession | None:
        """
        The kept session C{session_id} if C{user} may use it: another
        user's is, to that user, one that does not exist.
        """
        kept = self._kept.get(session_id) or self._pending.get(session_id)
        if kept is None or kept.user != user:
            return None
        return kept

    def holds(self, session_id: str | None) -> bool:
        """
        Whether a container of session C{session_id} is a kept session's, or
        one being put away or resumed: never a leftover.
        """
        return session_id is not None and (session_id in self._kept
                                           or session_id in self._storing
                                           or session_id in self._busy)

    def disk_bytes(self, user: str | None = None) -> int:
        """
        The bytes the kept sessions hold (their writable layers, as last
        measured), of C{user} if given: what admission counts them at
        (disk, never memory).
        """
        return sum(k.size or 0 for k in self._kept.values() if user is None or k.user == user)

    # -- warm sessions ------------------------------------------------------------

    def taken(self, session) -> None:
        """
        A warm session was taken: recorded, so that, stopped, it is a kept
        session (its container's label says it was warm).
        """
        self._records.taken(session.id, session.core.user)

    def untaken(self, session_id: str, labels: dict) -> bool:
        """
        Whether a container of an earlier run is a warm one nobody took.
        """
        return labels.get(LABEL_WARM) == "true" and self._records.get(session_id) is None

    def forgotten(self, session) -> None:
        """
        (The manager's.)  A live session is gone: its record goes unless it
        is being put away.
        """
        if session.id not in self._reasons and session.id not in self._kept:
            self._records.drop(session.id)

    # -- putting away --------------------------------------------------------------

    def put_away(self, session, reason: str = PUT_AWAY) -> Deferred:
        """
        Put a live session away: its client is told, its screen saved in its
        container (L{capsule.core.kept.screen_path}), its container stopped and kept.  Fire
        with its L{KeptSession}; fail with L{NotKept} if its profile keeps
        nothing (retention 0) or it is starting or over.
        """
        settings = self._settings(session)
        retention = self.retention_of(settings)
        if retention <= 0:
            return fail(NotKept(f"sessions of profile {settings.name} are not kept (its"
                                " retention is 0): closing it removes it"))
        if session.container_id is None:
            return fail(NotKept("the session is still starting: it cannot be put away yet"))
        if not session.state.keepable:
            return fail(NotKept("the session is starting or over: it cannot be put away"))
        return self._keep(session, reason, retention)

    def grace_ended(self, session) -> bool:
        """
        (The manager's.)  The grace period of C{session}, waiting for a
        client, ended: put it away where its profile keeps sessions (and it
        ran, and is no untaken warm one); return whether it is.
        """
        if (not session.state.waiting or session.container_id is None or session.untaken
                or self.retention_of(self._settings(session)) <= 0):
            return False
        d = self.put_away(session, GRACE)
        d.addErrback(lambda f: _log.info("session {session_id} could not be put away:"
                                         " {error}", session_id=session.id[:8],
                                         error=f.getErrorMessage()))
        return True

    def _keep(self, session, reason: str, retention: float, why: str | None = None
              ) -> Deferred:
        d = Deferred()
        self._waiting.setdefault(session.id, []).append(d)
        self._reasons.setdefault(session.id, reason)
        session.events.keep(kept_message(reason, self._clock.seconds() + retention, why))
        return d

    def store(self, session) -> Deferred:
        """
        (The manager's C{keep} effect.)  Save C{session}'s screen, stop its
        container, record it as kept; then feed its lifecycle C{kept}.
        """
        self._storing.add(session.id)
        stored = self._stores[session.id] = Deferred()
        d = Deferred.fromCoroutine(self._store(session))

        def done(result):
            self._storing.discard(session.id)
            self._pending.pop(session.id, None)
            del self._stores[session.id]
            stored.callback(None)
            return result
        return d.addBoth(done)

    async def _store(self, session) -> None:
        core = session.core
        reason = self._reasons.pop(session.id, GRACE)
        waiting = self._waiting.pop(session.id, [])
        container_id = session.container_id
        settings = self._settings(session)
        screen, _ = core.replay.since(max(core.replay.start,
                                          core.replay.end - SCREEN_MAX_BYTES))
        screen = screen[-SCREEN_MAX_BYTES:]
        kept = self._pending[session.id] = KeptSession(
            id=session.id, container_id=container_id, user=core.user, profile=session.profile,
            created=core.created_at, kept_at=self._clock.seconds(),
            retention=self.retention_of(settings), reason=reason, command=_command(settings),
            extra={"volumes": dict(getattr(session, "own_volumes", {}) or {})})
        try:
            if screen:
                try:
                    # As the keeper writes it (docs/protocol.md): the keeper
                    # started at the resume shows it at the offsets it had.
                    await self._docker.put_file(container_id, screen_path(session.id),
                                                encode_screen(screen, core.replay.end),
                                                uid=SESSION_UID, gid=SESSION_GID)
                except ContainerGone:
                    raise
                except Exception as e:
                    # The files matter more than the screen: kept all the same.
                    _log.warn("could not save the screen of session {session_id}: {error}",
                              session_id=session.id[:8], error=_error(e))
            await self._docker.stop_container(container_id)
        except ContainerGone:
            _log.info("session {session_id} could not be put away: its container is gone",
                      session_id=session.id[:8])
            session.events.removed()
            for d in waiting:
                d.errback(SessionNotFound(f"session {session.id} ended: its container is gone"))
            return
        except Exception as e:
            # Its container may still run: it stays a kept session (never a
            # leftover), and the sweep stops it again.
            _log.error("could not stop the container of session {session_id} as it was put"
                       " away: {error}; it is stopped again later",
                       session_id=session.id[:8], error=_error(e))
            self._unstopped.add(session.id)
        self._kept[session.id] = kept
        self._records.put(session.id, core.user, reason, kept.kept_at)
        await self._note(kept)
        _log.info("session {session_id}{who} put away ({why}); kept until {until}",
                  session_id=session.id[:8], why=REASONS.get(reason, reason),
                  until=when(kept.expires_at), who=f" of {core.user}" if core.user else "",
                  user=core.user)
        session.events.kept()
        await self._measure(kept)
        await self._enforce_limits(core.user, kept)
        for d in waiting:
            d.callback(kept)

    async def _note(self, kept: KeptSession) -> None:
        """
        Where the engine keeps a record with a kept session (C{note_kept}:
        one whose sessions any of several servers may find), give it whose
        it is and why it was kept, which L{load} reads back where this
        server's state file has no record of it.
        """
        note = getattr(self._docker, "note_kept", None)
        if note is None or kept.id in self._unstopped:
            return
        try:
            await note(kept.container_id, {"user": kept.user, "reason": kept.reason,
                                           "kept_at": kept.kept_at})
        except Exception as e:
            _log.warn("could not record why session {session_id} was kept with it: {error}",
                      session_id=kept.id[:8], error=_error(e))

    async def _measure(self, kept: KeptSession) -> None:
        """
        Ask the engine for a kept session's size and container name.
        """
        try:
            found = await self._docker.kept_containers(
                {**self._manager.labels, LABEL_SESSION: kept.id})
        except Exception as e:
            _log.debug("could not measure kept session {session_id}: {error}",
                       session_id=kept.id[:8], error=_error(e))
            return
        for container in found:
            if container["id"] == kept.container_id:
                kept.size = container.get("size")
                kept.name = container.get("name") or kept.name

    async def _enforce_limits(self, user: str | None, newest: KeptSession) -> None:
        """
        The user keeps at most C{max_kept} sessions holding at most
        C{max_kept_bytes}: the oldest go first (never the newest).
        """
        config = self.config
        while True:
            # (One being put away meanwhile is not counted until it is kept.)
            mine = [k for k in self.kept(user) if k.id in self._kept]
            older = [k for k in mine if k is not newest]
            if not older:
                return
            if len(mine) > config.max_kept:
                why = f"the user keeps at most {config.max_kept} sessions (--max-kept-per-user)"
            elif sum(k.size or 0 for k in mine) > config.max_kept_bytes:
                why = (f"the user's kept sessions may hold at most {config.max_kept_bytes}"
                       " bytes (--max-kept-bytes-per-user)")
            else:
                return
            oldest = older[0]
            _log.info("removing kept session {session_id}{who}, the oldest: {why}",
                      session_id=oldest.id[:8], why=why,
                      who=f" of {user}" if user else "", user=user)
            await self._remove(oldest)

    # -- found at start ------------------------------------------------------------

    async def load(self) -> int:
        """
        Find the kept sessions among this server's stopped containers (at
        start): every stopped container of a session whose profile keeps
        sessions, but warm ones never taken.  Return how many.
        """
        manager = self._manager
        found = await self._docker.kept_containers(manager.labels)
        now = self._clock.seconds()
        for container in found:
            labels = container.get("labels") or {}
            session_id = labels.get(LABEL_SESSION)
            if (not _is_uuid(session_id) or session_id in manager.sessions
                    or session_id in self._kept):
                continue
            # This server's record, else the engine's (kept with the session
            # where the engine keeps one: note_kept).
            record = self._records.get(session_id) or _engine_record(container)
            if labels.get(LABEL_WARM) == "true" and record is None:
                continue    # a warm container nobody took: a leftover
            profile = labels.get(LABEL_PROFILE) or DEFAULT_PROFILE
            settings = manager.profiles.get(profile) or manager.profiles[DEFAULT_PROFILE]
            retention = self.retention_of(settings)
            if retention <= 0:
                continue    # a leftover: its profile keeps nothing
            if record is not None:
                # (A taken warm session's record has no reason yet.)
                user, reason = record.get("user"), record.get("reason") or STOPPED
                kept_at = record.get("kept_at")
            else:
                user = self._owners.get(session_id) if self._owners is not None else None
                reason, kept_at = STOPPED, None
            if not isinstance(kept_at, (int, float)):
                kept_at = container.get("finished") or container.get("created") or now
            if not isinstance(user, str):
                user = None
            self._kept[session_id] = KeptSession(
                id=session_id, container_id=container["id"], user=user, profile=profile[:64],
                created=container.get("created") or kept_at, kept_at=float(kept_at),
                retention=retention, reason=reason if reason in REASONS else STOPPED,
                size=container.get("size"), command=_command(settings),
                name=container.get("name") or "",
                extra={"volumes": own_volumes(labels)})
            if record is None or record.get("reason") is None:
                self._records.put(session_id, user, STOPPED, float(kept_at))
        # The records of the kept sessions, and of the live ones found.
        self._records.keep_only(set(self._kept) | set(manager.sessions))
        self._sizes_at = now
        if self._kept:
            _log.info("found {count} kept session(s)", count=len(self._kept))
        return len(self._kept)

    def stopped(self, session, message: str) -> bool:
        """
        (The engine watch's.)  C{session}'s container stopped under it (the
        host or the engine restarted): put it away (reason C{stopped}) where
        its profile keeps sessions; return whether it did.
        """
        retention = self.retention_of(self._settings(session))
        if (retention <= 0 or session.container_id is None or not session.ran
                or session.untaken):
            return False
        _log.info("session {session_id}: {message}; it is kept",
                  session_id=session.id[:8], message=message)
        # (Its state is not asked: this may run within the transition of
        # its closed stream, which is keepable; the input runs after it.)
        d = self._keep(session, STOPPED, retention, message)
        d.addErrback(lambda f: _log.info("session {session_id} could not be kept: {error}",
                                         session_id=session.id[:8],
                                         error=f.getErrorMessage()))
        return True

    # -- resume, delete ----------------------------------------------------------------

    def resume(self, session_id: str, user: str | None) -> Deferred:
        """
        Start a kept session's container again and make it a live session
        under the same id, waiting for its client like one found after a
        restart (a new shell, the saved screen shown as history).  Fire
        with the L{Session}; fail with L{SessionNotFound}.
        """
        return Deferred.fromCoroutine(self._resume(session_id, user))

    async def _resume(self, session_id: str, user: str | None):
        manager = self._manager
        if session_id in self._stores and self.find(session_id, user) is not None:
            await _wait(self._stores[session_id])      # being put away: once it is
        live = manager.find(session_id, user)
        if live is not None:
            return live         # resumed already
        busy = self._busy.get(session_id)
        if busy is not None and self.find(session_id, user) is not None:
            await _wait(busy)
            live = manager.find(session_id, user)
            if live is not None:
                return live
        kept = self.find(session_id, user)
        if kept is None:
            raise SessionNotFound(f"session {session_id} does not exist")
        done = Deferred()
        self._busy[session_id] = done
        try:
            try:
                await self._docker.start_container(kept.container_id)
            except ContainerGone:
                self._forget(kept)
                raise SessionNotFound(f"session {session_id} is gone: its container was"
                                      " removed") from None
            self._forget(kept)
            session = manager.recovered_session(session_id, kept.container_id, kept.user)
            manager.recovery.assign_profile(session, kept.profile)
            session.resumed_from = kept.kept_at
            session.own_volumes = dict(kept.extra.get("volumes") or {})
            session.events.recover()
            if self._owners is not None and kept.user is not None:
                self._owners.session_opened(session)
            if manager.replicas is not None:
                # Its new pod says whose it is and that this replica holds
                # it, as a new session's does.
                manager.replicas.session_started(session, False, 0.0)
            _log.info("session {session_id}{who} resumed (kept since {since})",
                      session_id=session_id[:8], since=when(kept.kept_at),
                      who=f" of {kept.user}" if kept.user else "", user=kept.user)
            return session
        finally:
            del self._busy[session_id]
            done.callback(None)

    def delete(self, session_id: str, user: str | None) -> Deferred:
        """
        Remove a kept session: its container and its volumes.  Fail with
        L{SessionNotFound}.
        """
        return Deferred.fromCoroutine(self._delete(session_id, user))

    async def _delete(self, session_id: str, user: str | None) -> None:
        if session_id in self._stores and self.find(session_id, user) is not None:
            await _wait(self._stores[session_id])      # being put away: once it is
        kept = self._kept.get(session_id)
        if kept is None or kept.user != user or session_id in self._busy:
            raise SessionNotFound(f"session {session_id} does not exist")
        _log.info("deleting kept session {session_id}{who}", session_id=session_id[:8],
                  who=f" of {user}" if user else "", user=user)
        await self._remove(kept)

    async def _remove(self, kept: KeptSession) -> None:
        done = Deferred()
        self._busy[kept.id] = done
        try:
            await self._docker.remove_container(kept.container_id)
            await self._remove_volumes(kept.id, kept.extra.get("volumes") or {})
            self._forget(kept)
        finally:
            del self._busy[kept.id]
            done.callback(None)

    async def _remove_volumes(self, session_id: str, volumes: dict[str, str]) -> None:
        """
        Remove the volumes a session made from a snapshot, or forked, owned
        (its copies, labelled with it; a snapshot's image's tag went when it
        was made), and its untagged image: what no container or snapshot
        uses any more, however new.
        """
        if volumes:
            await self._docker.prune_snapshots(
                {**self._manager.labels, LABEL_SESSION: session_id}, grace=0)
            # A session from a named snapshot's copies (not labelled with it).
            await self.release_volumes()

    def release_volumes(self) -> Deferred:
        """
        A session that owned copies of a snapshot's volumes (a fork, or a
        session from a named snapshot) was removed: prune what no container
        or snapshot uses now, and once more L{PRUNE_AGAIN} seconds later (in
        L{sweep}), for the copies the engine found too fresh to remove.
        """
        self._prune_at = self._clock.seconds() + PRUNE_AGAIN
        return self._docker.prune_snapshots(self._manager.labels)

    def _forget(self, kept: KeptSession) -> None:
        self._kept.pop(kept.id, None)
        self._records.drop(kept.id)

    # -- the sweep -----------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> Deferred:
        """
        Remove the kept sessions past their retention (their containers and
        volumes; snapshots stay until deleted), retry stopping those whose
        stop failed, and now and then measure them again.  Never fails.
        """
        d = Deferred.fromCoroutine(self._sweep(self._clock.seconds() if now is None else now))
        d.addErrback(lambda f: _log.failure("sweeping kept sessions failed", f))
        return d

    async def _sweep(self, now: float) -> int:
        due = [k for k in self._kept.values() if now >= k.expires_at and k.id not in self._busy]
        for kept in due:
            _log.info("removing kept session {session_id}{who}: kept {days:.1f} day(s), its"
                      " retention", session_id=kept.id[:8], days=kept.retention / 86400,
                      who=f" of {kept.user}" if kept.user else "", user=kept.user)
            try:
                await self._remove(kept)
            except Exception as e:
                _log.warn("could not remove kept session {session_id}: {error}",
                          session_id=kept.id[:8], error=_error(e))
        for session_id in list(self._unstopped):
            kept = self._kept.get(session_id)
            self._unstopped.discard(session_id)
            if kept is not None:
                try:
                    await self._docker.stop_container(kept.container_id)
                except Exception:
                    self._unstopped.add(session_id)
        if self._prune_at is not None and now >= self._prune_at:
            self._prune_at = None
            try:
                await self._docker.prune_snapshots(self._manager.labels)
            except Exception as e:
                _log.warn("could not remove the volumes removed forks left: {error}",
                          error=_error(e))
        if self._kept and now - self._sizes_at >= SIZE_REFRESH:
            self._sizes_at = now
            await self._refresh_sizes()
        return len(due)

    async def _refresh_sizes(self) -> None:
        try:
            found = await self._docker.kept_containers(self._manager.labels)
        except Exception as e:
            _log.debug("could not measure kept sessions: {error}", error=_error(e))
            return
        sizes = {c["id"]: c.get("size") for c in found}
        for kept in self._kept.values():
            if kept.container_id in sizes:
                kept.size = sizes[kept.container_id]
    # -- forks and snapshots (L{Forks}'s) ----------------------------------------------------

    def fork(self, session_id: str, user: str | None) -> Deferred:
        """
        L{Forks.fork}: fire with the new session's id.
        """
        return self.forks.fork(session_id, user)

    def snapshot(self, session_id: str, user: str | None, name: str) -> Deferred:
        """
        L{Forks.snapshot}: fire with the L{Snapshot}.
        """
        return self.forks.snapshot(session_id, user, name)

    def snapshots(self, user: str | None) -> Deferred:
        """
        L{Forks.snapshots}: C{user}'s named snapshots, oldest first.
        """
        return self.forks.snapshots(user)

    def delete_snapshot(self, name: str, user: str | None) -> Deferred:
        """
        L{Forks.delete_snapshot}.
        """
        return self.forks.delete_snapshot(name, user)

    def start_snapshot(self, name: str, user: str | None) -> Deferred:
        """
        L{Forks.start_snapshot}: fire with the new session's id.
        """
        return self.forks.start_snapshot(name, user)


def _engine_record(container: dict) -> dict | None:
    """
    The record the engine keeps with a kept session (C{user}, C{reason},
    C{kept_at}), if it keeps one and it is whole.
    """
    record = container.get("record")
    if not isinstance(record, dict) or not isinstance(record.get("reason"), str):
        return None
    return record


def _command(settings) -> str:
    return settings.description or " ".join(settings.command)[:200]


def _error(e: Exception) -> str:
    return getattr(e, "message", None) or str(e) or type(e).__name__


async def _wait(d: Deferred) -> None:
    waiter = Deferred()
    d.addBoth(lambda result: (waiter.callback(None), result)[1])
    await waiter
