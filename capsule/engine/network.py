"""
The network sessions run on.

By default every session joins capsule's own bridge network, C{capsule}
(its Linux bridge is C{capsule0}), created at start if missing, with
inter-container traffic disabled: one session cannot reach another.  What
the bridge may reach beyond it (the cloud metadata service, private
networks, the host itself) is fenced by the host's firewall
(L{capsule.engine.firewall}), once the network is known.
"""

from __future__ import annotations

import ipaddress

from twisted.logger import Logger

_log = Logger()

# --network's value for capsule's own network, and that network.
CAPSULE_NETWORK = "capsule"
CAPSULE_BRIDGE = "capsule0"
NETWORK_OPTIONS = {
    "com.docker.network.bridge.enable_icc": "false",
    "com.docker.network.bridge.name": CAPSULE_BRIDGE,
}
NETWORK_LABELS = {"io.capsule.network": "true"}

# The network of fenced sessions (a profile's egress is "none" or a list of
# hosts): a Docker --internal bridge, no route out, no traffic between its
# containers; they reach only the session door on its gateway address (the
# egress proxy behind it is their one way out).
FENCED_NETWORK = "capsule-fenced"
FENCED_BRIDGE = "capsule1"
FENCED_NETWORK_OPTIONS = {
    "com.docker.network.bridge.enable_icc": "false",
    "com.docker.network.bridge.name": FENCED_BRIDGE,
}


class NotFenced(Exception):
    """
    The fenced sessions' network exists with a route out: capsule cannot
    start fenced sessions on it (the sentence says what to do).
    """


def bridge_of(network: dict) -> str | None:
    """
    The Linux bridge of a bridge network, or C{None} for another driver.
    """
    if network.get("driver") not in (None, "bridge"):
        return None
    return network["options"].get("com.docker.network.bridge.name") or f"br-{network['id'][:12]}"


class SessionNetwork:
    """
    The network of the sessions, made ready at start: L{ensure} creates
    capsule's own network if missing, says what is wrong with the one in
    use, and fences its bridge once.

    @param name: C{none}, L{CAPSULE_NETWORK}, or the name of a network the
        operator made.
    @param firewall: the L{capsule.engine.firewall.Firewall} that fences a
        bridge network's sessions (none: nothing is fenced nor checked).
    """

    def __init__(self, docker, reactor, name: str = CAPSULE_NETWORK, firewall=None) -> None:
        self._docker = docker
        self._reactor = reactor
        self.name = name
        self._firewall = firewall
        self.network: dict | None = None
        self.ready = False

    @property
    def refusal(self) -> str | None:
        """
        Why capsule must not start (C{--firewall manage} could not fence the
        sessions), once L{ensure} has fenced its network.
        """
        return None if self._firewall is None else self._firewall.refusal

    def subnets(self) -> list:
        """
        The subnets of the sessions' network, as C{ipaddress} networks, once
        L{ensure} has found it (none before, nor for C{none}).
        """
        found = []
        for text in (self.network or {}).get("subnets", ()):
            try:
                found.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                continue
        return found

    def gateways(self) -> list[str]:
        """
        The host-side addresses of the sessions' network (its bridge's
        gateway addresses), once L{ensure} has found it: where sessions reach
        capsule's session door.
        """
        return list((self.network or {}).get("gateways", ()))

    async def ensure(self) -> None:
        """
        Fail with a L{capsule.core.errors.DockerError} when the engine cannot be
        asked (call again later); warnings go to the log.
        """
        if self.ready:
            return
        if self.name == "none":
            self.ready = True
            _log.info("sessions have no network (--network none)")
            return
        fenced = self.name == FENCED_NETWORK
        if self.name in (CAPSULE_NETWORK, FENCED_NETWORK):
            network, created = await self._docker.ensure_network(
                self.name, FENCED_NETWORK_OPTIONS if fenced else NETWORK_OPTIONS,
                NETWORK_LABELS, internal=fenced)
            if created:
                _log.info("created the network {name} for the {which} (bridge {bridge},"
                          " {subnets}, no traffic between sessions{route})", name=self.name,
                          bridge=bridge_of(network), subnets=", ".join(network["subnets"]),
                          which="fenced sessions" if fenced else "sessions",
                          route=", no route out" if fenced else "")
        else:
            network = await self._docker.inspect_network(self.name)
            if network is None:
                self.ready = True
                _log.warn("there is no Docker network {name} (--network {name}): sessions"
                          " cannot start until it exists (docker network create ...)",
                          name=self.name)
                return
        if fenced and not network.get("internal"):
            # Made by someone else, with a route out: fenced sessions would
            # not be fenced.
            raise NotFenced(
                f"the Docker network {self.name} exists but is not internal (it was not"
                f" created with --internal): fenced sessions would have a route out. Remove"
                f" it (docker network rm {self.name}) and capsule makes its own")
        self.network = network
        self.ready = True
        bridge = bridge_of(network)
        if network["driver"] == "host":
            _log.warn("sessions share the host's network (--network {name}): they can reach"
                      " capsule and every service of the host, on loopback too",
                      name=self.name)
            return
        if bridge is None:
            _log.info("sessions run on the {driver} network {name}", driver=network["driver"],
                      name=self.name)
            return
        if network["options"].get("com.docker.network.bridge.enable_icc") != "false":
            _log.warn("the network {name} lets its containers reach each other (it was not"
                      " created with com.docker.network.bridge.enable_icc=false): one session"
                      " can connect to another's services", name=self.name)
        if self._firewall is not None:
            await self._firewall.fence(self.name, bridge, network["subnets"],
                                       network.get("gateways", ()))
