"""
Writing what a worker thread produces through the reactor, at the pace of
the client's connection: an export's archive (L{capsule.web.export}) and an
upload's body fed to its unpacking command (L{capsule.web.api}).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


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
