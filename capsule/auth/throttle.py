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
        # address -> [when last logged, refusals not logged since]
        self._told: dict[str, list] = {}

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
        now = self._clock.seconds()
        told = self._told.get(address)
        if told is not None and now - told[0] < LOG_INTERVAL:
            told[1] += 1
            return
        more = told[1] if told is not None else 0
        if len(self._told) > 4096:
            self._told = {a: t for a, t in self._told.items() if now - t[0] < LOG_INTERVAL}
        self._told[address] = [now, 0]
        _log.info("refused a login of {user} from {address}: {why}{more}",
                  user=printable(user) if user else "(token)", address=address, why=why,
                  more=f" (and {more} more refusals of that address in the last"
                       f" {now - told[0]:.0f} s)" if more else "")

    def _keys(self, address, user):
        keys = [("address", address)]
        if user:
            keys.append(("user", user[:64]))
        return keys
