"""
Ports found, not typed (issue 23): the keeper's C{P} frame parsed as the
hostile input it is, capsule's own ports left out, the session's
C{listening_ports} told to its observers and its client, the WebSocket's
C{ports} message and C{GET /api/sessions/{id}/ports}: all in memory, and
not one Docker call for any of it.
"""

from __future__ import annotations

import struct

import pytest

from capsule.core.keeper import (MAX_PORTS, RELAY_FRAMES, FrameError, FrameReader,
                                 ListeningPorts, own_ports, parse_ports)
from capsule.core.protocol import encode_ports
from capsule.core.spec import ContainerSpec
from capsule.sessions.observers import SessionObserver
from capsule.web.ports import PortAddresses
from capsule.web.websocket_factory import CapsuleServerFactory
from tests.support.fakes import RecordingClient

from .in_memory import SPEC, Link, clock, docker, make_manager  # noqa: F401 (fixtures)
from .test_api import ALICE, BOB, Api, authed, www  # noqa: F401 (fixtures)


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def ports_frame(*ports: int, more: int = 0) -> bytes:
    return frame(b"P", struct.pack(f">H{len(ports)}H", more, *ports))


# -- the frame -----------------------------------------------------------------------------

def test_a_ports_frame_is_parsed():
    assert parse_ports(struct.pack(">HHH", 0, 3000, 8080)) == (ListeningPorts((3000, 8080)),
                                                               None)
    assert parse_ports(b"\x00\x00") == (ListeningPorts(), None)
    assert parse_ports(struct.pack(">HH", 7, 22)) == (ListeningPorts((22,), 7), None)


@pytest.mark.parametrize("payload, kept, said", [
    (struct.pack(">HHH", 0, 0, 3000), (3000,), "port 0"),
    (struct.pack(">HHH", 0, 8080, 3000), (3000, 8080), "out of order"),
    (struct.pack(">HHH", 0, 3000, 3000), (3000,), "twice"),
    (b"\x00\x00\x0b", (), "3 bytes"),
    (b"", (), "0 bytes"),
    (struct.pack(f">H{MAX_PORTS + 1}H", 0, *range(1, MAX_PORTS + 2)), (),
     f"{2 * MAX_PORTS + 4} bytes"),
])
def test_what_no_keeper_sends_is_not_believed(payload, kept, said):
    found, problem = parse_ports(payload)
    assert found.ports == kept and said in problem


def test_a_ports_frame_past_its_bound_breaks_the_stream():
    reader = FrameReader(RELAY_FRAMES)
    assert reader.feed(ports_frame(*range(1, MAX_PORTS + 1))) == [
        (b"P", struct.pack(f">H{MAX_PORTS}H", 0, *range(1, MAX_PORTS + 1)))]
    with pytest.raises(FrameError):
        reader.feed(b"P" + struct.pack(">I", 2 + 2 * MAX_PORTS + 2))
    with pytest.raises(FrameError):
        FrameReader(RELAY_FRAMES).feed(frame(b"P", b""))


def test_capsule_s_own_ports():
    assert own_ports(None, 3180) == {7422}
    assert own_ports("capsule", 3180) == {7422}
    assert own_ports("none", 3180) == {3180}
    assert own_ports("none", 0) == frozenset()


# -- the session ---------------------------------------------------------------------------

class Counting:
    """
    Counts every call made on the engine from the moment it is wrapped.
    """

    def __init__(self, docker) -> None:
        self.calls: list[str] = []
        for name in dir(type(docker)):
            method = getattr(docker, name)
            if name.startswith("_") or not callable(method):
                continue
            setattr(docker, name, self._counted(name, method))

    def _counted(self, name, method):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return method(*args, **kwargs)
        return counted


class PortsObserver(SessionObserver):
    def __init__(self) -> None:
        self.heard: list[tuple[int, ...]] = []

    def session_ports(self, session) -> None:
        self.heard.append(session.listening_ports)


class PortsClient(RecordingClient):
    def session_ports(self, session) -> None:
        self.events.append(("ports", session.listening_ports))


