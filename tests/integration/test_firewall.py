"""
The fence around the session networks (capsule.engine.firewall), against a
real engine and the host's real iptables: capsule started with C{--firewall
manage} on a bridge network of the test's own (so that its rules meet no
other test's sessions), and from inside an C{open} session, the metadata
address, a private address and the host's own addresses are refused at
once, while the session door, DNS and a public registry are reached, and
capsule still reads the session over the keeper's direct TCP path.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import uuid
from dataclasses import dataclass

import pytest
from docker.types import IPAMConfig, IPAMPool

from capsule.core.keeper import DIRECT_PORT
from capsule.engine.firewall import chain_names, removal_commands

from .harness import (BlockingTerminal, CapsuleServer, docker_client, free_port,
                      remove_instance_containers, session_container, wait_for)
from .test_api import call, create, sh

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iptables", path="/usr/sbin:/sbin:/usr/bin") is None,
    reason="the firewall's tests need root and iptables")

# curl's exit codes: 7 could not connect (refused at once), 28 timed out.
REFUSED, TIMED_OUT = 7, 28


def iptables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)


@pytest.fixture(params=[False], ids=["ipv4"])
def fenced(request, tmp_path):
    """
    A bridge network of the test's own (no traffic between containers, as
    capsule's; with IPv6 too when the test's parameter says so), and
    C{start(*options)}, which starts capsule on it with C{--firewall
    manage}.  Afterwards the servers stop, their containers go, then
    capsule's rules for the network, then the network.
    """
    tag = uuid.uuid4().hex[:6]
    name, bridge = f"capsule-fwtest-{tag}", f"capfw{tag}"
    client = docker_client()
    ipv6 = {}
    if request.param:
        ipv6 = {"enable_ipv6": True, "ipam": IPAMConfig(pool_configs=[
            IPAMPool(subnet=f"fd00:{tag[:4]}:{tag[4:]}::/64")])}
    network = client.networks.create(name, driver="bridge", labels={"io.capsule.test": "firewall"},
                                     options={"com.docker.network.bridge.enable_icc": "false",
                                              "com.docker.network.bridge.name": bridge},
                                     **ipv6)
    servers = []

    # The claude profile is fenced (its egress is a list): on capsule's
    # shared fenced network, which this test must not fence with its own
    # door's port. Open here, nothing but the test's network is fenced.
    profiles = tmp_path / "open-profiles.toml"
    profiles.write_text('[profiles.claude]\negress = "open"\n')

    def start(*options):
        server = CapsuleServer(tmp_path, "--network", name, "--firewall", "manage",
                               "--pool-size", "0", "--profiles", str(profiles), *options)
        servers.append(server)
        return server.start()

    try:
        yield Fenced(name, bridge, start)
    finally:
        for server in servers:
            try:
                server.stop()
            finally:
                remove_instance_containers(server.instance)
        for argv in removal_commands(bridge, 4) + removal_commands(bridge, 6):
            subprocess.run(argv, capture_output=True)
        network.remove()


@dataclass
class Fenced:
    name: str
    bridge: str
    start: object

    @property
    def gateway(self) -> str:
        return docker_client().api.inspect_network(self.name)["IPAM"]["Config"][0]["Gateway"]


class Listener:
    """
    A TCP server on every address of the host (what a careless service of
    the host does), counting the connections it accepts.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.accepted = 0
        self._socket = socket.create_server(("0.0.0.0", self.port))
        self._socket.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                continue
            self.accepted += 1
            connection.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self._socket.close()


def curl(server, session_id: str, url: str, *options: str) -> tuple[int, str]:
    """
    C{curl} in the session: its exit code and what it printed.
    """
    answer = sh(server, session_id, f"curl -sS -m 3 {' '.join(options)} {url}")
    return answer["exit_code"], answer["stdout"] + answer["stderr"]


