"""
Draining: capsule takes no new sessions (each door refuses them with
C{draining}); the sessions it has go on until they end or, given a
deadline, until it passes: then they are ended.  Their clients hear of it.
"""

from __future__ import annotations

import time

from twisted.logger import Logger

_log = Logger()

DRAINING = "draining"
ENDED_BY_ADMIN = "an administrator ended this session"
DRAIN_REFUSAL = ("capsule is draining for maintenance and takes no new sessions: try again"
                 " later")
DEADLINE_ENDED = "capsule was drained for maintenance: the session ended at the drain's deadline"


class Drain:
    """
    Whether capsule takes new sessions.  While it drains, a new session is
    refused (C{draining}, close 4503); the sessions it has go on until they
    end or, given a deadline, until it passes: then they are ended.  Not
    kept across a restart.
    """

    def __init__(self, manager, clock) -> None:
        self._manager = manager
        self._clock = clock
        self.active = False
        self.since: float | None = None
        self.deadline: float | None = None
        self._timer = None

    def start(self, deadline: float | None = None) -> None:
        """
        Drain, ending what is left after C{deadline} seconds (C{None}:
        never).  Again while draining: the new deadline replaces the old.
        """
        now = self._clock.seconds()
        first = not self.active
        self.active = True
        if first:
            self.since = now
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.deadline = None if deadline is None else now + deadline
        if deadline is not None:
            self._timer = self._clock.callLater(deadline, self._deadline_passed)
        self._tell(self.notice())

    def stop(self) -> None:
        """
        Take new sessions again.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.active, self.since, self.deadline = False, None, None

    def notice(self) -> str:
        if self.deadline is None:
            return ("capsule is draining for maintenance: it takes no new sessions; this one"
                    " goes on until it ends")
        when = time.strftime("%H:%M:%S UTC", time.gmtime(self.deadline))
        return ("capsule is draining for maintenance: it takes no new sessions; this one"
                f" ends at {when}, in {self.deadline - self._clock.seconds():.0f} s: save"
                " your work")

    def _tell(self, message: str) -> None:
        for session in list(self._manager.sessions.values()):
            client = session.client
            if client is not None:
                try:
                    client.session_notice(DRAINING, message)
                except Exception:
                    _log.failure("telling session {session_id} of the drain failed",
                                 session_id=session.id[:8])

    def _deadline_passed(self) -> None:
        self._timer = None
        ended = end_all(self._manager, DEADLINE_ENDED)
        _log.info("the drain's deadline passed: ended {count} session(s)", count=ended)

    def state(self) -> dict:
        now = self._clock.seconds()
        return {"draining": self.active, "since": self.since,
                "deadline_in": None if self.deadline is None else max(0.0, self.deadline - now),
                "sessions": len(self._manager.sessions)}


def end_all(manager, message: str) -> int:
    count = 0
    for session in list(manager.sessions.values()):
        try:
            manager.end(session, message)
            count += 1
        except Exception:
            _log.failure("ending session {session_id} failed", session_id=session.id[:8])
    return count
