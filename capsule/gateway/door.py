"""
The session door: what sessions reach of capsule from inside.

capsule listens, for sessions only, on the host side of each session network
(the gateway address of its bridge, e.g. 172.18.0.1 for C{capsule}; a Docker
C{--internal} network's gateway address is reachable from its containers
too), on one port (C{--door-port}).  Behind it sit the credential gateway
and the egress proxy.  It never listens on a wildcard address: nothing
outside the sessions' networks reaches it.

A session learns the door from its environment (C{CAPSULE_DOOR}), set when
its container is made (L{door_url}).
"""

from __future__ import annotations

import ipaddress

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.web.resource import Resource

from capsule.web.http import json_error

_log = Logger()

DEFAULT_DOOR_PORT = 3180


def door_url(host: str, port: int) -> str:
    """
    The door's base URL for a session that reaches capsule at C{host}.
    """
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class DoorRoot(Resource):
    """
    The door's HTTP root where nothing else answers: a 404 that says what
    the door serves.
    """

    def getChild(self, path, request):
        return self

    def render(self, request):
        return json_error(request, 404, "nothing here: the session door serves capsule's"
                          " gateway to sessions only", "not_found")


class SessionDoor(Service):
    """
    Listens with one factory on the host-side addresses of the session
    networks, as they become known (L{listen}); stops listening when the
    service stops.

    @param port: the door's port on every address.
    @param factory: the protocol factory of a connection from a session; or
        C{None} and C{factory_of}, which returns it when first needed (the
        gateway behind the door is made after the sessions' manager, which
        hands the door connections from sessions without a network).
    """

    def __init__(self, reactor, port: int, factory=None, factory_of=None) -> None:
        self._reactor = reactor
        self.port = port
        self._factory = factory
        self._factory_of = factory_of
        self._listening: dict[str, object] = {}
        self._pending: dict[str, Deferred] = {}

    @property
    def factory(self):
        """
        The protocol factory of a connection from a session.
        """
        if self._factory is None:
            self._factory = self._factory_of()
        return self._factory

    def addresses(self) -> list[str]:
        """
        The addresses the door listens on now.
        """
        return sorted(self._listening)

    def listen(self, addresses) -> Deferred:
        """
        Listen on each of C{addresses} not listened on yet; fires when all
        are, a failure logged (a session on that network then has no door)
        rather than raised.
        """
        waits = []
        for address in addresses:
            parsed = ipaddress.ip_address(address)
            if parsed.is_unspecified:
                _log.error("the session door never listens on a wildcard address ({address}):"
                           " sessions on that network cannot reach capsule's gateway",
                           address=address)
                continue
            address = str(parsed)
            if address in self._listening or address in self._pending:
                continue
            endpoint_type = TCP6ServerEndpoint if ":" in address else TCP4ServerEndpoint
            d = endpoint_type(self._reactor, self.port, interface=address).listen(self.factory)
            self._pending[address] = d

            def listening(port, address=address):
                self._pending.pop(address, None)
                if not self.running:
                    return port.stopListening()
                self._listening[address] = port
                _log.info("the session door listens on {address} port {port}",
                          address=address, port=self.port)

            def failed(f, address=address):
                self._pending.pop(address, None)
                _log.error("the session door cannot listen on {address} port {port}: {error};"
                           " sessions on that network cannot reach capsule's gateway",
                           address=address, port=self.port, error=f.getErrorMessage())

            d.addCallbacks(listening, failed)
            waits.append(d)
        return DeferredList(waits, consumeErrors=True)

    def stopService(self) -> Deferred:
        super().stopService()
        ports, self._listening = list(self._listening.values()), {}
        return DeferredList([maybeDeferred(port.stopListening) for port in ports],
                            consumeErrors=True)