def test_the_session_holds_its_ports_and_tells_once_per_change(docker, clock):
    observer = PortsObserver()
    manager = make_manager(docker, clock, door_port=3180)
    manager.observers._observers.append(observer)
    client = PortsClient()
    session = manager.create(client, 80, 24)
    assert (session.ports_known, session.listening_ports) == (False, ())
    protocol = docker.processes[0].process_protocol
    engine = Counting(docker)
    # The keeper's direct port is capsule's; the door's port is the
    # session's when it has a network of its own.
    protocol.childDataReceived(1, ports_frame(3000, 3180, 7422))
    assert (session.ports_known, session.listening_ports) == (True, (3000, 3180))
    protocol.childDataReceived(1, ports_frame(3000, 3180, 7422))
    protocol.childDataReceived(1, ports_frame(3000, 3180))
    protocol.childDataReceived(1, ports_frame())
    assert observer.heard == [(3000, 3180), ()]
    assert [e for e in client.events if e[0] == "ports"] == [("ports", (3000, 3180)),
                                                             ("ports", ())]
    # No Docker call for any of it.
    assert engine.calls == []
    assert session.status() == "running"


def test_without_a_network_the_door_s_port_is_capsule_s(docker, clock):
    from dataclasses import replace
    manager = make_manager(docker, clock, door_port=3180)
    manager.config = replace(manager.config, spec=replace(SPEC, network="none"))
    from capsule.sessions.session import shell_profile
    manager.profiles["shell"] = shell_profile(manager.config)
    session = manager.create(RecordingClient(), 80, 24)
    docker.processes[0].process_protocol.childDataReceived(1, ports_frame(3000, 3180, 7422))
    assert session.listening_ports == (3000, 7422)


def test_bad_ports_are_ignored_and_logged_at_a_bounded_rate(docker, clock, logged):
    manager = make_manager(docker, clock)
    session = manager.create(RecordingClient(), 80, 24)
    protocol = docker.processes[0].process_protocol
    for _ in range(50):
        protocol.childDataReceived(1, frame(b"P", struct.pack(">HHH", 0, 0, 3000)))
        protocol.childDataReceived(1, frame(b"P", b"\x00\x00\x01"))
    assert session.listening_ports == () and session.ports_known
    said = [e for e in logged if e.get("session_id") == session.id[:8] and e.get("problem")]
    assert len(said) == 1 and "ignored" in said[0]["log_format"]
    assert session.status() == "running"
    protocol.childDataReceived(1, ports_frame(3000))
    assert session.listening_ports == (3000,)


def test_a_warm_session_tells_nobody_until_taken(docker, clock):
    observer = PortsObserver()
    manager = make_manager(docker, clock)
    manager.observers._observers.append(observer)
    session = manager.create(RecordingClient(), 80, 24)
    session.pooled = True
    docker.processes[0].process_protocol.childDataReceived(1, ports_frame(3000))
    assert session.listening_ports == (3000,) and observer.heard == []


# -- the WebSocket -------------------------------------------------------------------------

def test_the_owner_s_page_hears_the_ports_as_they_change_and_as_it_attaches(docker, clock):
    manager = make_manager(docker, clock)
    factory = CapsuleServerFactory(manager, clock,
                                   port_addresses=PortAddresses("https://capsule.example"))
    link = Link(clock, factory, binary=True)
    link.send({"type": "resize", "cols": 80, "rows": 24})
    [session] = manager.sessions.values()
    link.new()
    docker.processes[0].process_protocol.childDataReceived(1, ports_frame(3000))
    link.flush()
    url = f"https://capsule.example/preview/{session.id}/3000/"
    assert link.new() == [{"type": "ports", "more": 0,
                           "ports": [{"port": 3000, "url": url, "public": False}]}]
    link.close()
    again = Link(clock, factory, f"session_id={session.id}", binary=True)
    clock.advance(0)
    again.flush()
    kinds = [m.get("type") for m in again.new() if isinstance(m, dict)]
    assert kinds[:2] == ["connected", "ports"]


