"""
A warm pool: sessions started ahead of need, so that a new client costs no
Docker call at all.

Each warm entry is a whole session made without a client (its lifecycle's
C{prepare}): its container runs, its keeper runs the shell on its pty, and
the relay exec is attached and read by the reactor, so that the login
banner and the first prompt are already in its replay buffer.  Until it is
taken it belongs to the pool alone: it is not among the manager's sessions,
so no user sees it, the grace period never expires it and no per-user limit
counts it.  Taking it (L{WarmPool.take}) hands the session over; the
manager attaches the client, resizes the terminal to the client's (the
shell redraws its prompt on SIGWINCH) and replays what it printed.

An entry is handed out only if it is fit: detached from any client, its
shell's stream up, and not older than C{max_age}.  A warm shell that dies,
or whose relay closes, is replaced as soon as its session ends, and an
entry that grows too old is ended and replaced when it does; one found unfit
at take time is ended there and the next is tried.  The pool refills one
session at a time, after C{refill_delay} seconds, so that a refill does not
compete with the session just taken.

Users first: a refill waits while sessions of clients are being made (a
burst of new visitors is served by cold starts, and a warm container made
meanwhile would compete with theirs for the engine), and while someone
types (see C{quiet}), each time for at most C{max_wait} seconds.

The pool follows demand: while takes come fast (more than C{size} within
the last C{window} seconds), it holds one more warm session for each take
beyond C{size}, up to C{grow_by} more, and only while C{room()} says the
server has room for one more; once the takes fall back, the sessions beyond
what is wanted are ended (the oldest first) and the pool is back at C{size}
C{window} seconds after the last take.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from capsule.core.session_core import State


_log = Logger()

# Seconds between looks at whether clients' sessions are still being made,
# while a refill waits for them.
BUSY_RECHECK = 0.1


class WarmPool:
    """
    @param make: makes one warm session, not registered with the manager;
        the pool prepares it, and its outcome comes back through
        L{went_live} or L{lost}.
    @param name: what the pool is for (its profile), for the log.
    @param busy: whether sessions of clients are being made now (a refill
        waits until none is, for at most C{max_wait} seconds).
    @param grow_by: warm sessions the pool may hold beyond C{size} while
        takes come fast (0: it never grows).
    @param window: the seconds over which takes are counted, and after
        which, without takes, the pool is back at C{size}.
    @param room: whether the server has room for one more warm session
        beyond C{size} (its memory budget); default: always.
    """

    def __init__(self, clock, size: int, make: Callable[[], object], max_age: float = 3600.0,
                 retry_delay: float = 5.0, refill_delay: float = 0.5,
                 name: str = "shell", typed_at: Callable[[], float] | None = None,
                 quiet: float = 1.0, max_wait: float = 30.0, observer=None,
                 busy: Callable[[], bool] | None = None, grow_by: int = 0,
                 window: float = 30.0, room: Callable[[], bool] | None = None,
                 fits: Callable[[], bool] | None = None) -> None:
        self._clock = clock
        # Whether one more warm session fits in the memory budget
        # (capsule.core.memory): while not, the refill waits (a user's
        # session never does).
        self._fits = fits
        self._full = False
        self._busy = busy
        self.grow_by = grow_by
        self.window = window
        self._room = room
        # When the takes of the last window were, oldest first.
        self._takes: deque = deque()
        self._shrink_call = None
        # Told whether each take found a warm session (ISessionObserver.pool_taken).
        self._observer = observer
        # When someone last typed into a live session: a refill (a container
        # made and started, its shell started) costs the engine CPU that
        # keystrokes' round trips go through, so it waits for C{quiet}
        # seconds without typing, for at most C{max_wait} seconds.
        self._typed_at = typed_at
        self.quiet = quiet
        self.max_wait = max_wait
        self._waiting_since: float | None = None
        self.size = size
        self._make = make
        self.max_age = max_age
        self.retry_delay = retry_delay
        self.refill_delay = refill_delay
        self.name = name
        # Sessions whose shells run, oldest first.
        self.ready: deque = deque()
        # The one session being made, if any.
        self.making = None
        # Sessions the pool ended, until their end is heard.
        self._ending: set = set()
        self._running = False
        self._next = None
        self._failing = False
        self._too_old: dict[object, object] = {}

    # -- what the manager asks -------------------------------------------

    @property
    def container_ids(self) -> set[str]:
        sessions = [*self.ready, *([self.making] if self.making else [])]
        return {s.container_id for s in sessions if s.container_id is not None}

    @property
    def held(self) -> list:
        """
        The warm sessions ready, and the one being made.
        """
        return [*self.ready, *([self.making] if self.making is not None else [])]

    @property
    def pending(self) -> set[str]:
        """
        The ids of the sessions being made (their containers may not be known yet).
        """
        return {self.making.id} if self.making is not None else set()

    @property
    def target(self) -> int:
        """
        How many warm sessions the pool wants now: C{size}, and one more for
        each take beyond C{size} within the last C{window} seconds, up to
        C{grow_by} more.
        """
        self._forget_old_takes()
        return self.size + min(self.grow_by, max(0, len(self._takes) - self.size))

    def holds(self, session) -> bool:
        return session is self.making or session in self.ready or session in self._ending

    def start(self) -> None:
        self._running = True
        self._refill()

    def refill(self) -> None:
        """
        Make what is missing, after C{refill_delay}.
        """
        self._schedule(self.refill_delay)

    def fit(self, session) -> str | None:
        """
        Why C{session} must not be handed out, or C{None} if it may be.
        """
        if session.state is not State.DETACHED or session.attached:
            return f"its shell is not running ({session.state})"
        if session.core.stream is None or session.shell is None:
            return "its relay is closed"
        if self._clock.seconds() - session.core.created_at > self.max_age:
            return f"it is older than {self.max_age:g} s"
        return None

    def take(self):
        """
        A warm session for a new client, or C{None} if none is fit.  It is
        the caller's from now on; the pool refills in the background.
        """
        found = None
        while self.ready and found is None:
            session = self.ready.popleft()
            self._forget_age(session)
            why = self.fit(session)
            if why is None:
                found = session
            else:
                self._end(session, why)
        if self._observer is not None:
            self._observer.pool_taken(self, found)
        if self.grow_by:
            self._takes.append(self._clock.seconds())
            self._shrink_later()
        self._schedule(self.refill_delay)
        return found

    def give_up(self) -> bool:
        """
        End the newest ready warm session, to make room in the memory
        budget for a user's session; whether there was one.
        """
        if not self.ready:
            return False
        session = self.ready.pop()
        self._forget_age(session)
        self._end(session, "its memory is wanted by a user's session")
        self._schedule(self.retry_delay)
        return True

    def stop(self) -> Deferred:
        """
        Stop refilling and end the warm sessions (the manager removes their
        containers, and a stopping server waits for that).
        """
        self._running = False
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._shrink_call is not None and self._shrink_call.active():
            self._shrink_call.cancel()
        self._shrink_call = None
        sessions = [*self.ready, *([self.making] if self.making else [])]
        self.ready, self.making = deque(), None
        for session in sessions:
            self._forget_age(session)
            self._end(session, "capsule is stopping")
        return succeed(None)

    # -- what the manager tells it about its sessions ------------------------

    def went_live(self, session) -> None:
        """
        A warm session's shell runs and its relay is read: it is ready.
        """
        if session is not self.making:
            return
        self.making = None
        if not self._running:
            self._end(session, "the pool is stopped")
            return
        if self._failing:
            _log.info("the warm pool of {name} refills again", name=self.name)
            self._failing = False
        self.ready.append(session)
        self._too_old[session] = self._clock.callLater(self.max_age, self._aged, session)
        if len(self.ready) > self.target:
            # The demand it was made for is gone.
            self._shrink()
            return
        _log.debug("warm session {session_id} ready in {ms:.0f} ms",
                   session_id=session.id[:8],
                   ms=(self._clock.seconds() - session.core.created_at) * 1000)
        self._schedule(0)

    def lost(self, session) -> None:
        """
        A warm session ended (it could not be made, or its shell or relay
        died while it waited, or the pool ended it): replace it.
        """
        if session in self._ending:
            self._ending.discard(session)
            return
        if session is self.making:
            self.making = None
            if not self._running:
                return
            if not self._failing:
                # Said once per outage, not once per retry.
                _log.warn("could not refill the warm pool of {name} (retrying every"
                          " {delay:g} s): {message}", name=self.name, delay=self.retry_delay,
                          message=session.core.message)
                self._failing = True
            self._schedule(self.retry_delay)
        elif session in self.ready:
            self.ready.remove(session)
            self._forget_age(session)
            _log.info("warm session {session_id} ended while it waited ({message}): replacing"
                      " it", session_id=session.id[:8], message=session.core.message)
            self._schedule(0)

    # -- inside --------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        """
        Make the next warm session after C{delay} seconds, if one is missing
        and none is being made or already due.
        """
        if not self._running or self._next is not None or self.making is not None:
            return
        if not self._wanted():
            return
        self._next = self._clock.callLater(delay, self._refill)

    def _wanted(self) -> bool:
        """
        Whether the pool wants one more warm session: it is under C{size},
        or under its C{target} with room for one more.
        """
        have = len(self.ready)
        if have < self.size:
            return True
        return have < self.target and (self._room is None or self._room())

    def _hold_back(self) -> float | None:
        """
        How long a refill due now waits (C{None}: not at all): while
        someone typed less than C{quiet} seconds ago, or clients' sessions
        are being made, for at most C{max_wait} seconds in all.
        """
        now = self._clock.seconds()
        waits = []
        if self._typed_at is not None:
            since = now - self._typed_at()
            if since < self.quiet:
                waits.append(self.quiet - since)
        if self._busy is not None and self._busy():
            waits.append(BUSY_RECHECK)
        if not waits:
            self._waiting_since = None
            return None
        if self._waiting_since is None:
            self._waiting_since = now
        left = self.max_wait - (now - self._waiting_since)
        if left <= 0:
            self._waiting_since = None
            return None
        return min(max(waits), left)

    def _refill(self) -> None:
        self._next = None
        if not self._running or self.making is not None or not self._wanted():
            return
        wait = self._hold_back()
        if wait is not None:
            self._next = self._clock.callLater(wait, self._refill)
            return
        if self._fits is not None and not self._fits():
            if not self._full:
                _log.info("the warm pool of {name} waits: no room in the memory budget",
                          name=self.name)
                self._full = True
            self._schedule(self.retry_delay)
            return
        self._full = False
        try:
            self.making = self._make()
            # Its outcome (went_live or lost) may be heard before this returns.
            self.making.events.prepare()
        except Exception:
            self.making = None
            _log.failure("making a warm session failed")
            self._schedule(self.retry_delay)

    def _forget_old_takes(self) -> None:
        since = self._clock.seconds() - self.window
        while self._takes and self._takes[0] <= since:
            self._takes.popleft()

    def _shrink_later(self) -> None:
        """
        Look again at what the pool wants once the oldest take of the
        window has left it.
        """
        if self._shrink_call is not None and self._shrink_call.active():
            return
        self._forget_old_takes()
        if self._takes:
            delay = max(0.0, self._takes[0] + self.window - self._clock.seconds())
        elif len(self.ready) > self.size:
            # The last takes left the window while the extra sessions were
            # being ended: what is left over goes now.
            delay = 0.0
        else:
            return
        self._shrink_call = self._clock.callLater(delay, self._shrink)

    def _shrink(self) -> None:
        """
        End the warm sessions beyond what the pool wants now, the oldest
        first.
        """
        if self._shrink_call is not None and self._shrink_call.active():
            self._shrink_call.cancel()
        self._shrink_call = None
        target = self.target
        if len(self.ready) > target:
            _log.info("the warm pool of {name} shrinks from {have} to {target}: fewer takes",
                      name=self.name, have=len(self.ready), target=target)
        while len(self.ready) > target:
            session = self.ready.popleft()
            self._forget_age(session)
            self._end(session, "the pool shrinks back as takes slowed down")
        if self._running:
            self._shrink_later()

    def _aged(self, session) -> None:
        self._too_old.pop(session, None)
        if session in self.ready:
            self.ready.remove(session)
            self._end(session, f"it is older than {self.max_age:g} s")
            self._schedule(0)

    def _forget_age(self, session) -> None:
        call = self._too_old.pop(session, None)
        if call is not None and call.active():
            call.cancel()

    def _end(self, session, why: str) -> None:
        _log.info("removing warm session {session_id}: {why}", session_id=session.id[:8],
                  why=why)
        self._ending.add(session)
        try:
            session.events.end(None, f"the warm session was removed: {why}")
        except Exception:
            _log.failure("ending warm session {session_id} failed", session_id=session.id[:8])


class WarmPools:
    """
    The warm pools of a server, one per profile that wants warm sessions,
    seen as one by what only counts or starts and stops them.
    """

    def __init__(self, pools: dict[str, WarmPool]) -> None:
        self.pools = pools

    def __getitem__(self, profile: str) -> WarmPool:
        return self.pools[profile]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pools.values())

    @property
    def target(self) -> int:
        """
        The warm sessions the pools want now (their size, or more while
        takes come fast).
        """
        return sum(p.target for p in self.pools.values())

    @property
    def ready(self) -> list:
        return [s for p in self.pools.values() for s in p.ready]

    @property
    def container_ids(self) -> set[str]:
        return {c for p in self.pools.values() for c in p.container_ids}

    @property
    def pending(self) -> set[str]:
        return {i for p in self.pools.values() for i in p.pending}

    @property
    def held(self) -> list:
        return [s for p in self.pools.values() for s in p.held]

    def take(self, profile: str):
        pool = self.pools.get(profile)
        return None if pool is None else pool.take()

    def holder(self, session):
        """
        The pool that holds C{session}, if any.
        """
        for pool in self.pools.values():
            if pool.holds(session):
                return pool
        return None

    def refill(self) -> None:
        for pool in self.pools.values():
            pool.refill()

    def give_up(self, excess: Callable[[], int]) -> int:
        """
        End ready warm sessions, of any pool, while C{excess()} (the bytes
        the live and warm sessions are over the memory budget) is more
        than 0; how many were ended.
        """
        ended = 0
        while excess() > 0 and any(p.give_up() for p in self.pools.values()):
            ended += 1
        return ended

    def start(self) -> None:
        for pool in self.pools.values():
            pool.start()

    def stop(self) -> Deferred:
        for pool in self.pools.values():
            pool.stop()
        return succeed(None)
