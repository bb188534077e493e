"""
Container hardening and the sessions' network, without an engine: the
options, what a L{ContainerSpec} asks of Docker, the capsule network made at
start, and the check of the host firewall.
"""


import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.python import usage

from capsule.core.spec import SUDO_CAPABILITIES, ContainerSpec
from capsule.engine.docker import READ_ONLY_TMPFS, READ_ONLY_VOLUMES, DockerAPI
from capsule.engine.firewall import Firewall
from capsule.engine.network import NETWORK_LABELS, NETWORK_OPTIONS, SessionNetwork
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.services import SessionService
from capsule.tap import Options, makeService
from tests.support.fakes import FakeDockerAPI


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def texts(events, level=None):
    return [formatEvent(e) for e in events
            if level is None or e.get("log_level") is not None and e["log_level"].name == level]


# -- options -------------------------------------------------------------------------------

def test_option_defaults():
    options = parse()
    assert options["network"] == "capsule"
    assert options["cap-add"] == []
    assert (options["allow-sudo"], options["read-only-root"], options["runtime"]) == (0, 0, None)


def test_cap_add_is_repeatable_and_normalised():
    options = parse("--cap-add", "cap_net_bind_service", "--cap-add", "SYS_PTRACE")
    assert options["cap-add"] == ["NET_BIND_SERVICE", "SYS_PTRACE"]


@pytest.mark.parametrize("args", [["--cap-add", "net bind"], ["--cap-add", ""],
                                  ["--network", " "]])
def test_bad_hardening_options(args):
    with pytest.raises(usage.UsageError):
        parse(*args)


def test_the_options_reach_the_container_spec():
    service = makeService(parse("--network", "none", "--allow-sudo", "--read-only-root",
                                "--runtime", "runsc", "--cap-add", "SYS_PTRACE"),
                          MemoryReactorClock())
    spec = service.manager.config.spec
    assert (spec.network, spec.allow_sudo, spec.read_only_root, spec.runtime, spec.cap_add) == (
        "none", True, True, "runsc", ("SYS_PTRACE",))
    assert service.sessions.network.name == "none"
    spec = makeService(parse(), MemoryReactorClock()).manager.config.spec
    assert (spec.network, spec.allow_sudo, spec.read_only_root, spec.runtime, spec.cap_add) == (
        "capsule", False, False, None, ())


# -- what a spec asks of Docker ------------------------------------------------------------

class RecordingClient:
    """
    The two docker-py calls of a container's creation, recorded.
    """

    def create_host_config(self, **kwargs):
        self.host_config = kwargs
        return {"host": "config"}

    def create_container(self, image, **kwargs):
        self.container = kwargs
        return {"Id": "c1"}


def created(spec):
    client = RecordingClient()
    DockerAPI._thd_create(client, "s1", spec, False)
    return client.host_config, client.container


def test_default_spec_drops_every_capability_and_privilege_gain():
    host, container = created(ContainerSpec(image="i", network="capsule"))
    assert host["cap_drop"] == ["ALL"]
    assert host["cap_add"] is None
    assert host["security_opt"] == ["no-new-privileges:true"]
    assert host["group_add"] is None
    assert host["network_mode"] == "capsule"
    assert (host["read_only"], host["tmpfs"], host["runtime"]) == (None, None, None)
    assert (host["pids_limit"], host["mem_limit"], host["init"]) == (256, "4g", True)
    assert container["volumes"] is None
    assert container["user"] == "developer"


def test_allow_sudo_gives_back_roots_capabilities_and_the_sudo_group():
    spec = ContainerSpec(image="i", allow_sudo=True, cap_add=("SYS_PTRACE", "CHOWN"))
    host, _ = created(spec)
    assert host["cap_drop"] == ["ALL"]
    assert host["cap_add"] == [*SUDO_CAPABILITIES, "SYS_PTRACE"]
    assert "NET_RAW" not in host["cap_add"] and "MKNOD" not in host["cap_add"]
    assert host["security_opt"] is None
    assert host["group_add"] == ["capsule-sudo"]


def test_read_only_root_runtime_and_no_network():
    spec = ContainerSpec(image="i", read_only_root=True, runtime="runsc", network="none",
                         cap_add=("NET_BIND_SERVICE",))
    host, container = created(spec)
    assert host["read_only"] is True
    assert host["tmpfs"] == READ_ONLY_TMPFS
    assert "exec" in READ_ONLY_TMPFS["/tmp"].split(",")
    assert container["volumes"] == list(READ_ONLY_VOLUMES) == ["/workspace", "/home/developer"]
    assert host["runtime"] == "runsc"
    assert host["network_mode"] == "none"
    assert host["cap_add"] == ["NET_BIND_SERVICE"]
    assert host["security_opt"] == ["no-new-privileges:true"]


def test_warm_containers_are_made_by_the_same_spec():
    docker, clock = FakeDockerAPI(), Clock()
    spec = ContainerSpec(image="capsule-runtime:latest", network="capsule", read_only_root=True)
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", pool_size=1))
    manager.pool.start()
    [warm] = docker.containers.values()
    assert warm["spec"].network == "capsule" and warm["spec"].read_only_root is True
    assert warm["spec"].capabilities() == []


# -- the firewall rules --------------------------------------------------------------------

