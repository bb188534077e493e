"""
Which session a connection to the session door comes from, by its source
address.

A session's container has one address on its network; inter-container
traffic is off and sessions have no C{NET_RAW}, so a connection's source
address is the session's identity.  The addresses are learnt from the
engine (C{docker network inspect} of the sessions' networks: one call for
all of them), on a connection from an address not known yet, at most every
L{SessionsByAddress.REFRESH_EVERY} seconds; a container's address is
matched to the live (or warm) session whose container it is, so an address
a removed container held and another one took is never mistaken for the
first one's session.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from capsule.core.errors import CapsuleError

_log = Logger()


class SessionsByAddress:
    """
    @param manager: the sessions (L{capsule.sessions.manager.SessionManager}).
    @param docker: the engine (its C{network_addresses}).
    @param networks: C{networks()}: the names of the sessions' networks now.
    """

    REFRESH_EVERY = 0.5

    def __init__(self, manager, docker, clock, networks) -> None:
        self._manager = manager
        self._docker = docker
        self._clock = clock
        self._networks = networks
        self._addresses: dict[str, str] = {}
        self._reading = False
        self._refreshed_at = float("-inf")
        self._waiting: list[Deferred] = []

    def _session_of(self, container_id: str | None):
        if container_id is None:
            return None
        for session in (*self._manager.sessions.values(), *self._manager.pool.held):
            if session.container_id == container_id and session.core.message is None:
                return session
        return None

    async def find(self, address: str):
        """
        The session whose container has C{address}, or C{None}.
        """
        session = self._session_of(self._addresses.get(address))
        if session is not None:
            return session
        await self._refresh()
        return self._session_of(self._addresses.get(address))

    def _refresh(self) -> Deferred:
        d = Deferred()
        self._waiting.append(d)
        if not self._reading:
            self._start()
        return d

    def _start(self) -> None:
        self._reading = True
        Deferred.fromCoroutine(self._read()).addErrback(
            lambda f: _log.failure("reading the sessions' addresses failed", f))

    async def _read(self) -> None:
        try:
            wait = self._refreshed_at + self.REFRESH_EVERY - self._clock.seconds()
            if wait > 0:
                await deferLater(self._clock, wait, lambda: None)
            # Those who come from now on wait for the next reading.
            waiting, self._waiting = self._waiting, []
            self._refreshed_at = self._clock.seconds()
            found: dict[str, str] = {}
            for name in self._networks():
                try:
                    found.update(await self._docker.network_addresses(name))
                except CapsuleError as e:
                    _log.warn("could not read the addresses of the network {name}: {message}",
                              name=name, message=e.message)
                except Exception:
                    _log.failure("reading the addresses of the network {name} failed",
                                 name=name)
            self._addresses = found
        finally:
            self._reading = False
        for d in waiting:
            d.callback(None)
        if self._waiting and not self._reading:
            self._start()
