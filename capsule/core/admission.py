"""
Admission control: whether a new session may be made, and for whom.

Pure logic: it counts what the session manager holds and keeps a token
bucket per client address against an injected clock; it knows nothing of
Docker, the reactor or Autobahn.  A refusal is an L{AdmissionRefused} that
names the wire error code (C{quota_exceeded} when one client asks for more
than its share, C{server_full} when the server as a whole cannot take
another session).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Iterable

from capsule.core.addresses import Network, client_key
from capsule.core.profiles import DEFAULT_PROFILE

QUOTA_EXCEEDED = "quota_exceeded"
SERVER_FULL = "server_full"



class AdmissionRefused(Exception):
    """
    A new session is refused.

    @ivar code: the error code sent to the client.
    @ivar message: what the client is told.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_rate(text: str) -> tuple[int, float]:
    """
    Parse C{"COUNT/SECONDS"} (C{"10/60"}: ten per minute).

    @raise ValueError: if C{text} is not that, or either number is not
        more than 0.
    """
    count_text, sep, seconds_text = text.partition("/")
    if not sep:
        raise ValueError(f"not COUNT/SECONDS: {text!r}")
    count, seconds = int(count_text), float(seconds_text)
    if count <= 0 or not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"COUNT and SECONDS must be more than 0: {text!r}")
    return count, seconds


def parse_network(text: str) -> Network:
    """
    A CIDR (C{10.0.0.0/8}, C{::1/128}) or a single address.
    """
    return ipaddress.ip_network(text.strip(), strict=False)


class TokenBucket:
    """
    C{capacity} tokens, refilled at C{capacity / period} per second.
    """

    def __init__(self, capacity: int, period: float, now: float) -> None:
        self.capacity = capacity
        self.rate = capacity / period
        self._tokens = float(capacity)
        self._at = now

    def tokens(self, now: float) -> float:
        elapsed = max(0.0, now - self._at)
        return min(float(self.capacity), self._tokens + elapsed * self.rate)

    def full(self, now: float) -> bool:
        return self.tokens(now) >= self.capacity

    def retry_after(self, now: float) -> float:
        """
        Seconds until one token is there (0 if one is there now).
        """
        return max(0.0, (1.0 - self.tokens(now)) / self.rate)

    def take(self, now: float) -> bool:
        tokens = self.tokens(now)
        self._at = max(self._at, now)
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    def give_back(self, now: float) -> None:
        """
        Return a token taken (never past C{capacity}).
        """
        self._tokens = min(float(self.capacity), self.tokens(now) + 1.0)
        self._at = max(self._at, now)


@dataclass
class AdmissionPolicy:
    """
    @ivar max_sessions: sessions at once, in all.
    @ivar max_per_client: sessions at once created by one client address
        (an IPv6 client's /64: one client).
    @ivar rate: C{(count, seconds)}: sessions one client address (or IPv6
        /64) may create per C{seconds}, in bursts of up to C{count}; C{None}:
        no limit.
    @ivar session_memory: the memory limit of each container, in bytes.
    @ivar memory_budget: bytes the sum of the containers' memory limits may
        reach; C{None}: not known (yet), no check.
    @ivar max_per_user: sessions at once of one user; C{None}: no limit.
    """

    max_sessions: int = 32
    max_per_client: int = 8
    rate: tuple[int, float] | None = (10, 60.0)
    session_memory: int = 0
    memory_budget: int | None = None
    max_per_user: int | None = None


