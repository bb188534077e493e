"""
The network sessions run on.

By default every session joins capsule's own bridge network, C{capsule}
(its Linux bridge is C{capsule0}), created at start if missing, with
inter-container traffic disabled: one session cannot reach another.  What
the bridge may reach beyond the host (the cloud metadata service, private
networks) is the host firewall's business: the C{DOCKER-USER} chain, which
Docker leaves to its operator.  At start, capsule reads that chain and warns
when the rules the README gives are missing.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil

from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
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

# What a session must not reach: the cloud metadata service, and the
# private ranges (the host's neighbours, a VPC, the office).
BLOCKED = (
    ("169.254.169.254/32", "the cloud metadata service"),
    ("10.0.0.0/8", "a private range"),
    ("172.16.0.0/12", "a private range"),
    ("192.168.0.0/16", "a private range"),
)
# The rules to add for them (169.254.0.0/16: the whole link-local range).
SUGGESTED = ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
IPTABLES_TIMEOUT = 10.0


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


def missing_blocks(rules: str, bridge: str, subnets: list[str]) -> list[str]:
    """
    Which of L{BLOCKED} the C{iptables -S DOCKER-USER} output C{rules} does
    not drop for traffic coming from the bridge C{bridge} (whose subnets are
    C{subnets}).

    A rule counts if it drops or rejects a destination that covers the
    blocked one, for traffic from the bridge (C{-i}, C{+} wildcards too),
    from a source covering one of its subnets, or from anywhere, with no
    other condition.  Rules after an unconditional C{RETURN} or C{ACCEPT}
    (Docker's own last rule) are never reached and do not count.
    """
    ours = [ipaddress.ip_network(s, strict=False) for s in subnets]
    covered: list = []
    for line in rules.splitlines():
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if words[:2] != ["-A", "DOCKER-USER"]:
            continue
        found: dict[str, str] = {}
        other = False
        at = 2
        while at < len(words):
            word = words[at]
            if word in ("-i", "-s", "-d", "-j", "--reject-with") and at + 1 < len(words):
                found[word] = words[at + 1]
                at += 2
            else:
                other = True
                break
        target = found.get("-j")
        if (target in ("RETURN", "ACCEPT") and not other
                and not {"-i", "-s", "-d"} & found.keys()):
            break
        if other or target not in ("DROP", "REJECT") or "-d" not in found:
            continue
        interface = found.get("-i")
        if interface is not None and not (
                interface == bridge
                or (interface.endswith("+") and bridge.startswith(interface[:-1]))):
            continue
        try:
            destination = ipaddress.ip_network(found["-d"], strict=False)
            source = ipaddress.ip_network(found["-s"], strict=False) if "-s" in found else None
        except ValueError:
            continue
        if source is not None and not any(
                n.version == source.version and source.supernet_of(n) for n in ours):
            continue
        covered.append(destination)
    missing = []
    for blocked, _ in BLOCKED:
        wanted = ipaddress.ip_network(blocked)
        if not any(d.version == wanted.version and d.supernet_of(wanted) for d in covered):
            missing.append(blocked)
    return missing


def suggested_rules(bridge: str) -> list[str]:
    """
    The commands that block L{BLOCKED} for the bridge C{bridge}.
    """
    return [f"iptables -I DOCKER-USER -i {bridge} -d {d} -j DROP" for d in SUGGESTED]


async def read_docker_user(reactor, iptables: str | None = None) -> tuple[str | None, str]:
    """
    C{iptables -S DOCKER-USER}: fire with C{(rules, "")}, or C{(None, why)}
    when they cannot be read (no iptables, not allowed, no such chain).
    """
    iptables = iptables or shutil.which("iptables") or shutil.which("iptables", path="/usr/sbin:/sbin")
    if iptables is None:
        return None, "iptables is not installed here"
    d: Deferred = getProcessOutputAndValue(iptables, ("-S", "DOCKER-USER"),
                                           env=dict(os.environ), reactor=reactor)
    d.addTimeout(IPTABLES_TIMEOUT, reactor)
    try:
        out, err, code = await d
    except Exception as e:
        return None, f"iptables -S DOCKER-USER did not answer ({e})"
    if code != 0:
        why = err.decode("utf-8", "replace").strip().splitlines()
        return None, f"iptables -S DOCKER-USER failed: {why[0] if why else f'exit {code}'}"
    return out.decode("utf-8", "replace"), ""


class SessionNetwork:
    """
    The network of the sessions, made ready at start: L{ensure} creates
    capsule's own network if missing, says what is wrong with the one in
    use, and checks the host's firewall for it once.

    @param name: C{none}, L{CAPSULE_NETWORK}, or the name of a network the
        operator made.
    @param read_rules: C{read_rules()} fires with what
        L{read_docker_user} does (tests replace it).
    """

    def __init__(self, docker, reactor, name: str = CAPSULE_NETWORK, read_rules=None) -> None:
        self._docker = docker
        self._reactor = reactor
        self.name = name
        self._read_rules = read_rules or (
            lambda: Deferred.fromCoroutine(read_docker_user(reactor)))
        self.network: dict | None = None
        self.ready = False

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
        if fenced:
            # No route out: what it reaches of the host itself is the
            # INPUT chain's business.
            return
        if network["options"].get("com.docker.network.bridge.enable_icc") != "false":
            _log.warn("the network {name} lets its containers reach each other (it was not"
                      " created with com.docker.network.bridge.enable_icc=false): one session"
                      " can connect to another's services", name=self.name)
        await self._check_firewall(bridge, network["subnets"])

    async def _check_firewall(self, bridge: str, subnets: list[str]) -> None:
        rules, why = await self._read_rules()
        if rules is None:
            _log.warn("could not check the host firewall for the network {name} ({why}):"
                      " make sure DOCKER-USER blocks 169.254.169.254 and the private ranges"
                      " for bridge {bridge} (see the README, 'Container hardening')",
                      name=self.name, why=why, bridge=bridge)
            return
        missing = missing_blocks(rules, bridge, subnets)
        if missing:
            _log.warn("the host firewall lets sessions on {name} (bridge {bridge}) reach"
                      " {missing}: no DOCKER-USER rule drops them. Add: {commands}",
                      name=self.name, bridge=bridge, missing=", ".join(
                          f"{d} ({what})" for d, what in BLOCKED if d in missing),
                      commands="; ".join(suggested_rules(bridge)))
        else:
            _log.info("the host firewall blocks the metadata service and the private ranges"
                      " for the sessions on {name}", name=self.name)
