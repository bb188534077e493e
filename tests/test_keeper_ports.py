"""
capsule-keeper's C{P} frames (docker/keeper/capsule-keeper.c), compiled for
this machine and run without Docker (tests/keeper_harness.py): the ports in
the LISTEN state of the socket table it reads (here the machine's own
network namespace, in a session its container's), sent once after the
preamble and again whenever they change.  Only the ports the test opens
itself are asserted on: the machine's others come and go.
"""

import socket
import subprocess

import pytest

from capsule.core.keeper import MAX_PORTS
from tests.keeper_harness import (  # noqa: F401 (fixtures)
    CC, CFLAGS, SOURCE, Keeper, Relay, keeper, relay)


def listening(family=socket.AF_INET, host="127.0.0.1") -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(1)
    return s


def test_a_port_is_told_as_it_opens_and_as_it_closes(relay):
    r = relay(["sh", "-c", "read x"])
    r.preamble()
    # The first frame after the preamble says the ports as they are.
    r.until_ports(lambda found: True)
    assert [kind for kind, _ in r.frames[:2]] == [b"o", b"P"]
    server = listening()
    port = server.getsockname()[1]
    r.until_ports(lambda found: port in found.ports)
    server.close()
    found = r.until_ports(lambda found: port not in found.ports)
    assert list(found.ports) == sorted(set(found.ports))


def test_ipv6_and_a_connected_socket(relay):
    r = relay(["sh", "-c", "read x"])
    r.preamble()
    server = listening(socket.AF_INET6, "::1")
    port = server.getsockname()[1]
    found = r.until_ports(lambda found: port in found.ports)
    # A connection to it is not a port of its own that listens.
    client = socket.create_connection(("::1", port))
    peer, _ = server.accept()
    local = client.getsockname()[1]
    server.close()
    found = r.until_ports(lambda found: port not in found.ports)
    assert local not in found.ports
    client.close()
    peer.close()


def test_past_the_bound_the_frame_counts_what_it_left_out(relay):
    r = relay(["sh", "-c", "read x"])
    r.preamble()
    servers = [listening() for _ in range(MAX_PORTS + 6)]
    try:
        found = r.until_ports(lambda found: found.more >= 6)
        assert len(found.ports) == MAX_PORTS
    finally:
        for s in servers:
            s.close()


def test_docker_s_dns_server_is_not_the_session_s(relay):
    """
    Docker's embedded DNS server listens in a container's namespace on
    127.0.0.11, on a port of its choosing.
    """
    r = relay(["sh", "-c", "read x"])
    r.preamble()
    dns, other = listening(host="127.0.0.11"), listening(host="127.0.0.12")
    try:
        found = r.until_ports(lambda found: other.getsockname()[1] in found.ports)
        assert dns.getsockname()[1] not in found.ports
    finally:
        dns.close()
        other.close()


def test_without_sock_diag_the_proc_tables_are_read(tmp_path):
    """
    A build that reads /proc/net/tcp and /proc/net/tcp6, as the keeper does
    where the kernel's sock_diag cannot be asked.
    """
    if CC is None:
        pytest.skip("no C compiler to build capsule-keeper")
    binary = tmp_path / "capsule-keeper-proc"
    subprocess.run([CC, *CFLAGS, "-O2", "-DPORTS_FROM_PROC", "-o", str(binary), str(SOURCE)],
                   check=True)
    (tmp_path / "logs").mkdir()
    r = Relay(Keeper(binary, False, tmp_path / "logs"), ["sh", "-c", "read x"])
    try:
        r.preamble()
        four, six = listening(), listening(socket.AF_INET6, "::1")
        dns = listening(host="127.0.0.11")
        ports = four.getsockname()[1], six.getsockname()[1]
        found = r.until_ports(lambda found: all(p in found.ports for p in ports))
        assert dns.getsockname()[1] not in found.ports
        for s in (four, six, dns):
            s.close()
        r.until_ports(lambda found: not any(p in found.ports for p in ports))
    finally:
        r.stop()
        r.kill_server()