class AdmissionControl:
    """
    Decides on new sessions.  The session manager's C{sessions} dict is the
    truth about what lives: the creator of each session is remembered here
    by session id, and ids no longer in that dict are forgotten, so every
    count is derived from it.

    @param manager: has C{sessions} (a dict by id) and C{pool} (with
        C{ready} and C{pending}: warm containers, which hold memory too).
    @param trusted_proxies: the proxies whose C{X-Forwarded-For} names the
        client a session is counted against (read from a request by
        L{capsule.web.http.client_address}).
    """

    def __init__(self, manager, clock, policy: AdmissionPolicy,
                 trusted_proxies: Iterable[Network] = ()) -> None:
        self._manager = manager
        self._clock = clock
        self.policy = policy
        self.trusted_proxies = tuple(trusted_proxies)
        self._creators: dict[str, str] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def budget_is(self, memory: int) -> None:
        """
        The memory budget is C{memory} bytes from now on (the engine's
        memory, once it said it).
        """
        self.policy.memory_budget = memory

    def _prune(self, now: float) -> None:
        live = self._manager.sessions
        for session_id in [i for i in self._creators if i not in live]:
            del self._creators[session_id]
        # A full bucket is the same as none: it bounds the dict by the
        # clients of the last period.
        for address in [a for a, b in self._buckets.items() if b.full(now)]:
            del self._buckets[address]

    def sessions_of(self, address: str) -> int:
        """
        The live sessions created by the client C{address} counts as (the
        /64 of an IPv6 address, see L{client_key}).
        """
        live = self._manager.sessions
        client = client_key(address)
        return sum(1 for session_id, creator in self._creators.items()
                   if creator == client and session_id in live)

    def committed_memory(self) -> int:
        """
        Bytes promised to live sessions and warm containers.
        """
        pool = getattr(self._manager, "pool", None)
        warm = pool.held if pool is not None else []
        return sum(self._memory_of(s) for s in (*self._manager.sessions.values(), *warm))

    def _memory_of(self, session) -> int:
        # A session's profile says its memory limit; --memory for one without.
        settings = getattr(session, "settings", None)
        return settings.memory if settings is not None else self.policy.session_memory

    def admit(self, address: str, user: str | None = None, profile=None) -> None:
        """
        Check whether C{address} (acting for C{user}, if known) may create a
        session now, and if so, count it against its rate.

        @param profile: the L{capsule.core.profiles.Profile} of the session asked
            for (its memory limit counts against the budget), or C{None} for
            one of --memory.

        @raise AdmissionRefused: if not.
        """
        policy = self.policy
        now = self._clock.seconds()
        self._prune(now)
        # An IPv6 client picks its addresses from a /64: that is one client.
        address = client_key(address)
        if len(self._manager.sessions) >= policy.max_sessions:
            raise AdmissionRefused(
                SERVER_FULL, f"the server is full ({policy.max_sessions} sessions):"
                " try again later")
        if self.sessions_of(address) >= policy.max_per_client:
            raise AdmissionRefused(
                QUOTA_EXCEEDED, f"too many sessions from {address} (at most"
                f" {policy.max_per_client} at once): end one first")
        if (user is not None and policy.max_per_user is not None
                and len(self._manager.of_user(user)) >= policy.max_per_user):
            raise AdmissionRefused(
                QUOTA_EXCEEDED, f"{user} has too many sessions (at most"
                f" {policy.max_per_user} at once): end one first")
        if policy.memory_budget is not None:
            pool = getattr(self._manager, "pool", None)
            # A warm session of that profile is already counted; a cold start
            # adds one.
            if profile is None:
                profile = getattr(self._manager, "profiles", {}).get(DEFAULT_PROFILE)
            name = profile.name if profile is not None else None
            warm = pool is not None and any(
                getattr(getattr(s, "settings", None), "name", None) == name for s in pool.ready)
            extra = 0 if warm else (
                profile.memory if profile is not None else policy.session_memory)
            if self.committed_memory() + extra > policy.memory_budget:
                raise AdmissionRefused(
                    SERVER_FULL, "the server is full (its memory is promised to other"
                    " sessions): try again later")
        if policy.rate is not None:
            bucket = self._buckets.get(address)
            if bucket is None:
                bucket = self._buckets[address] = TokenBucket(*policy.rate, now)
            if not bucket.take(now):
                count, seconds = policy.rate
                raise AdmissionRefused(
                    QUOTA_EXCEEDED, f"too many new sessions from {address} (at most"
                    f" {count} per {seconds:g} s): try again in"
                    f" {math.ceil(bucket.retry_after(now))} s")

    def created(self, session_id: str, address: str) -> None:
        """
        The session C{session_id} was made for C{address}.
        """
        self._creators[session_id] = client_key(address)
