"""
The fence around the session networks: what a session never reaches,
whatever its profile's egress policy.

From a session bridge, the cloud metadata service and the rest of the
link-local range, the private ranges (the host's neighbours, a VPC, the
office, other containers) and the host itself are refused, except the
addresses the operator names (C{--egress-allow-address}).  Two chains of
capsule's own per bridge hold the rules:

- C{CAPSULE-OUT-<bridge>}, jumped to from Docker's C{DOCKER-USER} chain
  (which Docker leaves to its operator and never flushes) for traffic coming
  in from the bridge: what sessions send through the host to other
  machines, C{open} sessions' NAT included.  Replies of connections already
  made, the operator's addresses and DNS to the host's name servers return;
  the blocked ranges are refused (a TCP reset, else ICMP
  admin-prohibited: a connection fails at once, not after a timeout).
- C{CAPSULE-IN-<bridge>}, jumped to from C{INPUT} for traffic from the
  bridge to the host itself, whichever of its addresses is named (the
  gateway, eth0's, docker0's): only the session door's port on the
  bridge's gateway, replies of the host's own connections (the keeper's
  direct path, previews) and DNS to a name server on the host return; the
  rest is refused.

The rules only ever refuse: a rule that returns leaves the packet to the
host's own rules after capsule's.  They are applied with one
C{iptables-restore --noflush} per family (the chains are replaced at once,
never empty in between), the jumps inserted first in their chain when
missing (C{iptables -C} before C{-I}), every rule tagged C{-m comment
--comment capsule}.  They are left in place when capsule stops: sessions
that outlive capsule, and those it finds again at its next start, stay
fenced.  L{removal_commands} says how to take them away.

C{--firewall} says who does it: C{auto} (capsule applies them when it can,
else warns with the commands), C{manage} (capsule refuses to start when it
cannot), C{off} (the operator's own firewall: capsule reads it and warns
when a range is let through).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

_log = Logger()

MODES = ("auto", "manage", "off")
COMMENT = "capsule"
DNS_PORT = 53
IPTABLES_TIMEOUT = 10.0

# What a session must not reach, by IP version, and why.
BLOCKED = {
    4: (("169.254.0.0/16", "link-local: the cloud metadata service"),
        ("10.0.0.0/8", "a private range"),
        ("172.16.0.0/12", "a private range"),
        ("192.168.0.0/16", "a private range"),
        ("100.64.0.0/10", "the shared address space (carrier-grade NAT)")),
    6: (("fe80::/10", "link-local"),
        ("fc00::/7", "unique local (private) addresses")),
}
# How a refused packet is answered: TCP with a reset ("connection
# refused"), the rest with ICMP administratively prohibited.
ICMP_REJECT = {4: "icmp-admin-prohibited", 6: "icmp6-adm-prohibited"}
# IPv6 needs neighbour discovery with the host.
ICMP6_NEEDED = ("neighbour-solicitation", "neighbour-advertisement", "router-solicitation")

TOOLS = {4: "iptables", 6: "ip6tables"}


def chain_names(bridge: str) -> tuple[str, str]:
    """
    capsule's two chains for the bridge C{bridge}: what its sessions send
    through the host, and what they send to the host.  (A bridge's name is
    at most 15 characters: these fit iptables's 28.)
    """
    return f"CAPSULE-OUT-{bridge}", f"CAPSULE-IN-{bridge}"


@dataclass(frozen=True)
class Fence:
    """
    What the rules of one session bridge are made from.

    @ivar bridge: the Linux bridge (C{capsule0}).
    @ivar subnets: its subnets (C{172.18.0.0/16}; an IPv6 one brings
        C{ip6tables} rules).
    @ivar gateways: its host-side addresses, where the session door listens.
    @ivar door_port: the door's port (0: none).
    @ivar allowed: the operator's addresses (CIDRs), reached anyway.
    @ivar nameservers: the name servers Docker's embedded DNS forwards the
        sessions' queries to (from their network): port 53 only.
    """

    bridge: str
    subnets: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    door_port: int = 0
    allowed: tuple[str, ...] = ()
    nameservers: tuple[str, ...] = ()

    def families(self) -> list[int]:
        """
        The IP versions of its subnets (4 when it has none: the bridge is
        fenced anyway).
        """
        found = set()
        for subnet in self.subnets:
            try:
                found.add(ipaddress.ip_network(subnet, strict=False).version)
            except ValueError:
                continue
        return sorted(found) or [4]

    def _of(self, addresses, family: int) -> list[str]:
        found = []
        for text in addresses:
            try:
                network = ipaddress.ip_network(text, strict=False)
            except ValueError:
                continue
            if network.version == family and str(network) not in found:
                found.append(str(network))
        return found

    def rules(self, family: int = 4) -> tuple[list[list[str]], list[list[str]]]:
        """
        The rules of capsule's two chains for this bridge (L{chain_names}),
        each an iptables rule without its C{-A CHAIN}: C{(out, in)}.
        """
        tag = ["-m", "comment", "--comment", COMMENT]
        replies = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *tag, "-j", "RETURN"]
        allowed = [["-d", a, *tag, "-j", "RETURN"] for a in self._of(self.allowed, family)]
        dns = [["-d", server, "-p", proto, "--dport", str(DNS_PORT), *tag, "-j", "RETURN"]
               for server in self._of(self.nameservers, family) for proto in ("udp", "tcp")]
        refuse_tcp = ["-p", "tcp", *tag, "-j", "REJECT", "--reject-with", "tcp-reset"]
        refuse = [*tag, "-j", "REJECT", "--reject-with", ICMP_REJECT[family]]
        out = [replies, *allowed, *dns]
        for blocked, _ in BLOCKED[family]:
            out.append(["-d", blocked, *refuse_tcp])
            out.append(["-d", blocked, *refuse])
        door = [["-d", gateway, "-p", "tcp", "--dport", str(self.door_port), *tag, "-j",
                 "RETURN"] for gateway in self._of(self.gateways, family) if self.door_port]
        neighbours = [["-p", "ipv6-icmp", "--icmpv6-type", kind, *tag, "-j", "RETURN"]
                      for kind in ICMP6_NEEDED] if family == 6 else []
        into = [replies, *door, *allowed, *dns, *neighbours, refuse_tcp, refuse]
        return out, into

    def jumps(self, forward: str = "DOCKER-USER") -> list[tuple[str, list[str]]]:
        """
        The rules that send the bridge's traffic to capsule's chains, by
        the chain they are inserted in: C{forward} (C{DOCKER-USER}, or
        C{FORWARD} where Docker manages no rules for the family) and
        C{INPUT}.
        """
        out, into = chain_names(self.bridge)
        tag = ["-m", "comment", "--comment", COMMENT]
        return [(forward, ["-i", self.bridge, *tag, "-j", out]),
                ("INPUT", ["-i", self.bridge, *tag, "-j", into])]

    def restore_input(self, family: int = 4) -> str:
        """
        What C{iptables-restore --noflush} is given: capsule's two chains,
        declared (which empties them) and filled, in one transaction.
        """
        names = chain_names(self.bridge)
        lines = ["*filter"] + [f":{name} - [0:0]" for name in names]
        for name, rules in zip(names, self.rules(family)):
            lines += [f"-A {name} {shlex.join(rule)}" for rule in rules]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def commands(self) -> list[str]:
        """
        The shell commands that apply the rules by hand (as root, on the
        engine's host), for every family of the bridge.
        """
        found = []
        for family in self.families():
            tool = TOOLS[family]
            for name, rules in zip(chain_names(self.bridge), self.rules(family)):
                found.append(f"{tool} -w -N {name} 2>/dev/null; {tool} -w -F {name}")
                found += [f"{tool} -w -A {name} {shlex.join(rule)}" for rule in rules]
            for chain, rule in self.jumps():
                found.append(f"{tool} -w -C {chain} {shlex.join(rule)} 2>/dev/null ||"
                             f" {tool} -w -I {chain} 1 {shlex.join(rule)}")
        return found


def removal_commands(bridge: str, family: int = 4) -> list[list[str]]:
    """
    The commands (argument lists) that take capsule's rules for the bridge
    C{bridge} away: the jumps (from C{DOCKER-USER}, or C{FORWARD} where
    Docker has no such chain: one of the two fails), then the chains.
    """
    tool = TOOLS[family]
    fence = Fence(bridge)
    found = [[tool, "-w", "-D", chain, *rule] for forward in ("DOCKER-USER", "FORWARD")
             for chain, rule in fence.jumps(forward)[:1]]
    found += [[tool, "-w", "-D", chain, *rule] for chain, rule in fence.jumps()[1:]]
    for name in chain_names(bridge):
        found += [[tool, "-w", "-F", name], [tool, "-w", "-X", name]]
    return found


# -- the host's name servers ---------------------------------------------------------------


def read_nameservers(paths=("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"),
                     daemon_json: str = "/etc/docker/daemon.json") -> tuple[str, ...]:
    """
    The name servers Docker gives the sessions' networks: the engine's
    C{dns} setting, else the host's resolv.conf (systemd-resolved's upstream
    file when the first has loopback servers only, as Docker does).
    Loopback servers are left out: Docker never sends the sessions' queries
    there from their network.
    """
    try:
        with open(daemon_json) as f:
            configured = json.load(f).get("dns") or []
        servers = tuple(_servers(configured))
        if servers:
            return servers
    except (OSError, ValueError, AttributeError):
        pass
    for path in paths:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        found = [line.split()[1] for line in text.splitlines()
                 if line.split()[:1] == ["nameserver"] and len(line.split()) > 1]
        servers = tuple(_servers(found))
        if servers:
            return servers
    return ()


def _servers(texts) -> list[str]:
    found = []
    for text in texts:
        try:
            address = ipaddress.ip_address(str(text).split("%")[0])
        except ValueError:
            continue
        if not address.is_loopback and str(address) not in found:
            found.append(str(address))
    return found


# -- reading what is there (--firewall off) ------------------------------------------------


def _parse(rules: str) -> dict[str, list[list[str]]]:
    chains: dict[str, list[list[str]]] = {}
    for line in rules.splitlines():
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if words[:1] == ["-N"] and len(words) > 1:
            chains.setdefault(words[1], [])
        elif words[:1] == ["-A"] and len(words) > 1:
            chains.setdefault(words[1], []).append(words[2:])
    return chains


def _covered(chains, chain: str, bridge: str, ours: list, depth: int = 0) -> list:
    """
    The destinations that traffic from the bridge meets a DROP or REJECT
    for in C{chain} with no other condition (following jumps into chains
    conditioned on the bridge only); a rule with other conditions refuses
    only some, and counts for none.
    """
    covered: list = []
    if depth > 8:
        return covered
    for words in chains.get(chain, ()):
        found: dict[str, str] = {}
        other = False
        at = 0
        while at < len(words):
            word = words[at]
            if word in ("-i", "-s", "-d", "-j", "--reject-with") and at + 1 < len(words):
                found[word] = words[at + 1]
                at += 2
            elif (words[at:at + 2] == ["-m", "comment"] and at + 3 < len(words)
                    and words[at + 2] == "--comment"):
                at += 4
            else:
                other = True
                break
        target = found.get("-j")
        conditioned = bool({"-i", "-s", "-d"} & found.keys())
        if target in ("RETURN", "ACCEPT") and not other and not conditioned:
            break
        if other:
            continue
        interface = found.get("-i")
        if interface is not None and not (
                interface == bridge
                or (interface.endswith("+") and bridge.startswith(interface[:-1]))):
            continue
        try:
            destination = ipaddress.ip_network(found.get("-d", "0.0.0.0/0"), strict=False)
            source = ipaddress.ip_network(found["-s"], strict=False) if "-s" in found else None
        except ValueError:
            continue
        if source is not None and not any(
                n.version == source.version and source.supernet_of(n) for n in ours):
            continue
        if target in ("DROP", "REJECT"):
            covered.append(destination)
            if destination.prefixlen == 0:
                break
        elif target in chains and "-d" not in found:
            inner = _covered(chains, target, bridge, ours, depth + 1)
            covered += inner
            if any(d.prefixlen == 0 for d in inner):
                break
    return covered


def missing_blocks(rules: str, bridge: str, subnets: list[str]) -> list[str]:
    """
    Which of the IPv4 ranges of L{BLOCKED} the C{iptables -S} output
    C{rules} does not refuse in C{DOCKER-USER} for traffic coming from the
    bridge C{bridge} (whose subnets are C{subnets}), and C{"the host"} when
    C{INPUT} does not refuse the bridge's traffic to the host.

    A rule counts if it drops or rejects a destination that covers the
    blocked one, for traffic from the bridge (C{-i}, C{+} wildcards too),
    from a source covering one of its subnets, or from anywhere, with no
    other condition (a comment is none), or jumps with no other condition
    to a chain where one does.  Rules after an unconditional C{RETURN} or
    C{ACCEPT} (Docker's own last rule) are never reached and do not count.
    """
    chains = _parse(rules)
    ours = [ipaddress.ip_network(s, strict=False) for s in subnets]
    covered = _covered(chains, "DOCKER-USER", bridge, ours)
    missing = []
    for blocked, _ in BLOCKED[4]:
        wanted = ipaddress.ip_network(blocked)
        if not any(d.version == wanted.version and d.supernet_of(wanted) for d in covered):
            missing.append(blocked)
    if not any(d.prefixlen == 0 and d.version == 4
               for d in _covered(chains, "INPUT", bridge, ours)):
        missing.append("the host")
    return missing


# -- running iptables ----------------------------------------------------------------------


class _Run(ProcessProtocol):
    def __init__(self, stdin: bytes | None) -> None:
        self._stdin = stdin
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        if self._stdin:
            self.transport.write(self._stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason) -> None:
        code = 0 if reason.check(ProcessDone) else (reason.value.exitCode or 1)
        self.done.callback((code, b"".join(self.out).decode("utf-8", "replace"),
                            b"".join(self.err).decode("utf-8", "replace")))


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def process_runner(reactor):
    """
    C{run(argv, stdin=None)}: run a program (found on the C{PATH} or in
    C{/usr/sbin}); fires with C{(code, out, err)}, C{code} 127 when it is not
    installed, 124 when it did not end within L{IPTABLES_TIMEOUT}.
    """
    async def run(argv: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
        path = find_tool(argv[0])
        if path is None:
            return 127, "", f"{argv[0]} is not installed here"
        protocol = _Run(stdin)
        try:
            process = reactor.spawnProcess(protocol, path, [path, *argv[1:]],
                                           env=dict(os.environ))
        except OSError as e:
            return 126, "", f"{argv[0]} could not be run: {e}"

        def kill() -> None:
            try:
                process.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
        call = reactor.callLater(IPTABLES_TIMEOUT, kill)
        code, out, err = await protocol.done
        if not call.active():
            return 124, out, f"{argv[0]} did not answer within {IPTABLES_TIMEOUT:g} s"
        call.cancel()
        return code, out, err
    return run


def _first_line(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else f"exit {code}"


# -- the fence, at start -------------------------------------------------------------------


class Firewall:
    """
    Fences each session bridge as its network becomes known
    (L{fence}), as C{--firewall} says.

    @param mode: one of L{MODES}.
    @param run: C{run(argv, stdin)} as L{process_runner} makes (tests give a
        fake).
    @param nameservers: the name servers let through on port 53 (default:
        L{read_nameservers}).
    @param bridge_here: C{bridge_here(name)}: whether this host has the
        bridge (else the engine's network lives elsewhere: another host, a
        VM, or capsule runs in a network namespace of its own).
    """

    def __init__(self, reactor, mode: str = "auto", door_port: int = 0,
                 allowed=(), run=None, nameservers=None, bridge_here=None) -> None:
        if mode not in MODES:
            raise ValueError(f"--firewall must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self._door_port = door_port
        self._allowed = tuple(allowed)
        self._run = run or process_runner(reactor)
        self._nameservers = nameservers
        self._bridge_here = bridge_here or (
            lambda name: os.path.exists(os.path.join("/sys/class/net", name)))
        # Bridge: "fenced" (capsule's rules are in place), "found" (the
        # operator's are), "open" (a range is let through), "unknown".
        self.bridges: dict[str, str] = {}
        # What went wrong, in a sentence (for /health and the log).
        self.problem: str | None = None
        # Under manage: why capsule must not start.
        self.refusal: str | None = None

    def health(self) -> dict:
        """
        What C{/health} says of it.
        """
        return {"mode": self.mode, "bridges": dict(self.bridges), "problem": self.problem}

    def make_fence(self, bridge: str, subnets=(), gateways=()) -> Fence:
        nameservers = self._nameservers
        if nameservers is None:
            nameservers = self._nameservers = read_nameservers()
        return Fence(bridge, tuple(subnets), tuple(gateways), self._door_port,
                     self._allowed, tuple(nameservers))

    async def fence(self, name: str, bridge: str, subnets=(), gateways=()) -> None:
        """
        Fence the sessions of the network C{name} (bridge C{bridge}); never
        fails: what went wrong is logged, kept in L{problem}, and under
        C{manage} in L{refusal}.
        """
        fence = self.make_fence(bridge, subnets, gateways)
        if self.mode == "off":
            await self._check(name, fence)
            return
        if not self._bridge_here(bridge):
            why = (f"this host has no bridge {bridge}: the Docker engine's networks live"
                   " elsewhere (another host, a VM, or capsule runs in a network namespace of"
                   " its own)")
        else:
            why = await self._apply(fence)
        if why is None:
            self.bridges[bridge] = "fenced"
            _log.info("the firewall fences the sessions on {name} (bridge {bridge}): no"
                      " link-local, private or host address{allowed} but the session door"
                      " (port {port}){dns}", name=name, bridge=bridge,
                      allowed=(f" (but {', '.join(self._allowed)})" if self._allowed else ""),
                      port=self._door_port,
                      dns=(f" and DNS to {', '.join(fence.nameservers)}"
                           if fence.nameservers else ""))
            return
        self.bridges[bridge] = "open"
        self.problem = (f"capsule could not fence the sessions on {name} (bridge {bridge}):"
                        f" {why}")
        if self.mode == "manage":
            self.refusal = (f"{self.problem}. --firewall manage needs iptables and the right"
                            " to change it (root, or CAP_NET_ADMIN) on the engine's host; or"
                            " apply the rules yourself and use --firewall off (the commands"
                            " are in docs/security.md)")
            return
        _log.critical(
            "SESSIONS ARE NOT FENCED: {problem}. They can reach the cloud metadata service,"
            " the private ranges and the host's own services. As root on the engine's host,"
            " run: {commands}; or give capsule CAP_NET_ADMIN (see docs/deploy.md)",
            problem=self.problem, commands="; ".join(fence.commands()))

    async def _apply(self, fence: Fence) -> str | None:
        """
        Apply the rules of C{fence}; C{None}, or what went wrong.
        """
        for family in fence.families():
            tool = TOOLS[family]
            code, _, err = await self._run(
                [f"{tool}-restore", "-w", str(int(IPTABLES_TIMEOUT)), "--noflush"],
                fence.restore_input(family).encode())
            if code != 0:
                return f"{tool}-restore failed: {_first_line(code, err)}"
            # Docker's chain for its operator, where Docker manages the
            # family's rules (it then puts its own before any of FORWARD's).
            code, _, _ = await self._run([tool, "-w", "-S", "DOCKER-USER"])
            for chain, rule in fence.jumps("DOCKER-USER" if code == 0 else "FORWARD"):
                code, _, err = await self._run([tool, "-w", "-C", chain, *rule])
                if code == 0:
                    continue
                code, _, err = await self._run([tool, "-w", "-I", chain, "1", *rule])
                if code != 0:
                    return f"{tool} -I {chain} failed: {_first_line(code, err)}"
        return None

    async def _check(self, name: str, fence: Fence) -> None:
        if not self._bridge_here(fence.bridge):
            code, rules, why = 1, "", f"this host has no bridge {fence.bridge}"
        else:
            code, rules, err = await self._run(["iptables", "-w", "-S"])
            why = _first_line(code, err)
        if code != 0:
            self.bridges[fence.bridge] = "unknown"
            self.problem = f"could not read the host firewall: {why}"
            _log.warn("could not check the host firewall for the network {name} ({why}):"
                      " make sure it refuses the link-local and private ranges and the host"
                      " for bridge {bridge} (see docs/security.md, 'The network')",
                      name=name, why=why, bridge=fence.bridge)
            return
        missing = missing_blocks(rules, fence.bridge, list(fence.subnets))
        if not missing:
            self.bridges[fence.bridge] = "found"
            _log.info("the host firewall blocks the metadata service, the private ranges and"
                      " the host for the sessions on {name}", name=name)
            return
        self.bridges[fence.bridge] = "open"
        reasons = dict(BLOCKED[4]) | {"the host": "its own services"}
        self.problem = (f"the host firewall lets sessions on {name} (bridge {fence.bridge})"
                        f" reach {', '.join(missing)}")
        _log.warn("the host firewall lets sessions on {name} (bridge {bridge}) reach"
                  " {missing} (--firewall off: the rules are yours). Add: {commands}",
                  name=name, bridge=fence.bridge,
                  missing=", ".join(f"{m} ({reasons[m]})" for m in missing),
                  commands="; ".join(fence.commands()))
