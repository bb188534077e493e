import pytest
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from capsule.tap import CapsuleService, Options, makeService


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults():
    options = parse()
    assert options["listen"] == ["tcp:3001"]
    assert options["image"] == "capsule-runtime:latest"
    assert (options["memory"], options["cpus"], options["pids"]) == ("4g", 2.0, 256)
    assert options["grace"] == 60.0


def test_listen_is_repeatable():
    options = parse("--listen", "tcp:3001", "-l", "tcp:3002:interface=127.0.0.1")
    assert options["listen"] == ["tcp:3001", "tcp:3002:interface=127.0.0.1"]


@pytest.mark.parametrize("args", [
    ["--memory", "lots"], ["--cpus", "0"], ["--pids", "-3"], ["--grace", "x"],
    ["--www", "/nonexistent"], ["--shell", ""],
])
def test_bad_options(args):
    with pytest.raises(usage.UsageError):
        parse(*args)


def test_service_tree():
    reactor = MemoryReactorClock()
    service = makeService(parse("-l", "tcp:0", "-l", "tcp:0:interface=127.0.0.1"), reactor)
    assert isinstance(service, CapsuleService)
    children = list(service)
    assert sum(isinstance(c, StreamServerEndpointService) for c in children) == 2
    assert sum(isinstance(c, TimerService) for c in children) == 1


def test_websocket_limits_reach_autobahn():
    reactor = MemoryReactorClock()
    service = makeService(parse("-l", "tcp:0", "--max-message-size", "1234",
                                "--ping-interval", "7", "--allowed-origin", "https://a.example"),
                          reactor)
    factory = service.websocket_factory
    assert factory.maxMessagePayloadSize == 1234 and factory.maxFramePayloadSize == 1234
    assert factory.failByDrop is False
    assert factory.autoPingInterval == 7
    assert factory.origin_allowed("https://a.example", "capsule.example")
    assert not factory.origin_allowed("https://b.example", "capsule.example")
    assert factory.origin_allowed("http://capsule.example", "capsule.example")
