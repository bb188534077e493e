"""
Expiring sessions: a pure "what has expired" and the timer that acts on it.
"""

from __future__ import annotations

from typing import Iterable

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from capsule.core.profiles import DEFAULT_PROFILE
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import Session

_log = Logger()


def expired_sessions(sessions: Iterable[Session], now: float, grace: float) -> list[Session]:
    """
    The sessions that have been without a client for at least C{grace}
    seconds before C{now}: those detached from a running shell, and those
    found after a restart whose client never came back.  A session waiting
    for the Docker engine is never among them.
    """
    return [
        s for s in sessions
        if s.state.waiting and s.core.left_at is not None
        and now - s.core.left_at >= grace
    ]


def overdue_sessions(sessions: Iterable[Session], now: float, max_lifetime: float,
                     idle_timeout: float) -> list[tuple[Session, str]]:
    """
    The sessions past C{max_lifetime} seconds of age, or without input or
    output for C{idle_timeout} seconds (client attached or not), each with
    the sentence its client is told; 0 turns a limit off.  A session of a
    profile other than the default has that profile's limits instead.  A
    session that is starting or waiting for the engine is left alone.
    """
    due = []
    for s in sessions:
        if not s.state.settled:
            continue
        lifetime, idle = max_lifetime, idle_timeout
        lifetime_name, idle_name = "--max-lifetime", "--idle-timeout"
        settings = getattr(s, "settings", None)
        if settings is not None and settings.name != DEFAULT_PROFILE or (
                settings is not None and (settings.max_lifetime, settings.idle_timeout)
                != (max_lifetime, idle_timeout)):
            lifetime, idle = settings.max_lifetime, settings.idle_timeout
            lifetime_name = f"the max_lifetime of profile {settings.name}"
            idle_name = f"the idle_timeout of profile {settings.name}"
        if lifetime and now - s.core.created_at >= lifetime:
            due.append((s, f"the session reached its maximum lifetime ({lifetime:g} s,"
                            f" {lifetime_name})"))
        elif idle and now - s.core.active_at >= idle:
            due.append((s, f"the session was idle (no input and no output) for"
                           f" {idle:g} s ({idle_name})"))
    return due


def end_overdue(manager: SessionManager, clock) -> list[Session]:
    """
    End every session past its lifetime or idle limit; like L{expire_due},
    never raises.
    """
    config = manager.config
    profiles = getattr(manager, "profiles", {}).values()
    if not (config.max_lifetime or config.idle_timeout
            or any(p.max_lifetime or p.idle_timeout for p in profiles)):
        return []
    try:
        due = overdue_sessions(list(manager.sessions.values()), clock.seconds(),
                               config.max_lifetime, config.idle_timeout)
    except Exception:
        _log.failure("could not work out which sessions are over their limits")
        return []
    ended = []
    for session, message in due:
        try:
            _log.info("ending session {session_id}: {message}", session_id=session.id[:8],
                      message=message)
            manager.end(session, message)
            ended.append(session)
        except Exception:
            _log.failure("ending session {session_id} failed", session_id=session.id[:8])
    return ended


def expire_due(manager: SessionManager, clock) -> list[Session]:
    """
    Expire every session that is due, and return those that ended.  Each
    one is handled on its own and every failure is logged, never raised: a
    raising call would end the timer that calls it.
    """
    try:
        due = expired_sessions(list(manager.sessions.values()), clock.seconds(),
                               manager.config.grace)
    except Exception:
        _log.failure("could not work out which sessions expired")
        return []
    ended = []
    for session in due:
        try:
            if manager.expire(session):
                ended.append(session)
        except Exception:
            _log.failure("expiring session {session_id} failed", session_id=session.id[:8])
    return ended


class CleanupService(TimerService):
    """
    Every C{interval} seconds, expire the sessions that are due (put away,
    where their profile keeps sessions) and remove the kept sessions past
    their retention (L{capsule.sessions.keeping.Keeping.sweep}); every
    C{orphan_interval} seconds, also remove containers of this server that
    nothing owns any more (their removal failed while Docker was away).
    """

    def __init__(self, manager: SessionManager, clock, interval: float,
                 orphan_interval: float = 30.0) -> None:
        super().__init__(interval, self._sweep)
        self.clock = clock
        self._manager = manager
        self._orphan_interval = orphan_interval
        self._next_orphan_sweep = None

    def _sweep(self) -> None:
        expire_due(self._manager, self.clock)
        end_overdue(self._manager, self.clock)
        now = self.clock.seconds()
        keeping = getattr(self._manager, "keeping", None)
        if keeping is not None:
            keeping.sweep(now)
        if self._next_orphan_sweep is None:
            self._next_orphan_sweep = now + self._orphan_interval
        elif now >= self._next_orphan_sweep:
            self._next_orphan_sweep = now + self._orphan_interval
            orphans = Deferred.fromCoroutine(
                self._manager.recovery.remove_leftovers("whose session had ended"))
            # Docker being away is already reported elsewhere: stay quiet.
            orphans.addErrback(lambda f: _log.debug("orphan sweep failed: {e}",
                                                    e=f.getErrorMessage()))
