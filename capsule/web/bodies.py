"""
Request bodies, decided from their headers: what the site may hold of them
at once (L{BodyBudget}: bytes across all requests, bodies being received
per client address), the refusal of one (L{BodyRefused}), and its log,
bounded where a client can repeat it (L{RefusalLog}).

A body is refused before capsule reads it: its answer is written from the
headers (L{capsule.web.site.LimitedRequest}), and nothing of it is kept.
"""

from __future__ import annotations

from twisted.logger import Logger

_log = Logger()

# --spool-max-bytes, unless given: twice --upload-max-bytes, and at least this.
SPOOL_MIN_BYTES = 256 * 1024 * 1024
# Bodies one client address may be sending at once (tuning: bodies-per-address).
BODIES_PER_ADDRESS = 8
# Refusals logged in a window of this many seconds; the rest are counted,
# and their number logged with the next line after the window.
REFUSAL_LOG_LINES = 20
REFUSAL_LOG_WINDOW = 60.0


class BodyRefused(Exception):
    """
    A body capsule does not read: answered with C{status} and
    C{{"error": message, "code": code, **extra}}, plus C{headers}.
    """

    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None,
                 headers: dict[bytes, bytes] | None = None, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.retry_after = retry_after
        self.headers = headers or {}
        self.extra = extra


def default_spool(upload_max_bytes: int) -> int:
    """
    The spool budget when the operator gives none.
    """
    return max(SPOOL_MIN_BYTES, 2 * upload_max_bytes)


class BodyBudget:
    """
    What request bodies may take at once: C{max_bytes} of them held (in
    memory and in temporary files, from their headers until their request
    ends), and C{per_address} bodies being received from one client address.
    """

    def __init__(self, max_bytes: int, per_address: int = BODIES_PER_ADDRESS) -> None:
        self.max_bytes, self.per_address = max_bytes, per_address
        self.held = 0
        self.receiving: dict[str, int] = {}

    def enter(self, address: str) -> None:
        """
        One more body from C{address} is being received.

        @raise BodyRefused: 429 when C{address} sends L{per_address} already.
        """
        count = self.receiving.get(address, 0)
        if count >= self.per_address:
            raise BodyRefused(429, f"this client is sending {count} request bodies already (at"
                                   f" most {self.per_address} at once): wait for one to end",
                              "too_many_bodies", retry_after=5)
        self.receiving[address] = count + 1

    def leave(self, address: str) -> None:
        left = self.receiving.get(address, 1) - 1
        if left > 0:
            self.receiving[address] = left
        else:
            self.receiving.pop(address, None)

    def reserve(self, size: int) -> None:
        """
        Hold C{size} more bytes of bodies.

        @raise BodyRefused: 503 when they do not fit in the budget.
        """
        if self.held + size > self.max_bytes:
            raise BodyRefused(503, f"capsule holds as many request bodies as it may"
                                   f" ({self.max_bytes} bytes): try again shortly",
                              "spool_full", retry_after=5)
        self.held += size

    def release(self, size: int) -> None:
        self.held = max(0, self.held - size)


class RefusalLog:
    """
    The log of refused bodies: at most L{REFUSAL_LOG_LINES} lines in
    L{REFUSAL_LOG_WINDOW} seconds (a client can send refused requests
    as fast as it likes); the lines left out are counted in the next.
    """

    def __init__(self, clock=None, log: Logger = _log) -> None:
        self._clock, self._log = clock, log
        self._window_start = None
        self._lines = 0
        self._dropped = 0

    def __call__(self, format: str, **fields) -> None:
        now = self._clock.seconds() if self._clock is not None else None
        if now is not None:
            if self._window_start is None or now - self._window_start >= REFUSAL_LOG_WINDOW:
                self._window_start, self._lines = now, 0
            if self._lines >= REFUSAL_LOG_LINES:
                self._dropped += 1
                return
            self._lines += 1
        dropped, self._dropped = self._dropped, 0
        if dropped:
            format += " ({dropped} more refused bodies were not logged)"
        self._log.info(format, dropped=dropped, **fields)
