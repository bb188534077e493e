"""
What sessions use of Anthropic's API through the credential gateway:
requests and tokens, per user and per session, read from the answers'
C{usage} fields as they stream by (L{UsageReader}); an optional per-user
budget of tokens per UTC day (C{--anthropic-budget}).

Tokens counted: C{input_tokens}, C{output_tokens}, C{cache_creation_input_tokens}
and C{cache_read_input_tokens}, as the API reports them; the budget counts
all four (what was sent to the model and what it wrote).

In C{/metrics} the counts are by user (C{user=""} without users), never by
session: sessions come and go by the thousand, users stay.  Per session they
are in the admin API (C{GET /api/admin/usage}), for the live sessions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from capsule.sessions.observers import SessionObserver

# The kinds of tokens, as the API's usage fields name them.
TOKEN_KINDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
               "cache_read_input_tokens")
# A line of a server-sent event stream longer than this is not read for usage
# (it is passed on all the same).
MAX_EVENT_LINE = 1024 * 1024
# A JSON answer longer than this is not read for usage.
MAX_JSON_ANSWER = 8 * 1024 * 1024
# What a count may be (a usage field larger than this is not believed).
MAX_COUNT = 10 ** 12


def _count(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        return value
    return 0


class UsageReader:
    """
    Reads the usage of one answer from its body as it passes, holding at
    most one line of an event stream (or a JSON answer up to
    L{MAX_JSON_ANSWER}), never the stream.

    @ivar tokens: the counts by kind (L{TOKEN_KINDS}) seen so far.
    """

    def __init__(self, content_type: str | None) -> None:
        kind = (content_type or "").split(";", 1)[0].strip().lower()
        self._stream = kind == "text/event-stream"
        self._json = kind == "application/json"
        self._buffer = bytearray()
        self._skipping = False
        self.tokens = dict.fromkeys(TOKEN_KINDS, 0)

    def feed(self, data: bytes) -> None:
        if self._stream:
            self._feed_stream(data)
        elif self._json:
            if len(self._buffer) + len(data) > MAX_JSON_ANSWER:
                self._json = False
                self._buffer = bytearray()
            else:
                self._buffer += data

    def _feed_stream(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                if not self._skipping:
                    self._buffer += data[start:]
                    if len(self._buffer) > MAX_EVENT_LINE:
                        self._buffer = bytearray()
                        self._skipping = True
                return
            if self._skipping:
                self._skipping = False
            else:
                self._buffer += data[start:end]
                self._line(bytes(self._buffer))
            self._buffer = bytearray()
            start = end + 1

    def _line(self, line: bytes) -> None:
        # Only the events that carry usage are parsed (the many deltas are
        # not).
        if not line.startswith(b"data:") or (b"message_start" not in line
                                              and b"message_delta" not in line):
            return
        try:
            event = json.loads(line[5:].strip())
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
        elif kind == "message_delta":
            usage = event.get("usage")
        else:
            return
        self._usage(usage)

    def _usage(self, usage) -> None:
        # Counts in message_delta are cumulative: the latest is the answer's.
        if isinstance(usage, dict):
            for name in TOKEN_KINDS:
                if name in usage:
                    self.tokens[name] = max(self.tokens[name], _count(usage[name]))

    def finish(self) -> dict[str, int]:
        """
        The answer is over: its counts.
        """
        if self._stream and self._buffer and not self._skipping:
            self._line(bytes(self._buffer))
        elif self._json and self._buffer:
            try:
                answer = json.loads(bytes(self._buffer))
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                self._usage(answer.get("usage"))
        self._buffer = bytearray()
        return self.tokens


@dataclass
class Counts:
    requests: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_KINDS, 0))

    def add(self, tokens: dict[str, int]) -> None:
        for name in TOKEN_KINDS:
            self.tokens[name] += tokens.get(name, 0)

    def describe(self) -> dict:
        return {"requests": self.requests, **self.tokens,
                "tokens": sum(self.tokens.values())}


def _day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


class Usage(SessionObserver):
    """
    The gateway's counts, per user and per live session, and the budget.

    @param clock: what tells the time (the budget's day is UTC's).
    @param budget: tokens one user may use per UTC day (C{None}: no limit).
    """

    def __init__(self, clock, budget: int | None = None) -> None:
        self._clock = clock
        self.budget = budget
        self.users: dict[str, Counts] = {}
        self.sessions: dict[str, tuple[str, Counts]] = {}
        self._day = _day(clock.seconds())
        self._today: dict[str, int] = {}
        self.refusals: dict[str, int] = {}

    @staticmethod
    def _user(user: str | None) -> str:
        return user or ""

    def _roll(self) -> None:
        day = _day(self._clock.seconds())
        if day != self._day:
            self._day, self._today = day, {}

    def spent_today(self, user: str | None) -> int:
        self._roll()
        return self._today.get(self._user(user), 0)

    def refusal(self, user: str | None) -> str | None:
        """
        Why C{user} may make no more requests today, or C{None}.
        """
        if self.budget is None:
            return None
        spent = self.spent_today(user)
        if spent < self.budget:
            return None
        return (f"the token budget of {self.budget} tokens per day"
                f" {'for user ' + user if user else 'of this server'} is spent ({spent} used"
                f" today, UTC); it renews at midnight UTC, or an operator raises"
                f" --anthropic-budget")

    def requested(self, user: str | None, session_id: str) -> None:
        user = self._user(user)
        self.users.setdefault(user, Counts()).requests += 1
        self.sessions.setdefault(session_id, (user, Counts()))[1].requests += 1

    def used(self, user: str | None, session_id: str, tokens: dict[str, int]) -> None:
        user = self._user(user)
        self._roll()
        self.users.setdefault(user, Counts()).add(tokens)
        entry = self.sessions.get(session_id)
        if entry is not None:
            # (An answer that ends after its session did counts for its
            # user only: the session is gone from the list.)
            entry[1].add(tokens)
        self._today[user] = self._today.get(user, 0) + sum(tokens.get(n, 0) for n in TOKEN_KINDS)

    def refused(self, code: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1

    def describe(self) -> dict:
        """
        For the admin API: per user (with what they used today) and per live
        session.
        """
        self._roll()
        return {
            "budget": self.budget, "day": self._day,
            "users": {user or "": {**counts.describe(), "today": self._today.get(user, 0)}
                      for user, counts in sorted(self.users.items())},
            "sessions": {session_id: {"user": user or None, **counts.describe()}
                         for session_id, (user, counts) in sorted(self.sessions.items())},
            "refusals": dict(sorted(self.refusals.items())),
        }

    # (ISessionObserver)

    def session_ended(self, session) -> None:
        self.sessions.pop(session.id, None)

    # (for L{UsageCollector})

    def collect(self):
        requests = CounterMetricFamily(
            "capsule_anthropic_requests", "Requests sessions made to Anthropic's API through"
            " the credential gateway, by user.", labels=["user"])
        tokens = CounterMetricFamily(
            "capsule_anthropic_tokens", "Tokens of Anthropic's answers to sessions (their usage"
            " fields), by user and kind.", labels=["user", "kind"])
        refusals = CounterMetricFamily(
            "capsule_anthropic_refusals", "Requests the credential gateway refused, by code.",
            labels=["code"])
        today = GaugeMetricFamily(
            "capsule_anthropic_tokens_today", "Tokens used today (UTC) by user: what"
            " --anthropic-budget counts.", labels=["user"])
        self._roll()
        for user, counts in self.users.items():
            requests.add_metric([user], counts.requests)
            for name in TOKEN_KINDS:
                tokens.add_metric([user, name.removesuffix("_tokens")], counts.tokens[name])
            today.add_metric([user], self._today.get(user, 0))
        for code, count in self.refusals.items():
            refusals.add_metric([code], count)
        return [requests, tokens, refusals, today]


class UsageCollector:
    """
    L{Usage} as a Prometheus collector (for C{Metrics.registry}).
    """

    def __init__(self, usage: Usage) -> None:
        self._usage = usage

    def describe(self):
        return []

    def collect(self):
        return self._usage.collect()
