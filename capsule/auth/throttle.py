"""
Logins are limited in two ways, per client address and per user name:

 - failed logins cost a token of a bucket (one per address, one per user
   name).  The token is taken when an attempt starts, before any password
   is checked, and given back when the attempt turns out right, so that
   guesses sent at once are counted as they come in, not once they are
   checked;
 - attempts in flight (a password being checked on the bcrypt threads) are
   capped per address, per user name and in all, so that a burst from one
   address never queues more than a few checks ahead of anybody else's.

An empty bucket, or a full cap, refuses an attempt before any password is
checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from twisted.logger import Logger

from capsule.auth.users import printable
from capsule.core.admission import TokenBucket

_log = Logger()

# Failed logins: per client address, per user name (COUNT, SECONDS).
FAILURES_PER_ADDRESS = (10, 60.0)
FAILURES_PER_USER = (5, 60.0)
# Attempts being checked at once: per client address, per user name, in all.
# bcrypt runs on capsule.auth.checkers.AuthThreadPool's two threads: at most
# IN_FLIGHT_TOTAL checks wait there, a few per address.
IN_FLIGHT_PER_ADDRESS = 2
IN_FLIGHT_PER_USER = 2
IN_FLIGHT_TOTAL = 8
# A refused address is logged at most once per this many seconds (with the
# count of the refusals not logged).
LOG_INTERVAL = 60.0


class LoginThrottled(Exception):
    """
    Too many failed logins: C{retry_after} seconds (at least 1) until the
    next may be tried.
    """

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(message or
                         f"too many failed logins: try again in {math.ceil(retry_after)} s")


class LoginsBusy(LoginThrottled):
    """
    Too many attempts of this address or user (or in all) are being checked
    right now.
    """

    def __init__(self) -> None:
        super().__init__(1, "too many logins at once: try again in 1 s")


@dataclass
class Attempt:
    """
    A login being tried: its tokens are taken, it counts as in flight until
    L{LoginLimiter.done}.
    """

    address: str
    user: str | None
    keys: list = field(default_factory=list)
    over: bool = False


class LoginLimiter:
    """
    Token buckets of failed logins and counts of attempts in flight, per
    client address and per user name, on an injected clock.
    """

    def __init__(self, clock, per_address=FAILURES_PER_ADDRESS,
                 per_user=FAILURES_PER_USER, in_flight=(IN_FLIGHT_PER_ADDRESS,
                                                        IN_FLIGHT_PER_USER, IN_FLIGHT_TOTAL)
                 ) -> None:
        self._clock = clock
        self._rates = {"address": per_address, "user": per_user}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._caps = {"address": in_flight[0], "user": in_flight[1]}
        self._total_cap = in_flight[2]
        self._in_flight: dict[tuple[str, str], int] = {}
        self.in_flight = 0
        self._quiet = Quiet(clock)

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]

    def retry_after(self, address: str, user: str | None) -> float:
        """
        Seconds until a login of C{user} from C{address} may be tried (0: now).
        """
        now = self._clock.seconds()
        wait = 0.0
        for key in self._keys(address, user):
            bucket = self._buckets.get(key)
            if bucket is not None and bucket.tokens(now) < 1.0:
                wait = max(wait, bucket.retry_after(now))
        return wait

    def begin(self, address: str, user: str | None) -> Attempt:
        """
        Start an attempt: take a token of each bucket and count it in
        flight; or raise L{LoginThrottled} (a bucket is empty) or
        L{LoginsBusy} (a cap of attempts in flight is full), taking nothing.
        L{done} must follow.
        """
        keys = self._keys(address, user)
        wait = self.retry_after(address, user)
        if wait > 0:
            self._refused(address, user, "too many failed logins")
            raise LoginThrottled(wait)
        if self.in_flight >= self._total_cap or any(
                self._in_flight.get(k, 0) >= self._caps[k[0]] for k in keys):
            self._refused(address, user, "too many logins at once")
            raise LoginsBusy()
        now = self._clock.seconds()
        self._prune(now)
        for key in keys:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(*self._rates[key[0]], now)
            bucket.take(now)
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        self.in_flight += 1
        return Attempt(address, user, keys)

    def done(self, attempt: Attempt, right: bool) -> None:
        """
        The attempt is over: a right one gives its tokens back (only failed
        logins cost one); a wrong one keeps them taken.
        """
        if attempt.over:
            return
        attempt.over = True
        self.in_flight -= 1
        now = self._clock.seconds()
        for key in attempt.keys:
            left = self._in_flight.get(key, 0) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
            bucket = self._buckets.get(key)
            if right and bucket is not None:
                bucket.give_back(now)

    def _refused(self, address: str, user: str | None, why: str) -> None:
        self._quiet.info(address, "refused a login of {user} from {address}: {why}",
                         user=printable(user) if user else "(token)", address=address, why=why)

    def _keys(self, address, user):
        keys = [("address", address)]
        if user:
            keys.append(("user", user[:64]))
        return keys


class Quiet:
    """
    Log lines an attacker can repeat at will, at most one per key (say, a
    client address) per C{interval} seconds; the next line after that says
    how many were not written.
    """

    def __init__(self, clock, interval: float = LOG_INTERVAL, keys: int = 4096) -> None:
        self._clock = clock
        self._interval = interval
        self._keys = keys
        # key -> [when last logged, lines not logged since]
        self._seen: dict[str, list] = {}

    def info(self, key: str, format: str, **fields) -> None:
        self._emit(_log.info, key, format, fields)

    def warn(self, key: str, format: str, **fields) -> None:
        self._emit(_log.warn, key, format, fields)

    def _emit(self, method, key: str, format: str, fields: dict) -> None:
        now = self._clock.seconds()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._interval:
            seen[1] += 1
            return
        if seen is not None and seen[1]:
            format += " ({more} more like it in the last {seconds:.0f} s)"
            fields = dict(fields, more=seen[1], seconds=now - seen[0])
        if len(self._seen) >= self._keys:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._interval}
        self._seen[key] = [now, 0]
        method(format, **fields)
