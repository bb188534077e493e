"""
Memory accounting: what a session is counted at, against what.

A session is counted at its profile's memory request (what it is expected
to hold) or at what it was last measured to hold, whichever is more; never
at its limit, which is only a cap the kernel enforces.  The budget adds up
the live sessions' counts and the warm sessions' requests.  Beside the
budget, what the engine's host really has: while its available memory is
under the reserve, no new session is made.

Pure: the host's reading is an object given to it (in the server,
L{capsule.sessions.host_memory.HostMemory}), read when asked; nothing here
reads a file or calls Docker.
"""

from __future__ import annotations

from typing import Iterable, Protocol

MIB = 1024 ** 2
GIB = 1024 ** 3

# The default reserve: this share of the host's memory, and at least
# RESERVE_MIN.
RESERVE_SHARE = 0.10
RESERVE_MIN = GIB
# The default --max-sessions is capped by the host's processes and CPUs:
# an idle session runs a handful of processes (init, the keeper, its relay,
# the shell), and a CPU serves this many sessions that mostly wait for
# keystrokes.
PROCESSES_PER_SESSION = 16
SESSIONS_PER_CPU = 256


class HostReading(Protocol):
    """
    What the engine's host has, as last read.
    """

    @property
    def available(self) -> int | None:
        """
        Bytes of memory available (C{MemAvailable}); C{None}: not known.
        """

    def used(self, container_id: str) -> int | None:
        """
        The bytes a container was last measured to hold (its working set);
        C{None}: not measured.
        """


def default_reserve(total: int) -> int:
    """
    The reserve for a host with C{total} bytes of memory: a tenth of it,
    and at least 1 GiB.
    """
    return max(int(total * RESERVE_SHARE), RESERVE_MIN)


def host_capacity(total: int, request: int, reserve: int | None = None,
                  cpus: int | None = None, pid_max: int | None = None) -> int:
    """
    The sessions a host holds, for the default --max-sessions: its memory
    less the reserve, divided by the default request; at most
    C{pid_max // PROCESSES_PER_SESSION} and C{SESSIONS_PER_CPU * cpus};
    at least 1.
    """
    if reserve is None:
        reserve = default_reserve(total)
    sessions = max(0, total - reserve) // max(1, request)
    if pid_max:
        sessions = min(sessions, pid_max // PROCESSES_PER_SESSION)
    if cpus:
        sessions = min(sessions, SESSIONS_PER_CPU * cpus)
    return max(1, sessions)


def mib(value: int) -> int:
    return value // MIB


class MemoryBudget:
    """
    @ivar default_request: the request of a session without a profile (the
        C{shell} profile's, C{--memory-request}).
    @ivar budget: bytes the counted sessions may add up to; C{None}: no
        budget (not known yet, or off).
    @ivar reserve: bytes the host keeps available; C{None}: not watched.
    @param reading: the host's reading (L{HostReading}), or C{None}.
    @param budget_from_host: the budget is the host's memory less the
        reserve, once the host's memory is known (L{host_is}).
    @param reserve_from_host: the reserve is L{default_reserve} of the
        host's memory, once known.
    """

    def __init__(self, default_request: int, budget: int | None = None,
                 reserve: int | None = None, reading: HostReading | None = None,
                 budget_from_host: bool = False, reserve_from_host: bool = False) -> None:
        self.default_request = default_request
        self.budget = budget
        self.reserve = reserve
        self.reading = reading
        self._budget_from_host = budget_from_host
        self._reserve_from_host = reserve_from_host

    def host_is(self, total: int, watched: bool = True) -> None:
        """
        The engine's host has C{total} bytes of memory: the budget and the
        reserve that follow from it are set (those the operator left to
        it).  C{watched}: its available memory is read (else the reserve
        is not watched).
        """
        if self._reserve_from_host:
            self.reserve = default_reserve(total) if watched else None
        if self._budget_from_host:
            self.budget = max(0, total - (self.reserve or default_reserve(total)))

    def request_of(self, profile) -> int:
        """
        What a new session of C{profile} (C{None}: the default) is counted at.
        """
        return profile.request if profile is not None else self.default_request

    def counted(self, session) -> int:
        """
        What a live session is counted at: its request, or what it was
        measured to hold if that is more.
        """
        request = self.request_of(getattr(session, "settings", None))
        container_id = getattr(session, "container_id", None)
        if self.reading is None or container_id is None:
            return request
        return max(request, self.reading.used(container_id) or 0)

    def live(self, sessions: Iterable) -> int:
        return sum(self.counted(s) for s in sessions)

    def warm(self, held: Iterable) -> int:
        """
        What warm sessions are counted at: their requests.
        """
        return sum(self.request_of(getattr(s, "settings", None)) for s in held)

    def under_reserve(self) -> str | None:
        """
        Why no session may be made now, if the host is under its reserve.
        """
        if self.reserve is None or self.reading is None:
            return None
        available = self.reading.available
        if available is None or available >= self.reserve:
            return None
        return (f"the server is full: the host has {mib(available)} MiB of memory available,"
                f" under its reserve of {mib(self.reserve)} MiB: try again later")

    def refusal(self, sessions: Iterable, extra: int) -> str | None:
        """
        Why a user's new session, counted at C{extra} more bytes than the
        live C{sessions}, may not be made; C{None}: it may.  Warm sessions
        are not counted against it: a user's session takes a warm one's
        place (see L{excess}).
        """
        short = self.under_reserve()
        if short is not None:
            return short
        if self.budget is None:
            return None
        live = self.live(sessions)
        if live + extra > self.budget:
            return (f"the server is full: its memory is promised to other sessions"
                    f" ({mib(live)} of {mib(self.budget)} MiB): try again later")
        return None

    def room_for_warm(self, sessions: Iterable, held: Iterable, profile,
                      beside: int = 0) -> bool:
        """
        Whether one more warm session of C{profile} fits beside the live
        C{sessions} and the warm ones C{held} (and C{beside} bytes more,
        kept for a user's session): the pool waits while not.
        """
        if self.under_reserve() is not None:
            return False
        if self.budget is None:
            return True
        return (self.live(sessions) + self.warm(held) + self.request_of(profile) + beside
                <= self.budget)

    def excess(self, sessions: Iterable, held: Iterable) -> int:
        """
        Bytes by which the live and warm sessions together are over the
        budget (0 if not): warm sessions to give up.
        """
        if self.budget is None:
            return 0
        return max(0, self.live(sessions) + self.warm(held) - self.budget)
