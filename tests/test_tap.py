import pytest
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent

from capsule.gateway.door import SessionDoor
from capsule.sessions.cleanup import CleanupService
from capsule.sessions.disk import DiskWatchService
from capsule.sessions.idle import IdleService
from capsule.core.spec import ContainerSpec
from capsule.core.errors import DockerUnavailable, SessionNotFound
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.tap import Options, makeService
from capsule.services import CapsuleService, DockerService, ListenerService, SessionService
from tests.support.fakes import FakeDockerAPI, RecordingClient


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults():
    options = parse()
    assert options["listen"] == ["tcp:3001:interface=127.0.0.1"]
    assert options["image"] == "capsule-runtime:latest"
    assert (options["memory"], options["cpus"], options["pids"]) == ("4g", 2.0, 256)
    assert options["grace"] == 60.0


def test_listen_is_repeatable():
    options = parse("--insecure-no-auth", "--listen", "tcp:3001",
                    "-l", "tcp:3002:interface=127.0.0.1")
    assert options["listen"] == ["tcp:3001", "tcp:3002:interface=127.0.0.1"]


@pytest.mark.parametrize("args", [
    ["--memory", "lots"], ["--cpus", "0"], ["--pids", "-3"], ["--grace", "x"],
    ["--www", "/nonexistent"], ["--shell", ""],
])
def test_bad_options(args):
    with pytest.raises(usage.UsageError):
        parse(*args)


def test_a_www_without_the_packages_its_page_names_is_refused(tmp_path):
    """
    An installed capsule whose www/ lacks npm's packages would serve a page
    without xterm.js: it says what to do instead of starting.
    """
    (tmp_path / "index.html").write_text(
        '<link rel="stylesheet" href="node_modules/@xterm/xterm/css/xterm.css">'
        '<script defer src="/node_modules/@xterm/xterm/lib/xterm.js"></script>'
        '<script type="module" src="app.js"></script>')
    with pytest.raises(usage.UsageError) as refused:
        parse("--www", str(tmp_path))
    said = str(refused.value)
    assert f"the page's npm packages are missing from {tmp_path}" in said
    assert "(node_modules/@xterm/xterm/css/xterm.css and 1 more)" in said
    assert "npm ci" in said and "docs/deploy.md" in said
    for name in ("css/xterm.css", "lib/xterm.js"):
        (tmp_path / "node_modules/@xterm/xterm" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "node_modules/@xterm/xterm" / name).write_text("x")
    assert parse("--www", str(tmp_path))["www"] == str(tmp_path)


def test_no_door_with_door_port_0():
    service = makeService(parse("--insecure-no-auth", "--door-port", "0"), MemoryReactorClock())
    assert not [c for c in service if isinstance(c, SessionDoor)]


def test_door_port_checked():
    with pytest.raises(usage.UsageError):
        parse("--door-port", "70000")


def test_service_tree():
    """
    The tree says the order: the session door, pools, sessions, the idle
    watch, cleanup, then the listeners (which therefore close first on
    stop).
    """
    reactor = MemoryReactorClock()
    service = makeService(parse("--insecure-no-auth", "-l", "tcp:0",
                                "-l", "tcp:0:interface=127.0.0.1"), reactor)
    assert isinstance(service, CapsuleService)
    children = list(service)
    assert [type(c) for c in children] == [DockerService, SessionDoor, SessionService,
                                           IdleService, CleanupService, DiskWatchService,
                                           ListenerService]
    assert [type(c) for c in children[-1]] == [StreamServerEndpointService] * 2


def _sessions(docker, clock):
    spec = ContainerSpec(image="capsule-runtime:latest")
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t",
                                                          pool_size=1))
    return SessionService(manager, clock)


class _Port(Service):
    bound = False

    def privilegedStartService(self):
        self.bound = True
        super().privilegedStartService()


SID = "6f9619ff-8b86-4011-b42d-00c04fc964ff"
LABELS = {"io.capsule.managed": "true", "io.capsule.instance": "t",
          "io.capsule.session": SID}


def test_listeners_open_only_after_recovery():
    docker, clock = FakeDockerAPI(), Clock()
    docker.add_container("alive", LABELS)
    docker.hold_list = True
    sessions = _sessions(docker, clock)
    listeners = ListenerService(sessions.ready)
    port = _Port()
    port.setServiceParent(listeners)
    sessions.startService()
    # twistd binds ports in privilegedStartService, before startService.
    listeners.privilegedStartService()
    listeners.startService()
    assert not port.bound and not port.running, (
        "a port opened before the earlier run's sessions were known")
    docker.release_list()
    assert port.bound and port.running
    assert sessions.manager.sessions[SID].status() == "recovered"
    assert len(docker.containers) == 2, "the warm pool fills after recovery"


def test_engine_down_at_start_opens_the_port_and_keeps_looking():
    docker, clock = FakeDockerAPI(), Clock()
    docker.add_container("alive", LABELS)
    docker.reachable = False
    sessions = _sessions(docker, clock)
    listeners = ListenerService(sessions.ready)
    port = _Port()
    port.setServiceParent(listeners)
    sessions.startService()
    listeners.startService()
    assert port.running
    # A reconnect meanwhile is not told that its session does not exist.
    with pytest.raises(DockerUnavailable):
        sessions.manager.reconnect(SID, RecordingClient())
    docker.reachable = True
    clock.advance(SessionService.RECOVERY_RETRY)
    assert sessions.manager.sessions[SID].status() == "recovered"
    with pytest.raises(SessionNotFound):
        sessions.manager.reconnect("00000000-0000-0000-0000-000000000000", RecordingClient())


