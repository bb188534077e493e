"""
The session door (capsule.gateway.door): it listens on the host side of the
session networks only, once each, and closes on stop.
"""

from twisted.internet.testing import MemoryReactorClock
from twisted.web.server import Site

from capsule.gateway.door import DoorRoot, SessionDoor, door_url
from tests.support.httpclient import ask


def test_listens_on_each_address_once_and_closes_on_stop():
    reactor = MemoryReactorClock()
    door = SessionDoor(reactor, 3180, Site(DoorRoot()))
    door.startService()
    door.listen(["172.18.0.1"])
    door.listen(["172.18.0.1", "172.19.0.1"])
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (3180, "172.18.0.1"), (3180, "172.19.0.1")]
    assert door.addresses() == ["172.18.0.1", "172.19.0.1"]
    door.stopService()
    assert door.addresses() == []


def test_never_a_wildcard_address():
    reactor = MemoryReactorClock()
    door = SessionDoor(reactor, 3180, Site(DoorRoot()))
    door.startService()
    door.listen(["0.0.0.0", "::", "172.18.0.1"])
    assert [interface for *_, interface in reactor.tcpServers] == ["172.18.0.1"]


def test_root_says_what_it_serves():
    answer = ask(Site(DoorRoot()), "GET", "/anything/at/all")
    assert answer.status == 404 and answer.json()["code"] == "not_found"


def test_url():
    assert door_url("172.18.0.1", 3180) == "http://172.18.0.1:3180"
    assert door_url("fd00::1", 3180) == "http://[fd00::1]:3180"
