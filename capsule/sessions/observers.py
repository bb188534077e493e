"""
Who watches sessions: what happens to sessions, told to whoever counts it
(metrics), writes it down (recordings) or keeps it across a restart (the
owners' file), without the sessions knowing who listens.

An observer that fails is logged and the session goes on: watching a
session must never end it.
"""

from __future__ import annotations

from twisted.logger import Logger
from zope.interface import Interface, implementer


_log = Logger()


class ISessionObserver(Interface):
    """
    What happens to sessions.  Every method is optional to implement in
    spirit: an observer does nothing for what it does not care about.
    """

    def session_opened(session):
        """
        A client (or the API) opened C{session}: its creator is recorded.
        """

    def session_started(session, warm, seconds):
        """
        C{session}'s shell runs for its first client: taken warm from a pool
        (C{warm}), or made in C{seconds}.
        """

    def session_reconnected(session):
        """
        A client attached to C{session} again.
        """

    def session_output(session, data):
        """
        C{session}, someone's (not a warm one waiting in a pool), printed
        C{data}.
        """

    def session_resized(session, cols, rows):
        """
        C{session}'s terminal is C{cols} x C{rows} now.
        """

    def session_ports(session):
        """
        The TCP ports listening in C{session}'s container changed (or were
        said for the first time): C{session.listening_ports}.
        """

    def session_ended(session):
        """
        C{session} is over: C{session.core.exit_code} and C{.message} say how.
        """

    def pool_taken(pool, found):
        """
        A warm session of C{pool} was asked for: C{found} is it, or C{None}.
        """


@implementer(ISessionObserver)
class SessionObserver:
    """
    An observer that does nothing: subclass it and override what matters.
    """

    def session_opened(self, session) -> None:
        pass

    def session_started(self, session, warm: bool, seconds: float) -> None:
        pass

    def session_reconnected(self, session) -> None:
        pass

    def session_output(self, session, data: bytes) -> None:
        pass

    def session_resized(self, session, cols: int, rows: int) -> None:
        pass

    def session_ports(self, session) -> None:
        pass

    def session_ended(self, session) -> None:
        pass

    def pool_taken(self, pool, found) -> None:
        pass


def _tell(method: str):
    def tell(self, *args) -> None:
        for observer in self._observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                _log.failure("{observer} failed to observe {event}",
                             observer=type(observer).__name__, event=method)
    tell.__name__ = method
    return tell


@implementer(ISessionObserver)
class SessionObservers:
    """
    Every observer of a server's sessions, told in turn.
    """

    def __init__(self, observers=()) -> None:
        self._observers = [o for o in observers if o is not None]

    def __iter__(self):
        return iter(self._observers)

    def add(self, observer) -> None:
        """
        Tell C{observer} too from now on.
        """
        self._observers.append(observer)

    session_opened = _tell("session_opened")
    session_started = _tell("session_started")
    session_reconnected = _tell("session_reconnected")
    session_output = _tell("session_output")
    session_resized = _tell("session_resized")
    session_ports = _tell("session_ports")
    session_ended = _tell("session_ended")
    pool_taken = _tell("pool_taken")
