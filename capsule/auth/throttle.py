"""
Failed logins cost a token of two buckets, one per client address and one
per user name; an empty bucket refuses a login before any password is
checked.
"""

from __future__ import annotations

import math

from capsule.core.admission import TokenBucket

# Failed logins: per client address, per user name (COUNT, SECONDS).
FAILURES_PER_ADDRESS = (10, 60.0)
FAILURES_PER_USER = (5, 60.0)


class LoginLimiter:
    """
    Token buckets of failed logins, per client address and per user name,
    on an injected clock.  A login is not even tried while either bucket
    is empty.
    """

    def __init__(self, clock, per_address=FAILURES_PER_ADDRESS,
                 per_user=FAILURES_PER_USER) -> None:
        self._clock = clock
        self._rates = {"address": per_address, "user": per_user}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

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

    def failed(self, address: str, user: str | None) -> None:
        now = self._clock.seconds()
        self._prune(now)
        for key in self._keys(address, user):
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(*self._rates[key[0]], now)
            bucket.take(now)

    def _keys(self, address, user):
        keys = [("address", address)]
        if user:
            keys.append(("user", user[:64]))
        return keys


class LoginThrottled(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins: try again in {math.ceil(retry_after)} s")
        self.retry_after = max(1, math.ceil(retry_after))