def test_the_ports_message_is_a_small_json_text_frame():
    assert encode_ports([{"port": 3000, "url": "/preview/x/3000/", "public": False}], 2) == (
        b'{"type":"ports","ports":[{"port":3000,"url":"/preview/x/3000/","public":false}],'
        b'"more":2}')


# -- the API -------------------------------------------------------------------------------

def test_the_api_lists_the_ports_with_their_preview_urls(authed):
    session = authed.create(token=ALICE)
    sid = session["id"]
    status, _, body = authed.request(f"/api/sessions/{sid}/ports", token=ALICE)
    assert (status, body) == (200, {"session": sid, "ports": [], "known": False, "more": 0})
    protocol = authed.docker.processes[0].process_protocol
    engine = Counting(authed.docker)
    protocol.childDataReceived(1, ports_frame(3000, 7422, more=3))
    status, _, body = authed.request(f"/api/sessions/{sid}/ports", token=ALICE)
    assert status == 200 and engine.calls == []
    assert body == {"session": sid, "known": True, "more": 3, "ports": [
        {"port": 3000, "public": False,
         "url": f"https://capsule.example/preview/{sid}/3000/"}]}
    # Another user's session is a 404, as a missing one; nobody's a 401.
    status, _, body = authed.request(f"/api/sessions/{sid}/ports", token=BOB)
    assert (status, body["code"]) == (404, "session_not_found")
    status, _, _ = authed.request(f"/api/sessions/{sid}/ports")
    assert status == 401
    # A port is the preview's (PUT public, its links), never a GET.
    status, _, body = authed.request(f"/api/sessions/{sid}/ports/3000", token=ALICE)
    assert (status, body["code"]) == (405, "method_not_allowed")
    status, headers, body = authed.request(f"/api/sessions/{sid}/ports", "POST", {},
                                           token=ALICE)
    assert (status, headers["allow"]) == (405, "GET")


def test_under_a_preview_domain_a_port_has_its_own_host(www):
    from capsule.web.site import make_site
    api = Api(www)
    api.site = make_site(api.manager, api.docker, api.reactor, str(www),
                         public_url="https://capsule.example", preview_domain="preview.example")
    sid = api.create()["id"]
    api.docker.processes[0].process_protocol.childDataReceived(1, ports_frame(3000))
    status, _, body = api.request(f"/api/sessions/{sid}/ports")
    assert body["ports"] == [{"port": 3000, "public": False,
                              "url": f"https://3000-{sid}.preview.example/"}]


def test_without_a_public_url_the_request_s_host_is_used():
    addresses = PortAddresses()
    assert addresses.base(False, "box:3001") == "http://box:3001"
    assert addresses.base(True, "box") == "https://box"
    assert addresses.base(False, None) == ""


def test_a_session_without_ports_says_nothing_of_them(docker, clock):
    # A connection starts knowing of no port: a keeper's first word that
    # nothing listens is not sent (clients older than ports never hear of
    # them unless a port opens), a port that closes again is.
    manager = make_manager(docker, clock)
    factory = CapsuleServerFactory(manager, clock,
                                   port_addresses=PortAddresses("https://capsule.example"))
    link = Link(clock, factory, binary=True)
    link.send({"type": "resize", "cols": 80, "rows": 24})
    [session] = manager.sessions.values()
    link.new()
    protocol = docker.processes[0].process_protocol
    protocol.childDataReceived(1, ports_frame())
    link.flush()
    assert session.ports_known and link.new() == []
    protocol.childDataReceived(1, ports_frame(3000))
    protocol.childDataReceived(1, ports_frame())
    link.flush()
    assert [m["ports"] for m in link.new() if isinstance(m, dict)] == [
        [{"port": 3000, "url": f"https://capsule.example/preview/{session.id}/3000/",
          "public": False}], []]
    link.close()
    again = Link(clock, factory, f"session_id={session.id}", binary=True)
    clock.advance(0)
    again.flush()
    assert [m.get("type") for m in again.new() if isinstance(m, dict)] == ["connected"]
