"""
Docker calls in flight per caller: a user (or, when capsule has no users, a
client address).  The engine's threads are shared by everyone; a call that
Docker keeps waiting (a container it holds locked, an engine that is slow)
holds its thread until the call's timeout.  The gate lets one caller have at
most C{limit} calls under way, queues C{waiting} more in order, and refuses
the rest at once (L{TooManyCalls}), so that no one caller can hold every
thread and another's new session still starts in its normal time.

The engine knows no users: the gate sits in its callers' path (the session
API's execs and uploads), around the part of their work that holds a Docker
thread (creating the exec and opening its stream, not the command's run).
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred


class TooManyCalls(Exception):
    """
    A caller has C{limit} calls under way and C{waiting} more waiting.
    """

    def __init__(self, caller: str, limit: int, waiting: int) -> None:
        super().__init__(f"{caller} has {limit} Docker calls under way and {waiting} waiting")
        self.caller, self.limit, self.waiting = caller, limit, waiting


class Slot:
    """
    One caller's place among its calls under way; L{release} gives it up
    (once; again is nothing).
    """

    def __init__(self, gate: "CallGate", caller: str) -> None:
        self._gate, self.caller = gate, caller
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._gate._leave(self.caller)


class CallGate:
    """
    @param limit: calls one caller may have under way at once.
    @param waiting: calls past those that may wait for a free place.
    """

    def __init__(self, limit: int, waiting: int) -> None:
        if limit < 1 or waiting < 0:
            raise ValueError(f"a call gate needs a limit of 1 or more, got {limit},"
                             f" and 0 or more waiting, got {waiting}")
        self.limit, self.waiting = limit, waiting
        self._under_way: dict[str, int] = {}
        self._queues: dict[str, deque[Deferred]] = {}

    def under_way(self, caller: str) -> int:
        return self._under_way.get(caller, 0)

    def queued(self, caller: str) -> int:
        return len(self._queues.get(caller, ()))

    def enter(self, caller: str) -> Deferred:
        """
        A Deferred that fires with a L{Slot} once C{caller} may make its
        call: at once if it has fewer than C{limit} under way, else in turn.
        Cancelling it while it waits gives the turn up.

        @raise TooManyCalls: C{caller} has C{waiting} calls waiting already
            (raised here, before anything waits).
        """
        if self.under_way(caller) < self.limit:
            self._under_way[caller] = self.under_way(caller) + 1
            d: Deferred = Deferred()
            d.callback(Slot(self, caller))
            return d
        queue = self._queues.setdefault(caller, deque())
        if len(queue) >= self.waiting:
            if not queue:
                del self._queues[caller]
            raise TooManyCalls(caller, self.limit, len(queue))
        d = Deferred(lambda d: self._give_up(caller, d))
        queue.append(d)
        return d

    def _give_up(self, caller: str, d: Deferred) -> None:
        queue = self._queues.get(caller)
        if queue is not None and d in queue:
            queue.remove(d)
            if not queue:
                del self._queues[caller]

    def _leave(self, caller: str) -> None:
        queue = self._queues.get(caller)
        if queue:
            # The place goes to the caller's next call in line.
            d = queue.popleft()
            if not queue:
                del self._queues[caller]
            d.callback(Slot(self, caller))
            return
        left = self.under_way(caller) - 1
        if left > 0:
            self._under_way[caller] = left
        else:
            self._under_way.pop(caller, None)
