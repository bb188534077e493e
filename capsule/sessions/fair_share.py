"""
CPU fair share between users: the sessions of one user share one CPU weight
(C{--cpu-shares}), split equally, so that ten sessions of one user cannot
take ten times the CPU of another user's single session.  Without users,
each session has the full weight.
"""

from __future__ import annotations

from twisted.logger import Logger

from capsule.engine.kube_pods import Unsupported

_log = Logger()

# Docker's smallest weight.
MIN_SHARES = 2


class FairShare:
    """
    @param sessions: the live sessions by id (read, never changed).
    @param base: the weight of one user (or of each session, without users).
    """

    def __init__(self, docker, sessions: dict, base: int) -> None:
        self._docker = docker
        self._sessions = sessions
        self.base = base
        # The engine cannot weigh a running session (a pod's CPU request is
        # fixed): said once, not asked again.
        self.unsupported = False

    def shares_of(self, user: str | None) -> int:
        """
        The CPU weight of each of C{user}'s sessions now.
        """
        if user is None:
            return self.base
        count = sum(1 for s in self._sessions.values()
                    if s.core.user == user and s.container_id is not None)
        return max(MIN_SHARES, self.base // max(1, count))

    def share(self, user: str | None) -> None:
        """
        Give each live session of C{user} its share of the user's weight
        (a session that has it already costs no Docker call).
        """
        if user is None or self.unsupported:
            return
        shares = self.shares_of(user)
        for session in list(self._sessions.values()):
            if self.unsupported:
                return
            if (session.core.user != user or session.container_id is None
                    or session.core.cpu_shares == shares):
                continue
            session.core.cpu_shares = shares
            d = self._docker.set_cpu_shares(session.container_id, shares)
            d.addErrback(self._failed, session.id)

    def _failed(self, failure, session_id: str) -> None:
        if failure.check(Unsupported):
            if not self.unsupported:
                self.unsupported = True
                _log.info("users' sessions are not weighted against each other for the CPU:"
                          " {error}", error=failure.getErrorMessage())
            return
        _log.warn("could not set the CPU weight of session {session_id}: {error}",
                  session_id=session_id[:8], error=failure.getErrorMessage())
