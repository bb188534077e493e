"""
Logging errors that something outside controls, at a bounded rate.

A session's user can make the same error happen as often as they like; each
kind of error of each session is logged at most once per interval, and the
next line after that says how many more like it there were meanwhile.  No
I/O of its own and no clock of its own: the caller says when it is.
"""

from __future__ import annotations

from twisted.logger import Logger

INTERVAL = 60.0

# Past this many keys, those quiet for an interval are forgotten (their
# counts logged first).
_PRUNE_AT = 4096


class RateLimitedLog:
    """
    At most one line per key (a session and a kind of error) per
    C{interval} seconds; the others are counted.
    """

    def __init__(self, log: Logger, interval: float = INTERVAL) -> None:
        self._log = log
        self._interval = interval
        # key -> [when last logged, how many not logged since]
        self._seen: dict[tuple[str, str], list] = {}

    def error(self, now: float, session_id: str, kind: str, format: str, **fields) -> bool:
        return self._emit(self._log.error, now, session_id, kind, format, fields)

    def warn(self, now: float, session_id: str, kind: str, format: str, **fields) -> bool:
        return self._emit(self._log.warn, now, session_id, kind, format, fields)

    def failure(self, now: float, session_id: str, kind: str, format: str, **fields) -> bool:
        """
        As L{Logger.failure}, inside an C{except} block.
        """
        return self._emit(self._log.failure, now, session_id, kind, format, fields)

    def _emit(self, method, now: float, session_id: str, kind: str, format: str,
              fields: dict) -> bool:
        """
        Log, or count; return whether a line was written.
        """
        key = (session_id, kind)
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._interval:
            seen[1] += 1
            return False
        more = 0 if seen is None else seen[1]
        if more:
            format += " ({more} more like it in the last {interval:g} s)"
            fields = dict(fields, more=more, interval=now - seen[0])
        if len(self._seen) >= _PRUNE_AT:
            self._prune(now)
        self._seen[key] = [now, 0]
        # Log lines name a session by a short prefix of its id.
        method(format, session_id=session_id[:8], **fields)
        return True

    def _prune(self, now: float) -> None:
        for key, (at, more) in list(self._seen.items()):
            if now - at >= self._interval:
                del self._seen[key]
                if more:
                    self._log.error("session {session_id}: {more} more errors of kind"
                                    " {kind} were not logged", session_id=key[0][:8],
                                    more=more, kind=key[1])

    def forget(self, session_id: str) -> None:
        """
        The session is over: log what was counted and not logged.
        """
        for key in [k for k in self._seen if k[0] == session_id]:
            at, more = self._seen.pop(key)
            if more:
                self._log.error("session {session_id}: {more} more errors of kind {kind}"
                                " were not logged", session_id=session_id[:8], more=more,
                                kind=key[1])
