"""
Admission control: whether a new session may be made, and for whom.

Pure logic: it counts what the session manager holds and keeps a token
bucket per client address against an injected clock; it knows nothing of
Docker, the reactor or Autobahn.  A refusal is an L{AdmissionRefused} that
names the wire error code (C{quota_exceeded} when one client asks for more
than its share, C{server_full} when the server as a whole cannot take
another session: its count, its memory budget, or the host's memory under
its reserve, see L{capsule.core.memory}).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Iterable

from capsule.core.addresses import Network, client_key
from capsule.core.memory import MemoryBudget
from capsule.core.profiles import DEFAULT_PROFILE

QUOTA_EXCEEDED = "quota_exceeded"
SERVER_FULL = "server_full"
# The cluster's ResourceQuota refused a session's pod (--engine kubernetes).
CLUSTER_FULL = "cluster_full"



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
    @ivar max_per_user: sessions at once of one user; C{None}: no limit.
    @ivar max_removing: ended sessions' containers the engine may still be
        removing: past it, no new session until it catches up.
    """

    max_sessions: int = 32
    max_per_client: int = 8
    rate: tuple[int, float] | None = (10, 60.0)
    max_per_user: int | None = None
    max_removing: int = 32


class AdmissionControl:
    """
    Decides on new sessions.  The session manager's C{sessions} dict is the
    truth about what lives: the creator of each session is remembered here
    by session id, and ids no longer in that dict are forgotten, so every
    count is derived from it.

    @param manager: has C{sessions} (a dict by id) and C{pool} (with
        C{ready}: warm sessions, which a new session of their profile takes).
    @param memory: the memory accounting (L{MemoryBudget}): what sessions
        are counted at, against the budget and the host's reserve;
        C{None}: memory is not checked.
    @param trusted_proxies: the proxies whose C{X-Forwarded-For} names the
        client a session is counted against (read from a request by
        L{capsule.web.http.client_address}).
    """

    def __init__(self, manager, clock, policy: AdmissionPolicy,
                 trusted_proxies: Iterable[Network] = (),
                 memory: MemoryBudget | None = None) -> None:
        self._manager = manager
        self._clock = clock
        self.policy = policy
        self.memory = memory
        self.trusted_proxies = tuple(trusted_proxies)
        self._creators: dict[str, str] = {}
        self._buckets: dict[str, TokenBucket] = {}

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
        Bytes counted for live sessions (at their requests or measured use)
        and warm ones (at their requests).
        """
        if self.memory is None:
            return 0
        pool = getattr(self._manager, "pool", None)
        return (self.memory.live(self._manager.sessions.values())
                + self.memory.warm(pool.held if pool is not None else []))

    def admit(self, address: str, user: str | None = None, profile=None) -> None:
        """
        Check whether C{address} (acting for C{user}, if known) may create a
        session now, and if so, count it against its rate.

        @param profile: the L{capsule.core.profiles.Profile} of the session asked
            for (its memory request counts against the budget), or C{None}
            for the default profile's.

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
        removing = getattr(self._manager, "removing", 0)
        if removing >= policy.max_removing:
            raise AdmissionRefused(
                SERVER_FULL, f"the server is busy: the engine is still removing {removing}"
                " containers of ended sessions; try again in a few seconds")
        if self.sessions_of(address) >= policy.max_per_client:
            raise AdmissionRefused(
                QUOTA_EXCEEDED, f"too many sessions from {address} (at most"
                f" {policy.max_per_client} at once): end one first")
        if (user is not None and policy.max_per_user is not None
                and len(self._manager.of_user(user)) >= policy.max_per_user):
            raise AdmissionRefused(
                QUOTA_EXCEEDED, f"{user} has too many sessions (at most"
                f" {policy.max_per_user} at once): end one first")
        if self.memory is not None:
            if profile is None:
                profile = getattr(self._manager, "profiles", {}).get(DEFAULT_PROFILE)
            # Against the live sessions only: warm ones give way to it
            # (taken, or given up, see MemoryBudget.excess).
            why = self.memory.refusal(self._manager.sessions.values(),
                                      self.memory.request_of(profile))
            if why is not None:
                raise AdmissionRefused(SERVER_FULL, why)
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
