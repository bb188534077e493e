"""
Ports found, not typed (issue 23), against a real capsule, the real engine
and the session image's keeper: a server on port 3000 started in a session
is listed by C{GET /api/sessions/{id}/ports} and told to the owner's
WebSocket as a C{ports} message, and is gone from both once it exits; the
same for a session without a network, whose keeper is reached through a
relay exec.  Waits are polls, never timings.
"""

from __future__ import annotations

from tests.support.clients import BlockingTerminal

from .harness import wait_for
from .test_api import call
from .test_pool import pool_ready

# Listens on 3000 for a minute (the session image has perl, not python3).
SERVE_3000 = ("perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>3000,"
              "Listen=>5,ReuseAddr=>1) or die; sleep 60' &")


def ports_of(server, session_id: str) -> dict:
    status, body = call(server, f"/api/sessions/{session_id}/ports")
    assert status == 200, body
    return body


def ports_message(terminal: BlockingTerminal, check, what: str) -> dict:
    def found(frame):
        if isinstance(frame, dict) and frame.get("type") == "ports" and check(
                [entry["port"] for entry in frame["ports"]]):
            return frame
        return None
    return terminal._read_until(found, 30, what)


def served_and_gone(server) -> None:
    owner = BlockingTerminal(server.ws_url, binary=True)
    session_id = owner.start()
    owner.run("echo READY-$((6*7))", "READY-42")
    # A fresh session listens on nothing of its own (Docker's DNS server in
    # its namespace, the keeper's port and the door's are not its).
    body = wait_for(lambda: (lambda b: b if b["known"] else None)(ports_of(server, session_id)),
                    30, "the keeper's first word on the ports")
    assert body["ports"] == [], body
    owner.run(SERVE_3000 + " echo SERVING-$((6*7))", "SERVING-42")
    # The page hears it ...
    message = ports_message(owner, lambda ports: 3000 in ports, "port 3000 in a ports message")
    [entry] = [e for e in message["ports"] if e["port"] == 3000]
    assert entry["url"].endswith(f"/preview/{session_id}/3000/") and entry["public"] is False
    # ... and the API lists it, with none of capsule's own ports.
    body = wait_for(lambda: (lambda b: b if 3000 in [p["port"] for p in b["ports"]] else None)(
        ports_of(server, session_id)), 30, "port 3000 in the API's answer")
    assert body["known"] is True and body["more"] == 0
    assert entry["url"] == server.url + f"/preview/{session_id}/3000/"
    assert {p["port"] for p in body["ports"]}.isdisjoint({7422, 3180})
    # The server exits: the port is gone from both.
    owner.run("kill %1; wait; echo KILLED-$((6*7))", "KILLED-42")
    ports_message(owner, lambda ports: 3000 not in ports, "port 3000 gone")
    wait_for(lambda: 3000 not in [p["port"] for p in ports_of(server, session_id)["ports"]],
             30, "port 3000 gone from the API's answer")
    owner.close()


def test_a_port_that_opens_is_listed_and_goes_when_it_closes(make_server):
    served_and_gone(make_server("--pool-size", "0"))


def test_a_session_without_a_network_reports_its_ports(make_server):
    served_and_gone(make_server("--network", "none", "--pool-size", "0"))


def test_a_warm_session_s_ports_reach_its_first_client(make_server):
    """
    A warm session's keeper said its ports (none) before anyone took it:
    its first client's API knows them at once, and hears of a port that
    opens as in any session.
    """
    server = make_server("--pool-size", "1")
    wait_for(lambda: pool_ready(server) == 1, 60, "a warm session")
    served_and_gone(server)
