"""
Disk: what each session holds on the host's disk, where the storage driver
cannot limit it, and its user's agent volume.

overlay2 limits a container's writable layer (C{storage_opt} C{size}) only
on xfs mounted with C{pquota}; on ext4 and most hosts it cannot, and the
engine refuses the option (L{capsule.engine.docker.DockerAPI.storage_quota}).
There, L{DiskWatchService} counts on a timer what every session holds (see
L{capsule.core.diskuse}): its writable layer (Docker's C{SizeRw}), its own
volumes (a --read-only-root session's /workspace and home), and the deleted
files its processes still hold open; it warns a session nearing its limit
and ends a session past it.  It also weighs each session's agent volume
against its profile's C{agent_volume_limit}, whatever the storage driver.

What it costs the engine per check: one call for every session's layer
size and mounts, one more for volumes' sizes (C{/system/df}) when a session
has volumes, and at most C{scans} execs (L{HELD_SCAN}, as the session's
user) for deleted files held open, taken in turn: a session that held some
at its last scan first, then the one scanned longest ago.  A session can
write for up to one interval (at disk speed) before it is seen, and hold
deleted files for a few more.
"""

from __future__ import annotations

from typing import Callable, Iterable

from docker.utils import parse_bytes
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from capsule.core.diskuse import HELD_SCAN, DiskUsage, Held, SessionDisk, mib, parse_held
from capsule.core.profiles import DEFAULT_PROFILE, Profile
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import Session

_log = Logger()

# A session is warned once when what it holds reaches this part of the
# limit.
WARN_FRACTION = 0.8
# Scans for deleted files held open, at most, per check (each an exec).
DEFAULT_SCANS = 2
# How long a scan may take, and how much of its output is read.
SCAN_TIMEOUT = 20.0
SCAN_OUTPUT = 256 * 1024
# Seconds a session whose agent volume is past its limit has to bring it
# back under (the volume outlives sessions: the next session of its user
# must be able to clean it up), unless the volume grows meanwhile by more
# than VOLUME_SLACK.
DEFAULT_VOLUME_GRACE = 120.0
VOLUME_SLACK = 1024 * 1024


def _mib(size: int) -> str:
    return mib(size)


def _verdict(size: int, limit: int, warn_at: int) -> str | None:
    if size > limit:
        return "end"
    if size >= warn_at:
        return "warn"
    return None


def disk_verdicts(sessions: Iterable[Session], sizes: dict[str, int], limit: int,
                  warn_at: int) -> tuple[list[tuple[Session, int]], list[tuple[Session, int]]]:
    """
    Which sessions to warn (at or above C{warn_at} bytes, within C{limit})
    and which to end (above C{limit}), each with its size, from C{sizes}:
    what each holds in bytes by container id.  A session whose container
    has no size (not yet made, or not running) is neither.
    """
    warn, end = [], []
    for session in sessions:
        size = sizes.get(session.container_id) if session.container_id else None
        if size is None or session.over:
            continue
        verdict = _verdict(size, limit, warn_at)
        if verdict == "end":
            end.append((session, size))
        elif verdict == "warn":
            warn.append((session, size))
    return warn, end


def scan_held(docker, container_id: str, user: str) -> Deferred:
    """
    Run L{HELD_SCAN} in a container as C{user} (the session's: the kernel
    shows a process's descriptors to its own user only, in a container
    without capabilities); fire with the L{Held} it found.
    """
    d = docker.run_command(container_id, list(HELD_SCAN), user, "/", {},
                           max_output=SCAN_OUTPUT, timeout=SCAN_TIMEOUT)
    d.addCallback(lambda result: parse_held(result.stdout))
    return d