def test_a_stop_during_start_up_starts_no_pool():
    docker, clock = FakeDockerAPI(), Clock()
    docker.hold_list = True
    sessions = _sessions(docker, clock)
    sessions.startService()
    sessions.stopService()
    docker.release_list()
    clock.advance(60)
    assert docker.containers == {}


def test_websocket_limits_reach_autobahn(monkeypatch):
    reactor = MemoryReactorClock()
    monkeypatch.setenv("CAPSULE_TUNING", "max-message-size=1234,ping-interval=7")
    service = makeService(parse("-l", "tcp:0:interface=127.0.0.1",
                                "--allowed-origin", "https://a.example"), reactor)
    factory = service.websocket_factory
    assert factory.maxMessagePayloadSize == 1234 and factory.maxFramePayloadSize == 1234
    assert factory.failByDrop is False
    assert factory.autoPingInterval == 7
    assert factory.origin_allowed("https://a.example", "capsule.example")
    assert not factory.origin_allowed("https://b.example", "capsule.example")
    assert factory.origin_allowed("http://capsule.example", "capsule.example")


def test_an_engine_without_live_restore_is_warned_about():
    from twisted.logger import globalLogPublisher
    docker, clock = FakeDockerAPI(), Clock()
    docker.live_restore = False
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        _sessions(docker, clock).startService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e["log_format"] for e in events if e.get("log_level").name == "warn"]
    assert len(warnings) == 1 and "live-restore" in warnings[0]
    assert '"live-restore": true' in warnings[0].format()


@pytest.mark.parametrize("options, account, warned", [
    (["name=seccomp,profile=default"], "dev", True),
    (["name=seccomp,profile=default"], None, False),
    (["name=seccomp,profile=default", "name=userns"], "dev", False),
    (["name=rootless", "name=seccomp,profile=default"], "dev", False),
])
def test_a_host_account_of_the_sessions_uid_is_warned_about(monkeypatch, options, account,
                                                            warned):
    """
    Without user namespaces, a session's processes are uid 1000 on the host
    too: an account of that uid there reads their environment (the
    profiles' secrets). Said once at start, with how to remap.
    """
    from twisted.logger import globalLogPublisher

    from capsule.sessions import recovery
    asked = []
    monkeypatch.setattr(recovery, "host_account", lambda uid: asked.append(uid) or account)
    docker, clock = FakeDockerAPI(), Clock()
    docker.security_options = options
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        _sessions(docker, clock).startService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [formatEvent(e) for e in events if e.get("log_level").name == "warn"]
    if not warned:
        assert warnings == []
        return
    assert asked == [1000]
    (warning,) = warnings
    assert "uid 1000" in warning and "account dev's" in warning
    assert '{"userns-remap": "default"} in /etc/docker/daemon.json' in warning


def test_an_engine_that_does_not_answer_its_settings_is_said_once():
    from twisted.logger import globalLogPublisher

    from capsule.sessions.recovery import remaps_users
    assert remaps_users({}) is None and remaps_users({"SecurityOptions": None}) is None
    assert remaps_users({"SecurityOptions": ["name=apparmor", "name=userns"]}) is True
    assert remaps_users({"SecurityOptions": ["name=apparmor"]}) is False
    docker, clock = FakeDockerAPI(), Clock()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        sessions = _sessions(docker, clock)
        recovery = sessions.manager.recovery
        docker.reachable = False
        said = []
        Deferred.fromCoroutine(recovery.check_engine()).addCallback(said.append)
        assert said == [None]
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [formatEvent(e) for e in events if e.get("log_level").name == "warn"]
    assert len(warnings) == 1 and "settings" in warnings[0], warnings


def test_a_profile_whose_image_is_missing_is_warned_about_at_start():
    from dataclasses import replace

    from twisted.logger import globalLogPublisher

    from capsule.core.profiles import builtin_profiles
    from capsule.sessions.session import shell_profile
    docker, clock = FakeDockerAPI(), Clock()
    spec = ContainerSpec(image="capsule-runtime:latest")
    config = SessionConfig(spec=spec, instance="t")
    config = replace(config, profiles=builtin_profiles(shell_profile(config), "no-such:agent"))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        SessionService(SessionManager(docker, clock, config), clock).startService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level").name == "warn"]
    assert [(e["profile"], e["image"]) for e in warnings] == [("claude", "no-such:agent")]
    assert "its sessions cannot start" in warnings[0]["log_format"]


def test_the_signal_handler_only_hands_the_stop_to_the_reactor():
    import signal

    from capsule.services import stop_on_signals
    reactor = MemoryReactorClock()
    reactor.running = True
    saved = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop_on_signals(reactor)
        handler = signal.getsignal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is handler
        calls = []
        reactor.callFromThread = lambda f, *a: calls.append((f, a))
        handler(signal.SIGTERM, None)
        # Nothing was done in the handler itself: no log, no stop.
        assert [a for _, a in calls] == [("SIGTERM",)] and not reactor.hasStopped
        calls[0][0](*calls[0][1])
        assert reactor.hasStopped
    finally:
        for n, h in saved.items():
            signal.signal(n, h)


def test_the_anthropic_upstream_and_budget_are_checked():
    options = parse("--anthropic-upstream", "http://127.0.0.1:9999/", "--anthropic-budget",
                    "1000")
    assert options.config.anthropic_upstream == "http://127.0.0.1:9999"
    assert options.config.anthropic_budget == 1000
    assert parse().config.anthropic_upstream == "https://api.anthropic.com"
    assert parse().config.anthropic_budget is None
    for bad in ("http://api.example.com", "ftp://127.0.0.1", "https://", "https://u:p@h",
                "https://h/?q=1"):
        with pytest.raises(usage.UsageError):
            parse("--anthropic-upstream", bad)
    with pytest.raises(usage.UsageError):
        parse("--anthropic-budget", "0")
