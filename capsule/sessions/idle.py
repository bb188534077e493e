"""
Idle means idle: a session is idle only when, for its profile's
C{idle_timeout} (C{--idle-timeout} where the profile does not say; 0: no
limit), nobody typed into it, it printed nothing, I{and} its container used
no CPU beyond a small threshold.  An agent thinking, a build, a loop that
prints nothing: none of them is idle, whatever the client does.

The CPU is read (L{IDockerAPI.container_cpu}, on the engine's thread pool)
only for sessions that are otherwise candidates: once a session has been
without input and output for a sample interval (its limit / 4, at most
C{idle-cpu-interval} seconds), and then once each interval, so that a busy
session costs nothing.  The first reading is a baseline: CPU use in the
interval before it is not seen.  Where the engine cannot say
(C{container_cpu} fires C{None}) a session is judged on its input and output
alone, as before; a reading that fails is tried again one interval later,
and the session is not idled before readings cover its limit (never on a
guess).

What happens to an idle session: where its profile's retention is more than
0 it is put away (L{capsule.sessions.keeping}: its container stopped, its
file system kept, to be resumed), else it ends as it always did.  Its client,
if one is attached, is told why.

L{IdlePolicy} decides (pure: times and counters in, decisions out, testable
with a clock); L{IdleService} runs it on the reactor and acts.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.application.internet import TimerService
from twisted.logger import Logger

from capsule.core.kept import IDLE
from capsule.core.profiles import DEFAULT_PROFILE
from capsule.sessions.keeping import when

_log = Logger()

# What L{IdlePolicy.step} asks of its caller.
NOTHING = "nothing"     # not a candidate, or nothing to do yet
SAMPLE = "sample"       # read its container's CPU and hand it to sampled()
IS_IDLE = "idle"        # it is idle: put it away, or end it

# Seconds between two warnings that a session's CPU could not be read.
WARN_EVERY = 600.0

# The notice code an attached client is sent before its idle session is put
# away (one that ends gets the end's message as ever).
IDLE_NOTICE = "idle"


@dataclass
class _Watch:
    """
    What is known of one candidate since its last input or output.
    """

    since: float                    # its last input or output, when the watch began
    sampled_at: float | None = None  # the last CPU reading
    cpu: float | None = None        # its value (CPU seconds since the container started)
    asked_at: float | None = None   # when its first reading was asked for
    baseline_at: float | None = None  # the first reading of a continuous series
    busy_at: float | None = None    # the last reading that showed CPU use
    pending: bool = False           # a reading is under way
    blind: bool = False             # the engine cannot say its CPU use
    done: bool = False              # found idle: acted on, not again
    failed_at: float | None = None  # the last reading that failed


class IdlePolicy:
    """
    Which sessions to sample and which are idle.

    @ivar sample_every: the most seconds between two CPU readings of a
        candidate (a short limit samples more often: a quarter of it).
    @ivar threshold: the CPU, in seconds per second (a fraction of one
        CPU), a container may use between two readings and still be idle
        (its keeper and an idle shell use far less).
    """

    def __init__(self, sample_every: float = 30.0, threshold: float = 0.02) -> None:
        self.sample_every = sample_every
        self.threshold = threshold
        self._watches: dict[str, _Watch] = {}

    def interval(self, limit: float) -> float:
        """
        Seconds between two CPU readings of a session whose limit is
        C{limit}.
        """
        return min(self.sample_every, limit / 4)

    def step(self, key: str, limit: float, active_at: float, now: float) -> str:
        """
        What to do about the session C{key} whose idle limit is C{limit}
        (0: none) and whose last input or output was at C{active_at}:
        L{NOTHING}, L{SAMPLE} (then call L{sampled} or L{failed}) or
        L{IS_IDLE}.
        """
        every = self.interval(limit) if limit > 0 else 0.0
        if limit <= 0 or now - active_at < every:
            # No limit, or busy typing or printing: nothing is read.
            self._watches.pop(key, None)
            return NOTHING
        watch = self._watches.get(key)
        if watch is None or watch.since != active_at:
            watch = self._watches[key] = _Watch(since=active_at)
        if watch.pending or watch.done:
            return NOTHING
        if watch.failed_at is not None and now - watch.failed_at < every:
            return NOTHING
        if watch.sampled_at is None:
            if watch.asked_at is None:
                watch.asked_at = now
            return self._sample(watch)
        quiet_since = max(active_at, watch.busy_at if watch.busy_at is not None else active_at)
        # Its CPU is watched from its first reading: what it used in the
        # interval before is not seen.  Readings that failed, or a counter
        # that went back (a new baseline), leave more unseen: its limit
        # then counts from the baseline, less that first interval.
        watched_from = max(quiet_since, watch.baseline_at or quiet_since)
        unseen = (watch.asked_at or active_at) - active_at
        due = max(quiet_since + limit, watched_from + limit - unseen)
        if now >= due:
            if watch.blind or watch.sampled_at >= due:
                watch.done = True
                return IS_IDLE
            # Quiet for long enough, unless it used CPU since the last reading.
            return self._sample(watch)
        if now - watch.sampled_at >= every and not watch.blind:
            return self._sample(watch)
        return NOTHING

    @staticmethod
    def _sample(watch: _Watch) -> str:
        watch.pending = True
        return SAMPLE

    def sampled(self, key: str, now: float, cpu: float | None) -> bool:
        """
        The CPU time C{key}'s container used since it started, read at
        C{now} (C{None}: the engine cannot say).  Return whether it used CPU
        since the reading before.
        """
        watch = self._watches.get(key)
        if watch is None:
            return False
        watch.pending = False
        watch.failed_at = None
        busy = False
        if cpu is None:
            watch.blind = True
        elif watch.cpu is None or cpu < watch.cpu:
            # The first reading, or a counter that went back (its container
            # restarted): a new baseline.
            watch.baseline_at = now
        else:
            elapsed = max(now - watch.sampled_at, 1e-6)
            if cpu - watch.cpu > self.threshold * elapsed:
                watch.busy_at = now
                busy = True
        watch.cpu, watch.sampled_at = cpu, now
        return busy

    def failed(self, key: str, now: float) -> None:
        """
        Reading C{key}'s CPU at C{now} failed: it is read again one interval
        later (and not found idle before a reading covers its limit).
        """
        watch = self._watches.get(key)
        if watch is not None:
            watch.pending = False
            watch.failed_at = now

    def forget(self, key: str) -> None:
        """
        Drop what is known of C{key} (it ended, or what was done about it
        failed and it starts over).
        """
        self._watches.pop(key, None)

    def start_over(self, key: str, now: float) -> None:
        """
        What was done about idle C{key} failed: it counts as busy at
        C{now}, so it is found idle again one full limit later at the
        earliest.
        """
        watch = self._watches.get(key)
        if watch is not None:
            self._watches[key] = _Watch(since=watch.since, busy_at=now)

    def keep_only(self, keys) -> None:
        """
        Drop what is known of every session not in C{keys}.
        """
        keys = set(keys)
        for key in [k for k in self._watches if k not in keys]:
            del self._watches[key]

    def watched(self) -> int:
        """
        How many sessions are candidates now.
        """
        return len(self._watches)


def idle_limit(session, default: float) -> tuple[float, str]:
    """
    The idle limit of C{session} in seconds (its profile's, else
    C{default}: --idle-timeout), and where it comes from, as its client is
    told.
    """
    settings = getattr(session, "settings", None)
    if settings is None:
        return default, "--idle-timeout"
    if settings.name == DEFAULT_PROFILE and settings.idle_timeout == default:
        return default, "--idle-timeout"
    return settings.idle_timeout, f"the idle_timeout of profile {settings.name}"


def duration(seconds: float) -> str:
    """
    C{seconds} as a person reads it: "45 s", "30 minutes", "24 hours".
    """
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 3 * 3600:
        return f"{round(seconds / 60, 1):g} minutes"
    return f"{round(seconds / 3600, 1):g} hours"


def idle_message(limit: float, where: str, kept_until: float | None) -> str:
    """
    The sentence an idle session's client is told: put away (kept until
    C{kept_until}), or ended.
    """
    what = (f"the session was idle (no input, no output and no CPU use) for"
            f" {duration(limit)} ({where})")
    if kept_until is None:
        return f"{what}: it ended"
    return f"{what}: it was put away, and is kept until {when(kept_until)}; resume it to go on"


class IdleService(TimerService):
    """
    Every C{interval} seconds, look at each settled session: read the CPU of
    the candidates that are due, and put away (or end) those that are idle.
    """

    def __init__(self, manager, clock, interval: float, docker,
                 policy: IdlePolicy | None = None, keeping=None) -> None:
        super().__init__(interval, self.check)
        self.clock = clock
        self.policy = policy if policy is not None else IdlePolicy()
        self._manager = manager
        self._docker = docker
        self._keeping = keeping
        self._warned_at: float | None = None

    def _keeping_of(self):
        # The manager's (capsule.sessions.keeping), unless a test gave one.
        return self._keeping if self._keeping is not None else self._manager.keeping

    def check(self) -> list:
        """
        One look at every session; return those found idle now (their
        outcome is under way).  Never raises: a raise would stop the timer.
        """
        try:
            return self._check()
        except Exception:
            _log.failure("could not work out which sessions are idle")
            return []

    def _check(self) -> list:
        manager = self._manager
        default = manager.config.idle_timeout
        now = self.clock.seconds()
        sessions = list(manager.sessions.values())
        self.policy.keep_only(s.id for s in sessions)
        found = []
        for session in sessions:
            if self._consider(session, default, now):
                found.append(session)
        return found

    def _consider(self, session, default: float, now: float, read: bool = True) -> bool:
        """
        Step the policy for C{session}, and act (reading its CPU only where
        C{read}); return whether it was found idle.
        """
        if not session.state.settled:
            # Starting, waiting for the engine, ending: left alone.
            self.policy.forget(session.id)
            return False
        limit, where = idle_limit(session, default)
        action = self.policy.step(session.id, limit, session.core.active_at, now)
        if action == SAMPLE:
            if read:
                return self._sample(session, default)
            # (Not reached: a reading just made never asks for another.)
            self.policy.failed(session.id, now)
            return False
        if action == IS_IDLE:
            self._outcome(session, limit, where)
            return True
        return False

    def _sample(self, session, default: float) -> bool:
        """
        Read C{session}'s CPU; once read, step the policy again at once (a
        reading at its limit may find it idle).  Return whether it was found
        idle already (the fake engine answers at once).
        """
        container_id = session.container_id
        if not container_id:
            self.policy.failed(session.id, self.clock.seconds())
            return False
        try:
            reading = self._docker.container_cpu(container_id)
        except Exception as e:
            self._read_failed(session, e)
            return False
        idle = []

        def read(cpu):
            now = self.clock.seconds()
            if self.policy.sampled(session.id, now, cpu):
                _log.debug("session {session_id} uses CPU: not idle",
                           session_id=session.id[:8])
            if self._manager.sessions.get(session.id) is session:
                idle.append(self._consider(session, default, now, read=False))

        def failed(failure):
            self._read_failed(session, failure.value)

        reading.addCallbacks(read, failed).addErrback(
            lambda f: _log.failure("judging session {session_id} idle failed", f,
                                   session_id=session.id[:8]))
        return bool(idle and idle[0])

    def _read_failed(self, session, error) -> None:
        now = self.clock.seconds()
        self.policy.failed(session.id, now)
        # At most every ten minutes: the engine being away is reported elsewhere.
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            _log.warn("reading the CPU use of session {session_id} failed ({error}); it is"
                      " not idled until it can be read", session_id=session.id[:8],
                      error=str(error) or type(error).__name__)

    def _outcome(self, session, limit: float, where: str) -> None:
        keeping = self._keeping_of()
        settings = session.settings or self._manager.profiles[DEFAULT_PROFILE]
        retention = 0.0
        try:
            retention = keeping.retention_of(settings)
        except Exception:
            _log.failure("the retention of session {session_id} is not known; it ends",
                         session_id=session.id[:8])
        if retention > 0:
            self._put_away(session, keeping, limit, where, retention)
        else:
            self._end(session, idle_message(limit, where, None))

    def _put_away(self, session, keeping, limit, where, retention) -> None:
        message = idle_message(limit, where, self.clock.seconds() + retention)
        _log.info("putting session {session_id} away: {message}", session_id=session.id[:8],
                  message=message)
        client = session.client
        if client is not None:
            try:
                client.session_notice(IDLE_NOTICE, message)
            except Exception:
                _log.failure("telling session {session_id} it is idle failed",
                             session_id=session.id[:8])

        def failed(failure):
            _log.failure("putting idle session {session_id} away failed; it stays",
                         failure, session_id=session.id[:8])
            # It starts over: found idle again after another full limit.
            self.policy.start_over(session.id, self.clock.seconds())

        try:
            d = keeping.put_away(session, IDLE)
        except Exception:
            _log.failure("putting idle session {session_id} away failed; it stays",
                         session_id=session.id[:8])
            self.policy.start_over(session.id, self.clock.seconds())
            return
        d.addErrback(failed)

    def _end(self, session, message: str) -> None:
        _log.info("ending session {session_id}: {message}", session_id=session.id[:8],
                  message=message)
        try:
            self._manager.end(session, message)
        except Exception:
            _log.failure("ending session {session_id} failed", session_id=session.id[:8])
