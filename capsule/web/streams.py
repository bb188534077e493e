"""
Moving bytes between worker threads and the reactor, at the pace of the
side that is slower, within bounds: an upload's body fed to its unpacking
command (L{ThreadFedProducer}, L{capsule.web.upload}), and an export's
archive spooled between Docker and its client (L{Spool},
L{capsule.web.export}).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import deque

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

# Bytes one spool keeps in memory before it writes to its temporary file,
# and all spools together.
SPOOL_MEMORY = 1024 * 1024
SPOOL_MEMORY_BUDGET = 16 * 1024 * 1024


@implementer(IPushProducer)
class ThreadFedProducer:
    """
    A push producer for what a worker thread writes through the reactor:
    while the consumer is paused, a write's answer (L{_written}) waits until
    it resumes, or fails once the producer is stopped (L{_release}).
    """

    def __init__(self) -> None:
        self._paused = False
        self._resumed: Deferred | None = None

    def _written(self) -> Deferred | None:
        """
        What a write answers: while the consumer is paused, a Deferred that
        fires once it resumes; else None.
        """
        if self._paused:
            self._resumed = Deferred()
            return self._resumed
        return None

    def _release(self, reason: Exception) -> None:
        """
        Fail the write that waits for the consumer, if one does, with
        C{reason}.
        """
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.errback(reason)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)


class SpoolClosed(Exception):
    """
    The spool was closed (its reader is gone) while its writer waited.
    """


class SpoolStalled(Exception):
    """
    A writer found no room for C{stall} seconds during which its reader took
    nothing.

    @ivar own: whether the spool itself was full (its reader does not
        read), rather than the budget all spools share.
    """

    def __init__(self, message: str, own: bool) -> None:
        super().__init__(message)
        self.message, self.own = message, own


class SpoolBudget:
    """
    What all spools together may hold: C{total} bytes unread (in memory and
    in their temporary files), of which at most C{memory} in memory.
    """

    def __init__(self, total: int, memory: int = SPOOL_MEMORY_BUDGET) -> None:
        self.total, self.memory = total, memory
        self.held = 0
        self.in_memory = 0
        # One lock for every spool of the budget: a writer waits on it for
        # room that any reader may make.
        self.condition = threading.Condition()

    def full(self) -> bool:
        return self.held >= self.total


class Spool:
    """
    A first-in first-out buffer between a worker thread that writes
    (L{thd_put}) and the reactor, which reads (L{take}): at most C{limit}
    bytes unread, within C{budget}; the first C{memory} of them in memory
    (while the budget's memory lasts), the rest in a temporary file (made on
    the first need, unlinked at once, emptied whenever its reader catches
    up), so that a writer never waits on a reader that is merely slower.

    @ivar taken: bytes the reader took, so far.
    @ivar pending: bytes written and not yet taken.
    """

    def __init__(self, budget: SpoolBudget, limit: int, memory: int = SPOOL_MEMORY,
                 directory: str | None = None, clock=time.monotonic) -> None:
        self._budget, self.limit, self._memory = budget, limit, memory
        self._directory, self._clock = directory, clock
        self._chunks: deque[bytes] = deque()
        self._in_memory = 0
        self._file = None
        self._file_read = self._file_written = 0
        self.pending = 0
        self.taken = 0
        self.closed = False

    # -- the writer's thread ---------------------------------------------

    def thd_put(self, data: bytes, stall: float) -> None:
        """
        Add C{data}, once there is room for it: wait while the spool is
        full, or the budget is.

        @raise SpoolStalled: no room came within C{stall} seconds in which
            the reader took nothing.
        @raise SpoolClosed: the spool is closed.
        """
        size = len(data)
        if not size:
            return
        budget = self._budget
        with budget.condition:
            seen, since = self.taken, self._clock()
            while True:
                if self.closed:
                    raise SpoolClosed()
                # A chunk larger than the spool goes into an empty one.
                own = self.pending + size <= self.limit or self.pending == 0
                shared = budget.held + size <= budget.total
                if own and shared:
                    break
                now = self._clock()
                if self.taken != seen:
                    seen, since = self.taken, now
                left = since + stall - now
                if left <= 0:
                    if not own:
                        raise SpoolStalled(
                            f"its client read nothing for {stall:g} s while its spool was"
                            f" full ({self.limit} bytes)", own=True)
                    raise SpoolStalled(
                        f"capsule's export spool was full ({budget.total} bytes) for"
                        f" {stall:g} s", own=False)
                budget.condition.wait(left)
            if (self._file_read == self._file_written
                    and self._in_memory + size <= self._memory
                    and budget.in_memory + size <= budget.memory):
                self._chunks.append(data)
                self._in_memory += size
                budget.in_memory += size
            else:
                if self._file is None:
                    self._file = tempfile.TemporaryFile(prefix="capsule-export-",
                                                        dir=self._directory)
                os.pwrite(self._file.fileno(), data, self._file_written)
                self._file_written += size
            self.pending += size
            budget.held += size

    # -- the reactor -------------------------------------------------------

    def take(self, most: int) -> bytes:
        """
        Up to C{most} of the oldest bytes not taken yet (C{b""}: none).
        """
        budget = self._budget
        with budget.condition:
            if self.closed:
                return b""
            if self._chunks:
                data = self._chunks.popleft()
                if len(data) > most:
                    data, rest = data[:most], data[most:]
                    self._chunks.appendleft(rest)
                self._in_memory -= len(data)
                budget.in_memory -= len(data)
            elif self._file_read < self._file_written:
                data = os.pread(self._file.fileno(),
                                min(most, self._file_written - self._file_read),
                                self._file_read)
                self._file_read += len(data)
                if self._file_read == self._file_written:
                    # Caught up: the file's space is given back.
                    self._file_read = self._file_written = 0
                    self._file.truncate(0)
            else:
                return b""
            self.pending -= len(data)
            self.taken += len(data)
            budget.held -= len(data)
            budget.condition.notify_all()
            return data

    def close(self) -> None:
        """
        Drop what is unread, give the budget back, and fail the writer's
        wait and its next put (L{SpoolClosed}).
        """
        budget = self._budget
        with budget.condition:
            if self.closed:
                return
            self.closed = True
            budget.held -= self.pending
            budget.in_memory -= self._in_memory
            self.pending = self._in_memory = 0
            self._chunks.clear()
            if self._file is not None:
                self._file.close()
                self._file = None
            budget.condition.notify_all()