def host_address() -> str:
    """
    The address of this host's default route (eth0's).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.200", 9))
        return s.getsockname()[0]


def test_an_open_session_reaches_neither_metadata_private_ranges_nor_the_host(fenced):
    name, bridge, gateway = fenced.name, fenced.bridge, fenced.gateway
    door = free_port()
    server = fenced.start("--door-port", str(door))
    out_chain, in_chain = chain_names(bridge)
    rules = iptables("-S").stdout
    assert f"-A DOCKER-USER -i {bridge} -m comment --comment capsule -j {out_chain}" in rules
    assert f"-A INPUT -i {bridge} -m comment --comment capsule -j {in_chain}" in rules
    _, health = server.health()
    assert health["firewall"] == {"mode": "manage", "bridges": {bridge: "fenced"},
                                  "problem": None}

    session_id = create(server)["id"]
    listener = Listener()
    try:
        # The metadata service and a private address: refused at once (a
        # reset), not left to time out.
        for url in ("http://169.254.169.254/latest/meta-data/", "http://10.255.255.1/"):
            code, said = curl(server, session_id, url)
            assert code == REFUSED, (url, said)
        # The host itself, at the bridge's gateway and at its other
        # addresses, on a port a service of the host listens on.
        for address in (gateway, host_address(), "172.17.0.1"):
            code, said = curl(server, session_id, f"http://{address}:{listener.port}/")
            assert code == REFUSED, (address, said)
        assert listener.accepted == 0
    finally:
        listener.close()

    # The session door, on the gateway: reached (its 404 says what it is).
    code, said = curl(server, session_id, f"http://{gateway}:{door}/")
    assert code == 0 and "the session door" in said, said
    # DNS, through the host's name servers (private here), and a public
    # registry: the session is open.
    answer = sh(server, session_id, "getent hosts pypi.org")
    assert answer["exit_code"] == 0 and "pypi.org" in answer["stdout"], answer
    code, said = curl(server, session_id, "https://pypi.org/simple/pip/", "-k", "-m", "20",
                      "-o", "/dev/null", "-w", "'%{http_code}'")
    assert (code, said) == (0, "200"), said

    # capsule reads the session over the keeper's direct TCP path: the
    # keeper's replies to the host pass the INPUT rules.
    container = docker_client().api.inspect_container(session_container(session_id))
    address = container["NetworkSettings"]["Networks"][name]["IPAddress"]
    established = subprocess.run(
        ["ss", "-Htn", "state", "established", "dst", f"{address}:{DIRECT_PORT}"],
        capture_output=True, text=True).stdout
    assert established.strip(), "no direct connection to the keeper"
    # The terminal's stream comes that way: the keeper's replies pass.
    terminal = BlockingTerminal(server.ws_url, session_id)
    try:
        assert terminal.next("connected")["session_id"] == session_id
        terminal.run("echo still$((1+1))", "still2")
    finally:
        terminal.close()
    # And capsule's own port on loopback is untouched: the test talks to it.
    status, _ = call(server, f"/api/sessions/{session_id}", "DELETE")
    assert status in (200, 204)

    # Left in place when capsule stops (its sessions outlive it), and not
    # doubled when it starts again.
    server.stop()
    assert f"-j {out_chain}" in iptables("-S", "DOCKER-USER").stdout
    again = fenced.start("--door-port", str(door))
    wait_for(lambda: again.health()[1]["firewall"]["bridges"] == {bridge: "fenced"}, 30,
             "the firewall applied again")
    rules = iptables("-S").stdout.splitlines()
    assert sum(line.endswith(f"-j {out_chain}") for line in rules) == 1
    assert sum(line.endswith(f"-j {in_chain}") for line in rules) == 1


def test_the_operators_address_is_reached(fenced):
    listener = Listener()
    try:
        server = fenced.start("--door-port", "0", "--egress-allow-address",
                              f"{host_address()}/32")
        session_id = create(server)["id"]
        code, said = curl(server, session_id, f"http://{host_address()}:{listener.port}/")
        # The listener closes at once without an answer: curl got through.
        assert code != REFUSED, said
        wait_for(lambda: listener.accepted == 1, 10, "the connection accepted")
        # Only that address: the gateway is still refused.
        code, said = curl(server, session_id, f"http://{fenced.gateway}:{listener.port}/")
        assert code == REFUSED, said
    finally:
        listener.close()


@pytest.mark.parametrize("fenced", [True], ids=["ipv6"], indirect=True)
def test_ipv6_private_and_host_addresses_are_refused(fenced):
    server = fenced.start("--door-port", "0")
    session_id = create(server)["id"]
    container = docker_client().api.inspect_container(session_container(session_id))
    settings = container["NetworkSettings"]["Networks"][fenced.name]
    assert settings["GlobalIPv6Address"], settings
    gateway6 = settings["IPv6Gateway"]
    rules = subprocess.run(["ip6tables", "-w", "-S"], capture_output=True, text=True).stdout
    assert f"-i {fenced.bridge} -m comment --comment capsule -j CAPSULE-IN-{fenced.bridge}" \
        in rules
    listener = socket.create_server(("::", 0), family=socket.AF_INET6)
    try:
        port = listener.getsockname()[1]
        # The host's own link-local address on the bridge, too.
        link_local = subprocess.run(
            ["ip", "-6", "-o", "addr", "show", "dev", fenced.bridge, "scope", "link"],
            capture_output=True, text=True).stdout.split()[3].split("/")[0]
        for url in (f"http://[{gateway6}]:{port}/", "http://[fd12:3456::1]/",
                    f"http://[{link_local}%25eth0]:{port}/"):
            code, said = curl(server, session_id, url)
            # Refused; or, as the kernel rate-limits the ICMPv6 errors a
            # reject sends (net.ipv6.icmp.ratelimit), never answered: not
            # reached either way (an open port would answer).
            assert code in (REFUSED, TIMED_OUT), (url, said)
    finally:
        listener.close()