class DiskWatchService(TimerService):
    """
    Every C{interval} seconds, asks C{usage(volumes)} for a
    L{DiskUsage} of this server's containers (C{volumes}: with volumes'
    sizes) and C{scan(container_id, user)} for the L{Held} files of at most
    C{scans} sessions; tells a session at L{WARN_FRACTION} of its limit (its
    profile's C{disk}, else C{limit}) once, and ends a session above it.
    While C{enforced()} says the storage driver limits the writable layer,
    only volumes are counted.  A session whose agent volume is past its
    profile's C{agent_volume_limit} is warned, and ended unless the volume
    is back under it within C{volume_grace} seconds (or at once if it grows
    meanwhile).  A sweep never raises (that would end the timer), and a
    sweep still under way makes the next one wait its turn.
    """

    def __init__(self, manager: SessionManager, clock, limit: int | None, interval: float,
                 usage: Callable[[bool], Deferred],
                 enforced: Callable[[], bool] = lambda: False,
                 scan: Callable[[str, str], Deferred] | None = None,
                 scans: int = DEFAULT_SCANS,
                 volume_grace: float = DEFAULT_VOLUME_GRACE) -> None:
        super().__init__(interval, self._sweep)
        self.clock = clock
        self._manager = manager
        self._limit = limit
        self._usage = usage
        self._enforced = enforced
        self._scan = scan
        self._scans = scans
        self._volume_grace = volume_grace
        self._warned: set[str] = set()
        self._running: Deferred | None = None
        # By session id: what its last scan found, and when it was.
        self._held: dict[str, Held] = {}
        self._scanned: dict[str, float] = {}
        self._hidden_told: set[str] = set()
        # By session id: its agent volume's size when it was found past its
        # limit, and until when it may be.
        self._volume_over: dict[str, tuple[int, float]] = {}
        self._volume_warned: set[str] = set()

    # -- what a session is allowed -------------------------------------

    def _profile(self, session: Session) -> Profile:
        return session.settings or self._manager.profiles[DEFAULT_PROFILE]

    def _limit_of(self, session: Session) -> int | None:
        disk = self._profile(session).spec.disk
        return parse_bytes(disk) if disk else self._limit

    def _has_volumes(self, session: Session) -> bool:
        profile = self._profile(session)
        return bool(profile.spec.read_only_root or (
            profile.agent_volume and profile.agent_volume_limit is not None))

    # -- the sweep ----------------------------------------------------------

    def _sweep(self) -> None:
        if self._running is not None or not self._manager.sessions:
            return
        # Sessions with no disk limit and no volume to weigh (a shell beside
        # the claude profile's volumes) cost the engine nothing.
        if not any(self._limit_of(s) is not None or self._has_volumes(s)
                   for s in self._manager.sessions.values()):
            return
        if self._enforced() and not any(self._has_volumes(s)
                                        for s in self._manager.sessions.values()):
            return
        d = self._running = Deferred.fromCoroutine(self._check())
        d.addErrback(lambda f: _log.warn("could not read the sessions' disk use: {e}",
                                         e=f.getErrorMessage()))

        def done(_):
            self._running = None
        d.addBoth(done)

    async def _check(self) -> None:
        enforced = self._enforced()
        sessions = list(self._manager.sessions.values())
        volumes = any(self._has_volumes(s) for s in sessions)
        usage: DiskUsage = await self._usage(volumes)
        if not enforced and self._scan is not None:
            await self._scan_some(sessions)
        sessions = list(self._manager.sessions.values())
        alive = {s.id for s in sessions}
        for kept in (self._warned, self._hidden_told, self._volume_warned):
            kept &= alive
        for kept in (self._held, self._scanned, self._volume_over):
            for gone in set(kept) - alive:
                del kept[gone]
        for session in sessions:
            if session.over or session.container_id not in usage.layers:
                continue
            self._check_disk(session, usage, enforced)
            if not session.over:
                self._check_agent_volume(session, usage)

    async def _scan_some(self, sessions: list[Session]) -> None:
        """
        Scan up to C{scans} sessions for deleted files held open: those that
        held some first, then those scanned longest ago.
        """
        ready = [s for s in sessions if s.ready and self._limit_of(s) is not None]
        ready.sort(key=lambda s: (not self._held.get(s.id, Held()).bytes,
                                  self._scanned.get(s.id, float("-inf"))))
        for session in ready[:self._scans]:
            self._scanned[session.id] = self.clock.seconds()
            try:
                held = await self._scan(session.container_id, self._profile(session).spec.user)
            except Exception as e:
                # Gone, or too busy to answer: what it held before stands.
                _log.debug("could not scan session {session_id} for deleted files: {e}",
                           session_id=session.id[:8], e=e)
                continue
            self._held[session.id] = held
            if held.hidden and session.id not in self._hidden_told:
                self._hidden_told.add(session.id)
                _log.info("session {session_id}: {n} of its processes hide their open files"
                          " from the disk count (another user's, or undumpable)",
                          session_id=session.id[:8], n=held.hidden)

    def _check_disk(self, session: Session, usage: DiskUsage, enforced: bool) -> None:
        limit = self._limit_of(session)
        if limit is None:
            return
        agent = self._profile(session).agent_volume
        own = sum(usage.volumes.get(m.name, 0) for m in usage.mounts.get(session.container_id, ())
                  if m.destination != agent)
        disk = SessionDisk(layer=0 if enforced else usage.layers[session.container_id],
                           volumes=own,
                           held=0 if enforced else self._held.get(session.id, Held()).bytes)
        verdict = _verdict(disk.total, limit, int(limit * WARN_FRACTION))
        if verdict == "warn" and session.id not in self._warned:
            self._warned.add(session.id)
            self._notify(session, (
                f"this session has written {disk.describe()} of its {_mib(limit)} disk limit:"
                " it ends when it writes more than that"))
        elif verdict == "end":
            self._end(session, f"the session wrote {disk.describe()}, more than its disk limit"
                               f" of {_mib(limit)}")

    def _check_agent_volume(self, session: Session, usage: DiskUsage) -> None:
        profile = self._profile(session)
        limit = profile.agent_volume_limit
        if not profile.agent_volume or limit is None:
            return
        names = [m.name for m in usage.mounts.get(session.container_id, ())
                 if m.destination == profile.agent_volume]
        size = usage.volumes.get(names[0]) if names else None
        if size is None:
            return
        where = f"its agent volume ({profile.agent_volume}, kept between sessions)"
        if size <= limit:
            self._volume_over.pop(session.id, None)
            if size >= limit * WARN_FRACTION and session.id not in self._volume_warned:
                self._volume_warned.add(session.id)
                self._notify(session, f"{where} holds {_mib(size)} of its {_mib(limit)} limit")
            return
        now = self.clock.seconds()
        over = self._volume_over.get(session.id)
        if over is None:
            self._volume_over[session.id] = (size, now + self._volume_grace)
            self._notify(session, (
                f"{where} holds {_mib(size)}, more than its limit of {_mib(limit)}: remove"
                f" files from it within {self._volume_grace:g} s, or this session ends"))
            return
        first, deadline = over
        if size > first + VOLUME_SLACK or now >= deadline:
            self._end(session, (
                f"{where} holds {_mib(size)}, more than its limit of {_mib(limit)}; remove"
                f" files from it in a new session, or ask the operator to remove it"))

    def _end(self, session: Session, message: str) -> None:
        _log.info("ending session {session_id}: {message}", session_id=session.id[:8],
                  message=message)
        self._notify(session, message)
        try:
            self._manager.end(session, message)
        except Exception:
            _log.failure("ending session {session_id} failed", session_id=session.id[:8])

    @staticmethod
    def _notify(session: Session, message: str) -> None:
        client = session.client
        if client is None:
            return
        try:
            client.session_notice("disk_limit", message)
        except Exception:
            _log.failure("telling session {session_id} of its disk use failed",
                         session_id=session.id[:8])
