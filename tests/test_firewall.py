"""
The fence around the session networks (capsule.engine.firewall), without
touching the host: the rules' text, applying them with a fake iptables
(idempotent, loud when it cannot), reading the operator's own rules, the
host's name servers, and the options.
"""

import json
import stat

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.python import usage

from capsule.core.spec import ContainerSpec
from capsule.engine.firewall import (BLOCKED, Fence, Firewall, chain_names, missing_blocks,
                                     process_runner, read_nameservers, removal_commands)
from capsule.engine import firewall as firewall_module
from capsule.engine.network import SessionNetwork
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.services import SessionService
from capsule.tap import Options
from capsule.web.site import make_site
from tests.support.fakes import FakeDockerAPI
from tests.support.httpclient import ask

TAG = ["-m", "comment", "--comment", "capsule"]
SUBNETS = ["172.18.0.0/16"]
ALL_BLOCKED = [b for b, _ in BLOCKED[4]] + ["the host"]


def texts(events, level=None):
    return [formatEvent(e) for e in events
            if level is None or e.get("log_level") is not None and e["log_level"].name == level]


def fence(**kw):
    values = dict(bridge="capsule0", subnets=("172.18.0.0/16",), gateways=("172.18.0.1",),
                  door_port=3180, allowed=(), nameservers=("10.255.255.53",))
    values.update(kw)
    return Fence(**values)


# -- the rules -----------------------------------------------------------------------------


