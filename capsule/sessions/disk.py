"""
Disk: what each session container may write, where the storage driver cannot
enforce it.

overlay2 limits a container's writable layer (C{storage_opt} C{size}) only
on xfs mounted with C{pquota}; on ext4 and most hosts it cannot, and the
engine refuses the option (L{capsule.engine.docker.DockerAPI.storage_quota}).
There, L{DiskWatchService} reads every session container's writable layer
size (Docker's C{SizeRw}) on a timer, warns a session nearing its limit and
ends a session past it.  A session can write for up to one interval (at disk
speed) before it is seen.
"""

from __future__ import annotations

from typing import Callable, Iterable

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from capsule.sessions.manager import SessionManager

from capsule.sessions.session import Session

_log = Logger()

# A session is warned once when its writable layer reaches this part of
# the limit.
WARN_FRACTION = 0.8


def disk_verdicts(sessions: Iterable[Session], sizes: dict[str, int], limit: int,
                  warn_at: int) -> tuple[list[tuple[Session, int]], list[tuple[Session, int]]]:
    """
    Which sessions to warn (at or above C{warn_at} bytes, within C{limit})
    and which to end (above C{limit}), each with its size, from C{sizes}:
    the writable layer's size in bytes by container id.  A session whose
    container has no size (not yet made, or not running) is neither.
    """
    warn, end = [], []
    for session in sessions:
        size = sizes.get(session.container_id) if session.container_id else None
        if size is None or session.over:
            continue
        if size > limit:
            end.append((session, size))
        elif size >= warn_at:
            warn.append((session, size))
    return warn, end


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


class DiskWatchService(TimerService):
    """
    Every C{interval} seconds, asks C{sizes} for the writable layer size of
    every container of this server, tells a session at L{WARN_FRACTION} of
    C{limit} (once), and ends a session above C{limit}.  Does nothing while
    C{enforced()} says the storage driver enforces the limit itself.  A
    sweep never raises (that would end the timer), and a sweep still under
    way makes the next one wait its turn.
    """

    def __init__(self, manager: SessionManager, clock, limit: int, interval: float,
                 sizes: Callable[[], Deferred],
                 enforced: Callable[[], bool] = lambda: False) -> None:
        super().__init__(interval, self._sweep)
        self.clock = clock
        self._manager = manager
        self._limit = limit
        self._warn_at = int(limit * WARN_FRACTION)
        self._sizes = sizes
        self._enforced = enforced
        self._warned: set[str] = set()
        self._running: Deferred | None = None

    def _sweep(self) -> None:
        if self._running is not None or self._enforced() or not self._manager.sessions:
            return
        d = self._running = Deferred.fromCoroutine(self._check())
        d.addErrback(lambda f: _log.warn("could not read the sessions' disk use: {e}",
                                         e=f.getErrorMessage()))

        def done(_):
            self._running = None
        d.addBoth(done)

    async def _check(self) -> None:
        sizes = await self._sizes()
        sessions = list(self._manager.sessions.values())
        self._warned &= {s.id for s in sessions}
        warn, end = disk_verdicts(sessions, sizes, self._limit, self._warn_at)
        for session, size in warn:
            if session.id in self._warned:
                continue
            self._warned.add(session.id)
            self._notify(session, (
                f"this session has written {_mib(size)} of its {_mib(self._limit)} disk limit:"
                " it ends when it writes more than that"))
        for session, size in end:
            message = (f"the session wrote {_mib(size)}, more than its disk limit of"
                       f" {_mib(self._limit)}")
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