# -- the network at start ------------------------------------------------------------------

DOCKER_ONLY = "-N DOCKER-USER\n-A DOCKER-USER -j RETURN\n"


def network(docker, name="capsule", answer=(0, DOCKER_ONLY, "")):
    """
    The sessions' network, its firewall checked (--firewall off) with an
    iptables that answers C{answer}; C{net.reads} counts the readings.
    """
    reads = []

    async def run(argv, stdin=None):
        reads.append(argv)
        return answer
    firewall = Firewall(Clock(), "off", door_port=3180, run=run, nameservers=(),
                        bridge_here=lambda name: True)
    net = SessionNetwork(docker, Clock(), name, firewall=firewall)
    net.reads = reads
    return net


@pytest_twisted.ensureDeferred
async def test_the_capsule_network_is_created_once_and_the_firewall_read_once(logged):
    docker = FakeDockerAPI()
    net = network(docker)
    await net.ensure()
    await net.ensure()
    made = docker.networks["capsule"]
    assert (made["options"], made["labels"]) == (NETWORK_OPTIONS, NETWORK_LABELS)
    assert NETWORK_OPTIONS["com.docker.network.bridge.enable_icc"] == "false"
    assert net.reads == [["iptables", "-w", "-S"]]
    [warning] = texts(logged, "warn")
    assert warning.startswith(
        "the host firewall lets sessions on capsule (bridge capsule0) reach 169.254.0.0/16"
        " (link-local: the cloud metadata service), 10.0.0.0/8 (a private range),"
        " 172.16.0.0/12 (a private range), 192.168.0.0/16 (a private range), 100.64.0.0/10"
        " (the shared address space (carrier-grade NAT)), the host (its own services)"
        " (--firewall off: the rules are yours). Add: iptables -w -N CAPSULE-OUT-capsule0")
    assert any("created the network capsule" in t for t in texts(logged, "info"))


@pytest_twisted.ensureDeferred
async def test_a_firewall_with_the_rules_is_not_warned_about(logged):
    fence = Firewall(Clock(), "off", door_port=3180, nameservers=()).make_fence(
        "capsule0", ["172.18.0.0/16"], ["172.18.0.1"])
    # As iptables -S prints them: the jumps were inserted before Docker's return.
    lines = [f"-A {chain} {' '.join(rule)}" for chain, rule in fence.jumps()]
    lines += [line for line in fence.restore_input().splitlines() if line.startswith("-A")]
    net = network(FakeDockerAPI(), answer=(0, "\n".join(lines) + "\n" + DOCKER_ONLY, ""))
    await net.ensure()
    assert texts(logged, "warn") == []


@pytest_twisted.ensureDeferred
async def test_a_firewall_capsule_cannot_read(logged):
    net = network(FakeDockerAPI(), answer=(127, "", "iptables is not installed here"))
    await net.ensure()
    [warning] = texts(logged, "warn")
    assert warning.startswith("could not check the host firewall for the network capsule"
                              " (iptables is not installed here)")


@pytest_twisted.ensureDeferred
async def test_a_network_of_the_operators_with_traffic_between_containers(logged):
    docker = FakeDockerAPI()
    await docker.ensure_network("shared", {}, {})
    net = network(docker, "shared")
    await net.ensure()
    warnings = texts(logged, "warn")
    assert warnings[0].startswith("the network shared lets its containers reach each other")
    assert "bridge br-network0" in warnings[1]
    assert sorted(docker.networks) == ["shared"]


@pytest_twisted.ensureDeferred
async def test_a_missing_network_of_the_operators_is_not_created(logged):
    docker = FakeDockerAPI()
    net = network(docker, "elsewhere")
    await net.ensure()
    assert docker.networks == {} and net.reads == []
    assert texts(logged, "warn") == [
        "there is no Docker network elsewhere (--network elsewhere): sessions cannot start"
        " until it exists (docker network create ...)"]


@pytest_twisted.ensureDeferred
async def test_the_hosts_network_is_warned_about(logged):
    docker = FakeDockerAPI()
    docker.networks["host"] = {"id": "h" * 64, "name": "host", "driver": "host", "options": {},
                               "labels": {}, "subnets": [], "gateways": []}
    net = network(docker, "host")
    await net.ensure()
    assert net.reads == []
    assert texts(logged, "warn") == [
        "sessions share the host's network (--network host): they can reach capsule and every"
        " service of the host, on loopback too"]


@pytest_twisted.ensureDeferred
async def test_no_network_asks_nothing():
    docker = FakeDockerAPI()
    docker.reachable = False
    net = network(docker, "none")
    await net.ensure()
    assert net.ready and net.reads == []


def test_the_network_is_made_before_recovery_and_the_pool(logged):
    docker, clock = FakeDockerAPI(), Clock()
    docker.reachable = False
    spec = ContainerSpec(image="capsule-runtime:latest", network="capsule")
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", pool_size=1))
    net = network(docker)
    sessions = SessionService(manager, clock, network=net)
    sessions.startService()
    assert docker.networks == {} and docker.containers == {}
    docker.reachable = True
    clock.advance(SessionService.RECOVERY_RETRY)
    assert list(docker.networks) == ["capsule"] and net.ready
    [warm] = docker.containers.values()
    assert warm["spec"].network == "capsule"
    sessions.stopService()