def test_the_rules_of_a_session_bridge():
    out, into = fence(allowed=("10.0.0.5/32",)).rules()
    replies = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *TAG, "-j", "RETURN"]
    assert out == [
        replies,
        # The operator's addresses, then DNS to the host's name servers.
        ["-d", "10.0.0.5/32", *TAG, "-j", "RETURN"],
        ["-d", "10.255.255.53/32", "-p", "udp", "--dport", "53", *TAG, "-j", "RETURN"],
        ["-d", "10.255.255.53/32", "-p", "tcp", "--dport", "53", *TAG, "-j", "RETURN"],
        # Then every blocked range, refused at once.
        *[rule for blocked in ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12",
                               "192.168.0.0/16", "100.64.0.0/10")
          for rule in (["-d", blocked, "-p", "tcp", *TAG, "-j", "REJECT", "--reject-with",
                        "tcp-reset"],
                       ["-d", blocked, *TAG, "-j", "REJECT", "--reject-with",
                        "icmp-admin-prohibited"])]]
    assert into == [
        replies,
        # The door, on the bridge's gateway only.
        ["-d", "172.18.0.1/32", "-p", "tcp", "--dport", "3180", *TAG, "-j", "RETURN"],
        ["-d", "10.0.0.5/32", *TAG, "-j", "RETURN"],
        ["-d", "10.255.255.53/32", "-p", "udp", "--dport", "53", *TAG, "-j", "RETURN"],
        ["-d", "10.255.255.53/32", "-p", "tcp", "--dport", "53", *TAG, "-j", "RETURN"],
        ["-p", "tcp", *TAG, "-j", "REJECT", "--reject-with", "tcp-reset"],
        [*TAG, "-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]]


def test_no_door_and_no_name_servers():
    out, into = fence(door_port=0, nameservers=()).rules()
    assert not any("--dport" in rule for rule in out + into)
    assert into[-1] == [*TAG, "-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]


def test_the_jumps_and_the_chains():
    assert chain_names("capsule1") == ("CAPSULE-OUT-capsule1", "CAPSULE-IN-capsule1")
    # The longest bridge name fits iptables's 28 characters.
    assert all(len(name) <= 28 for name in chain_names("x" * 15))
    assert fence(bridge="capsule1").jumps() == [
        ("DOCKER-USER", ["-i", "capsule1", *TAG, "-j", "CAPSULE-OUT-capsule1"]),
        ("INPUT", ["-i", "capsule1", *TAG, "-j", "CAPSULE-IN-capsule1"])]


def test_the_restore_input_replaces_capsules_chains_at_once():
    text = fence(nameservers=()).restore_input()
    lines = text.splitlines()
    assert lines[:3] == ["*filter", ":CAPSULE-OUT-capsule0 - [0:0]",
                         ":CAPSULE-IN-capsule0 - [0:0]"]
    assert lines[-1] == "COMMIT"
    assert ("-A CAPSULE-OUT-capsule0 -d 169.254.0.0/16 -m comment --comment capsule -j REJECT"
            " --reject-with icmp-admin-prohibited") in lines
    # Nothing but capsule's own chains.
    assert all(line.startswith(("-A CAPSULE-", ":CAPSULE-")) for line in lines[1:-1])


def test_ipv6_rules_for_a_bridge_with_ipv6():
    f = fence(subnets=("172.18.0.0/16", "fd00:caf::/64"), gateways=("172.18.0.1", "fd00:caf::1"),
              nameservers=("10.255.255.53", "fd00::53"))
    assert f.families() == [4, 6]
    out, into = f.rules(6)
    blocked = [rule[1] for rule in out if rule[0] == "-d" and "REJECT" in rule]
    assert sorted(set(blocked)) == ["fc00::/7", "fe80::/10"]
    assert ["-d", "fd00::53/128", "-p", "udp", "--dport", "53", *TAG, "-j", "RETURN"] in out
    assert ["-d", "fd00:caf::1/128", "-p", "tcp", "--dport", "3180", *TAG, "-j",
            "RETURN"] in into
    assert ["-p", "ipv6-icmp", "--icmpv6-type", "neighbour-solicitation", *TAG, "-j",
            "RETURN"] in into
    assert into[-1][-1] == "icmp6-adm-prohibited"
    # No IPv4 address in the IPv6 rules, and the other way round.
    assert not any("10.255.255.53/32" in rule for rule in out + into)
    assert not any("fd00::53/128" in rule for rule in f.rules(4)[0])
    assert any(c.startswith("ip6tables -w -A CAPSULE-IN-capsule0") for c in f.commands())
    assert fence().families() == [4]


def test_the_commands_for_an_operator():
    commands = fence().commands()
    assert commands[0] == ("iptables -w -N CAPSULE-OUT-capsule0 2>/dev/null;"
                           " iptables -w -F CAPSULE-OUT-capsule0")
    assert commands[-1] == (
        "iptables -w -C INPUT -i capsule0 -m comment --comment capsule -j CAPSULE-IN-capsule0"
        " 2>/dev/null || iptables -w -I INPUT 1 -i capsule0 -m comment --comment capsule -j"
        " CAPSULE-IN-capsule0")
    assert removal_commands("capsule0") == [
        ["iptables", "-w", "-D", "DOCKER-USER", "-i", "capsule0", *TAG, "-j",
         "CAPSULE-OUT-capsule0"],
        ["iptables", "-w", "-D", "FORWARD", "-i", "capsule0", *TAG, "-j",
         "CAPSULE-OUT-capsule0"],
        ["iptables", "-w", "-D", "INPUT", "-i", "capsule0", *TAG, "-j", "CAPSULE-IN-capsule0"],
        ["iptables", "-w", "-F", "CAPSULE-OUT-capsule0"],
        ["iptables", "-w", "-X", "CAPSULE-OUT-capsule0"],
        ["iptables", "-w", "-F", "CAPSULE-IN-capsule0"],
        ["iptables", "-w", "-X", "CAPSULE-IN-capsule0"]]


# -- applying them -------------------------------------------------------------------------


class FakeIptables:
    """
    An iptables that keeps the rules of the chains it is given, and fails
    every call with C{fail} when set.
    """

    def __init__(self, fail=None):
        self.fail = fail
        self.calls = []
        self.restored = []
        self.rules = {"DOCKER-USER": [["-j", "RETURN"]], "INPUT": []}

    async def __call__(self, argv, stdin=None):
        self.calls.append(argv)
        if self.fail is not None:
            return self.fail
        if argv[0].endswith("-restore"):
            self.restored.append(stdin.decode())
            return 0, "", ""
        op, chain, rule = argv[2], argv[3], argv[4:]
        if op == "-S":
            return (0, "", "") if chain in self.rules else (
                1, "", "iptables: No chain/target/match by that name.")
        if op == "-C":
            return (0, "", "") if rule in self.rules[chain] else (
                1, "", "iptables: Bad rule (does a matching rule exist in that chain?).")
        if op == "-I":
            self.rules[chain].insert(int(rule[0]) - 1, rule[1:])
            return 0, "", ""
        raise AssertionError(argv)


def firewall(mode="auto", iptables=None, here=True, **kw):
    kw.setdefault("nameservers", ("10.255.255.53",))
    return Firewall(Clock(), mode, door_port=3180, run=iptables or FakeIptables(),
                    bridge_here=lambda name: here, **kw)


@pytest_twisted.ensureDeferred
async def test_applying_twice_inserts_the_jumps_once(logged):
    iptables = FakeIptables()
    fw = firewall(iptables=iptables)
    for _ in range(2):
        await fw.fence("capsule", "capsule0", SUBNETS, ["172.18.0.1"])
    # The chains are replaced each time (the same rules), the jumps go
    # first in their chains, once, before Docker's return.
    assert iptables.restored == [fence().restore_input()] * 2
    assert iptables.calls[0] == ["iptables-restore", "-w", "10", "--noflush"]
    assert iptables.rules == {
        "DOCKER-USER": [["-i", "capsule0", *TAG, "-j", "CAPSULE-OUT-capsule0"], ["-j", "RETURN"]],
        "INPUT": [["-i", "capsule0", *TAG, "-j", "CAPSULE-IN-capsule0"]]}
    assert iptables.calls[1] == ["iptables", "-w", "-S", "DOCKER-USER"]
    assert [c for c in iptables.calls if c[2] == "-I"] == [
        ["iptables", "-w", "-I", "DOCKER-USER", "1", "-i", "capsule0", *TAG, "-j",
         "CAPSULE-OUT-capsule0"],
        ["iptables", "-w", "-I", "INPUT", "1", "-i", "capsule0", *TAG, "-j",
         "CAPSULE-IN-capsule0"]]
    assert fw.health() == {"mode": "auto", "bridges": {"capsule0": "fenced"}, "problem": None}
    assert fw.refusal is None and texts(logged, "warn") == texts(logged, "critical") == []
    assert any("the firewall fences the sessions on capsule (bridge capsule0)" in t
               for t in texts(logged, "info"))


@pytest_twisted.ensureDeferred
async def test_without_dockers_chain_the_jump_goes_into_forward():
    # Docker manages no rules of the family (ip6tables off, iptables=false).
    iptables = FakeIptables()
    iptables.rules = {"FORWARD": [], "INPUT": []}
    fw = firewall(iptables=iptables)
    await fw.fence("capsule", "capsule0", SUBNETS, ["172.18.0.1"])
    assert iptables.rules["FORWARD"] == [["-i", "capsule0", *TAG, "-j", "CAPSULE-OUT-capsule0"]]
    assert fw.health()["bridges"] == {"capsule0": "fenced"}


@pytest_twisted.ensureDeferred
async def test_each_bridge_gets_its_own_chains():
    iptables = FakeIptables()
    fw = firewall(iptables=iptables)
    await fw.fence("capsule", "capsule0", SUBNETS, ["172.18.0.1"])
    await fw.fence("capsule-fenced", "capsule1", ["172.19.0.0/16"], ["172.19.0.1"])
    assert [rule[-1] for rule in iptables.rules["DOCKER-USER"]] == [
        "CAPSULE-OUT-capsule1", "CAPSULE-OUT-capsule0", "RETURN"]
    assert fw.health()["bridges"] == {"capsule0": "fenced", "capsule1": "fenced"}


DENIED = (4, "", "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id:"
                 " Permission denied (you must be root)\n")


@pytest_twisted.ensureDeferred
async def test_auto_without_the_right_warns_loudly_with_the_commands(logged):
    fw = firewall(iptables=FakeIptables(fail=DENIED))
    await fw.fence("capsule", "capsule0", SUBNETS, ["172.18.0.1"])
    assert fw.refusal is None
    problem = ("capsule could not fence the sessions on capsule (bridge capsule0):"
               " iptables-restore failed: iptables v1.8.9 (nf_tables): Could not fetch rule set"
               " generation id: Permission denied (you must be root)")
    assert fw.health() == {"mode": "auto", "bridges": {"capsule0": "open"}, "problem": problem}
    [loud] = texts(logged, "critical")
    assert loud.startswith(f"SESSIONS ARE NOT FENCED: {problem}. They can reach the cloud"
                           " metadata service")
    for command in fence().commands():
        assert command in loud


@pytest_twisted.ensureDeferred
async def test_manage_refuses_to_start_when_it_cannot(logged):
    fw = firewall("manage", iptables=FakeIptables(fail=(127, "", "iptables is not installed"
                                                              " here")))
    await fw.fence("capsule", "capsule0", SUBNETS, ["172.18.0.1"])
    assert fw.refusal.startswith(
        "capsule could not fence the sessions on capsule (bridge capsule0): iptables-restore"
        " failed: iptables is not installed here. --firewall manage needs iptables")
    assert texts(logged, "critical") == []


@pytest_twisted.ensureDeferred
async def test_a_bridge_that_is_not_on_this_host_is_not_fenced_here():
    # capsule in a container of its own network namespace, or the engine
    # elsewhere: iptables here would change nothing the sessions meet.
    iptables = FakeIptables()
    fw = firewall("manage", iptables=iptables, here=False)
    await fw.fence("capsule", "capsule0", SUBNETS, ["172.18.0.1"])
    assert iptables.calls == []
    assert "this host has no bridge capsule0" in fw.refusal


def test_manage_stops_capsule_before_any_session():
    docker, clock = FakeDockerAPI(), Clock()
    spec = ContainerSpec(image="capsule-runtime:latest", network="capsule")
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", pool_size=1))
    fw = firewall("manage", iptables=FakeIptables(fail=DENIED))
    refused = []
    sessions = SessionService(manager, clock, network=SessionNetwork(docker, clock, firewall=fw),
                              refuse=refused.append)
    sessions.startService()
    [message] = refused
    assert message.startswith("capsule could not fence the sessions on capsule (bridge"
                              " capsule0)")
    assert docker.containers == {}
    sessions.stopService()


@pytest_twisted.ensureDeferred
async def test_health_says_whether_the_sessions_are_fenced(tmp_path):
    (tmp_path / "index.html").write_text("<html></html>")
    docker = FakeDockerAPI()
    manager = SessionManager(docker, Clock(), SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest"), instance="t"))
    fw = firewall(iptables=FakeIptables(fail=DENIED))
    site = make_site(manager, docker, MemoryReactorClock(), str(tmp_path), firewall=fw)
    await fw.fence("capsule", "capsule0", SUBNETS, ["172.18.0.1"])
    response = ask(site, "GET", "/health", (), peer=IPv4Address("TCP", "127.0.0.1", 40000))
    # A warning, not a reason for a balancer to send users elsewhere.
    assert (response.status, response.json()["status"]) == (200, "ok")
    assert response.json()["firewall"] == fw.health()
    assert fw.health()["bridges"] == {"capsule0": "open"}


# -- the operator's own rules (--firewall off) ---------------------------------------------


def iptables_s(*docker_user, other=""):
    return ("-P INPUT ACCEPT\n-N DOCKER-USER\n"
            + "".join(f"-A DOCKER-USER {line}\n" for line in docker_user)
            + "-A DOCKER-USER -j RETURN\n" + other)


def test_no_rules_block_nothing():
    assert missing_blocks(iptables_s(), "capsule0", SUBNETS) == ALL_BLOCKED
    assert missing_blocks("", "capsule0", SUBNETS) == ALL_BLOCKED


def test_capsules_own_rules_block_everything():
    f = fence()
    jumps = [" ".join(rule) for chain, rule in f.jumps() if chain == "DOCKER-USER"]
    chains = "".join(f"{line}\n" for line in f.restore_input().splitlines()
                     if line.startswith("-A"))
    text = iptables_s(*jumps, other="-A INPUT -i capsule0 -m comment --comment capsule -j"
                                    " CAPSULE-IN-capsule0\n" + chains)
    assert missing_blocks(text, "capsule0", SUBNETS) == []
    # Another bridge is not fenced by them.
    assert missing_blocks(text, "capsule1", ["172.19.0.0/16"]) == ALL_BLOCKED


@pytest.mark.parametrize("line", [
    "-i capsule0 -d 169.254.0.0/16 -j REJECT --reject-with icmp-port-unreachable",
    "-i capsule+ -d 169.254.0.0/16 -j DROP",
    "-s 172.18.0.0/16 -d 169.254.0.0/16 -j DROP",
    "-s 172.16.0.0/12 -d 169.254.0.0/16 -m comment --comment mine -j DROP",
    "-d 169.254.0.0/16 -j DROP",
])
def test_rules_that_block_link_local(line):
    assert missing_blocks(iptables_s(line), "capsule0", SUBNETS) == ALL_BLOCKED[1:]


@pytest.mark.parametrize("line", [
    "-i docker0 -d 169.254.0.0/16 -j DROP",
    "-s 172.19.0.0/16 -d 169.254.0.0/16 -j DROP",
    "-i capsule0 -d 169.254.0.0/16 -j ACCEPT",
    "-i capsule0 -d 169.254.0.0/16 -p tcp -j DROP",
    "-i capsule0 -d 169.254.0.0/16 -m conntrack --ctstate NEW -j DROP",
    "-i capsule0 -d 169.254.169.254/32 -j DROP",
])
def test_rules_that_do_not_block_it(line):
    assert missing_blocks(iptables_s(line), "capsule0", SUBNETS) == ALL_BLOCKED


def test_refusing_all_the_bridges_traffic_blocks_every_range():
    text = iptables_s("-i capsule0 -j DROP", other="-A INPUT -i capsule0 -j REJECT\n")
    assert missing_blocks(text, "capsule0", SUBNETS) == []


def test_rules_after_dockers_return_are_never_reached():
    text = iptables_s() + "-A DOCKER-USER -i capsule0 -d 10.0.0.0/8 -j DROP\n"
    assert missing_blocks(text, "capsule0", SUBNETS) == ALL_BLOCKED
    # A conditional return (the DNS resolver let through) ends nothing.
    text = iptables_s("-i capsule0 -d 10.0.0.2/32 -p udp --dport 53 -j RETURN",
                      "-i capsule0 -d 10.0.0.0/8 -j DROP")
    assert "10.0.0.0/8" not in missing_blocks(text, "capsule0", SUBNETS)


@pytest_twisted.ensureDeferred
async def test_off_reads_and_warns_and_changes_nothing(logged):
    iptables = FakeIptables()

    async def run(argv, stdin=None):
        iptables.calls.append(argv)
        return 0, iptables_s(), ""
    fw = Firewall(Clock(), "off", door_port=3180, run=run, nameservers=(),
                  bridge_here=lambda name: True)
    await fw.fence("capsule", "capsule0", SUBNETS, ["172.18.0.1"])
    assert iptables.calls == [["iptables", "-w", "-S"]]
    assert fw.health()["bridges"] == {"capsule0": "open"}
    assert fw.health()["problem"].startswith(
        "the host firewall lets sessions on capsule (bridge capsule0) reach 169.254.0.0/16,")
    [warning] = texts(logged, "warn")
    assert "(--firewall off: the rules are yours). Add: iptables -w -N" in warning


@pytest_twisted.ensureDeferred
async def test_off_does_not_read_a_firewall_the_bridge_is_not_behind(logged):
    # capsule in a container of its own: its iptables are not the host's.
    iptables = FakeIptables()
    fw = firewall("off", iptables=iptables, here=False)
    await fw.fence("capsule", "capsule0", SUBNETS, ["172.18.0.1"])
    assert iptables.calls == []
    assert fw.health()["bridges"] == {"capsule0": "unknown"}
    [warning] = texts(logged, "warn")
    assert warning.startswith("could not check the host firewall for the network capsule"
                              " (this host has no bridge capsule0)")


# -- the host's name servers ---------------------------------------------------------------


def test_the_name_servers_of_resolv_conf(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# made by hand\nsearch example\nnameserver 10.255.255.53\n"
                      "nameserver 127.0.0.1\nnameserver fe80::1%eth0\nnameserver nonsense\n")
    assert read_nameservers([str(resolv)], str(tmp_path / "none.json")) == (
        "10.255.255.53", "fe80::1")


def test_systemd_resolveds_upstream_servers(tmp_path):
    stub, upstream = tmp_path / "stub", tmp_path / "upstream"
    stub.write_text("nameserver 127.0.0.53\n")
    upstream.write_text("nameserver 192.168.1.1\n")
    assert read_nameservers([str(stub), str(upstream)], str(tmp_path / "none.json")) == (
        "192.168.1.1",)
    assert read_nameservers([str(stub)], str(tmp_path / "none.json")) == ()


def test_the_engines_own_dns_setting_wins(tmp_path):
    resolv, daemon = tmp_path / "resolv.conf", tmp_path / "daemon.json"
    resolv.write_text("nameserver 10.0.0.2\n")
    daemon.write_text(json.dumps({"dns": ["10.1.1.1", "9.9.9.9"]}))
    assert read_nameservers([str(resolv)], str(daemon)) == ("10.1.1.1", "9.9.9.9")
    daemon.write_text("{not json")
    assert read_nameservers([str(resolv)], str(daemon)) == ("10.0.0.2",)


# -- running iptables ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_process_runner(tmp_path, monkeypatch):
    tool = tmp_path / "fake-iptables-restore"
    tool.write_text("#!/bin/sh\necho \"args: $*\"\n/bin/cat\necho oops >&2\nexit 3\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    run = process_runner(reactor)
    assert await run(["fake-iptables-restore", "--noflush"], b"*filter\nCOMMIT\n") == (
        3, "args: --noflush\n*filter\nCOMMIT\n", "oops\n")
    assert await run(["no-such-tool-here"]) == (127, "", "no-such-tool-here is not installed"
                                                          " here")


@pytest_twisted.ensureDeferred
async def test_an_iptables_that_hangs_is_killed(tmp_path, monkeypatch):
    tool = tmp_path / "iptables"
    tool.write_text("#!/bin/sh\nexec /bin/sleep 30\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(firewall_module, "IPTABLES_TIMEOUT", 0.2)
    assert await process_runner(reactor)(["iptables", "-S"]) == (
        124, "", "iptables did not answer within 0.2 s")


# -- the options ---------------------------------------------------------------------------


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options.config


def test_the_options():
    config = parse()
    assert (config.firewall, config.egress_allow_addresses) == ("auto", ())
    config = parse("--firewall", "manage", "--egress-allow-address", "10.0.0.5",
                   "--egress-allow-address", "192.168.1.7/24")
    assert config.firewall == "manage"
    assert config.egress_allow_addresses == ("10.0.0.5/32", "192.168.1.0/24")
    with pytest.raises(usage.UsageError, match="--firewall must be one of auto, manage, off"):
        parse("--firewall", "maybe")
    with pytest.raises(usage.UsageError, match="--egress-allow-address: not a CIDR"):
        parse("--egress-allow-address", "metadata")
