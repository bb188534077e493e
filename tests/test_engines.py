"""
The engine options (capsule.engines): --engine, --kube-*, --replica, their
checks, and what --engine kubernetes turns off or adapts in the server.
"""

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from capsule.core.errors import DockerUnavailable
from capsule.engine.docker import DockerAPI
from capsule.engine.kubernetes import KubernetesAPI
from capsule.engines import default_replica
from capsule.sessions.disk import DiskWatchService
from capsule.sessions.engine_watch import gone_message
from capsule.tap import Options, makeService


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def test_docker_is_the_default_engine():
    config = parse().config
    assert (config.engine, config.kubernetes) == ("docker", False)
    assert (config.kube_namespace, config.kubeconfig, config.kube_context,
            config.kube_storage_class, config.kube_volume_size) == (
        "capsule-sessions", None, None, None, "10Gi")
    assert config.spec.network == "capsule"
    assert config.memory_budget_from_engine is True
    assert isinstance(makeService(parse("--insecure-no-auth"), MemoryReactorClock()).docker,
                      DockerAPI)


def test_the_kubernetes_options_reach_the_config(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    config = parse("--engine", "kubernetes", "--kube-namespace", "sessions",
                   "--kubeconfig", str(kubeconfig), "--kube-context", "prod",
                   "--kube-storage-class", "fast", "--kube-volume-size", "5Gi",
                   "--replica", "capsule-1").config
    assert (config.engine, config.kubernetes, config.kube_namespace, config.kubeconfig,
            config.kube_context, config.kube_storage_class, config.kube_volume_size,
            config.replica) == ("kubernetes", True, "sessions", str(kubeconfig), "prod",
                                "fast", "5Gi", "capsule-1")


def test_with_kubernetes_sessions_have_no_docker_network_nor_firewall():
    config = parse("--engine", "kubernetes").config
    assert config.spec.network == "none"
    assert {p.spec.network for p in config.profiles.values()} == {"none"}
    assert config.firewall == "off"
    # The cluster's memory is not this host's: no budget, no reserve from it.
    assert (config.memory_budget, config.memory_budget_from_engine,
            config.memory_reserve_from_engine) == (None, False, False)


def test_with_kubernetes_the_engine_is_kubernetes_and_the_disk_watch_is_off():
    service = makeService(parse("--insecure-no-auth", "--engine", "kubernetes",
                                "--kube-namespace", "sessions", "--disk", "1g"),
                          MemoryReactorClock())
    assert isinstance(service.docker, KubernetesAPI)
    assert service.docker.namespace == "sessions"
    assert not [c for c in service if isinstance(c, DiskWatchService)]
    # Nothing reads the memory of this host as the engine's.
    assert service.sessions._host is None and service.sessions._docker is None


def test_a_kubeconfig_that_cannot_be_read_is_an_engine_that_does_not_answer(tmp_path):
    """
    Read at the first call, not at start: it is said as the engine's
    absence (capsule keeps trying), and read again at the next call.
    """
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("this: [is not yaml")
    service = makeService(parse("--insecure-no-auth", "--engine", "kubernetes",
                                "--kubeconfig", str(kubeconfig)), MemoryReactorClock())
    with pytest.raises(DockerUnavailable) as refused:
        service.docker._thd_client()
    assert "cannot read the Kubernetes configuration" in refused.value.message
    assert "--kubeconfig" in refused.value.message
    kubeconfig.write_text(
        '{"apiVersion": "v1", "kind": "Config", "current-context": "c",'
        ' "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:1"}}],'
        ' "users": [{"name": "u", "user": {"token": "t"}}],'
        ' "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}')
    assert service.docker._thd_client() is not None
    assert service.docker.host == "http://127.0.0.1:1"


@pytest.mark.parametrize("args, words", [
    (["--engine", "podman"], "--engine must be one of docker, kubernetes, not 'podman'"),
    (["--kube-namespace", "x"], "--kube-namespace needs --engine kubernetes"),
    (["--kube-volume-size", "5Gi"], "--kube-volume-size needs --engine kubernetes"),
    (["--engine", "kubernetes", "--kube-namespace", "Not_A_Name"],
     "--kube-namespace: not a namespace name: 'Not_A_Name'"),
    (["--engine", "kubernetes", "--kube-namespace", "a" * 64],
     "--kube-namespace: not a namespace name"),
    (["--engine", "kubernetes", "--kubeconfig", "/no/such/kubeconfig"],
     "--kubeconfig: no such file: /no/such/kubeconfig"),
    (["--engine", "kubernetes", "--kube-context", " "], "--kube-context must name"),
    (["--engine", "kubernetes", "--kube-volume-size", "ten gigs"],
     "--kube-volume-size: not a Kubernetes quantity: 'ten gigs' (try 10Gi or 500Mi)"),
    (["--replica", "Capsule_1"], "--replica: not a DNS label: 'Capsule_1'"),
    (["--engine", "kubernetes", "--network", "my-net"],
     "--network my-net is Docker's: with --engine kubernetes"),
    (["--engine", "kubernetes", "--firewall", "manage"],
     "--firewall manage cannot be honoured with --engine kubernetes"),
    (["--engine", "kubernetes", "--memory-reserve", "2g"],
     "--memory-reserve 2g cannot be honoured with --engine kubernetes"),
    (["--engine", "kubernetes", "--allow-sudo"],
     "--allow-sudo cannot be honoured with --engine kubernetes: passwordless sudo"),
])
def test_bad_engine_options_are_refused_with_what_to_do(args, words):
    with pytest.raises(usage.UsageError) as refused:
        parse(*args)
    assert words in str(refused.value)


def test_docker_only_options_that_mean_nothing_to_a_pod_are_accepted():
    # --network none is what pods get anyway; --firewall off: none used;
    # capabilities and runtimes are the pod's (securityContext, RuntimeClass).
    config = parse("--engine", "kubernetes", "--network", "none", "--firewall", "off",
                   "--cap-add", "NET_BIND_SERVICE", "--runtime", "gvisor",
                   "--memory-reserve", "off").config
    assert (config.spec.cap_add, config.spec.runtime) == (("NET_BIND_SERVICE",), "gvisor")


@pytest.mark.parametrize("environ, hostname, name", [
    ({"POD_NAME": "capsule-7d9f-abcde"}, "node", "capsule-7d9f-abcde"),
    ({}, "Build-Host.example.com", "build-host"),
    ({}, "", "capsule"),
    ({}, "___", "capsule"),
])
def test_the_default_replica_is_the_pod_else_the_host(environ, hostname, name):
    assert default_replica(environ, lambda: hostname) == name


def test_the_replica_defaults_to_a_dns_label():
    name = parse().config.replica
    assert name and len(name) <= 63 and name == name.lower()


@pytest.mark.parametrize("state, message", [
    ({"Running": False, "Reason": "Evicted", "Error": "The node was low on resource: memory."},
     "the session's pod was evicted: The node was low on resource: memory."),
    ({"Running": False, "Reason": "Evicted", "Error": ""}, "the session's pod was evicted"),
    ({"Running": True, "Status": "removing"}, "the session's pod was deleted"),
    # Gone, not by capsule, its volume claim left (capsule.engine.kube_keep).
    ({"Running": False, "Status": "exited", "Reason": "Deleted"},
     "the session's pod was deleted"),
    ({"Running": False, "Status": "exited", "Reason": "Kept"}, None),
    ({"Running": True, "Status": "running"}, None),
    ({"Running": False, "Status": "exited", "Reason": "Error"}, None),
])
def test_a_pod_taken_away_says_how(state, message):
    assert gone_message(state, "pod") == message


def test_a_docker_container_being_removed_says_removed():
    assert gone_message({"Status": "removing"}) == "the session's container was removed"


class _GoneEngine:
    session_unit = "pod"

    def __init__(self, states):
        self.states = list(states)

    def container_state(self, container_id):
        from twisted.internet.defer import succeed
        return succeed(self.states.pop(0) if len(self.states) > 1 else self.states[0])


class _Events:
    def __init__(self):
        self.ended = []

    def end(self, code, message):
        self.ended.append((code, message))

    def engine_lost(self, message):
        self.ended.append(("lost", message))


class _Session:
    id = "6f9619ff-8b86-4011-b42d-00c04fc964ff"
    container_id = "capsule-abc"
    state = None

    def __init__(self):
        self.events = _Events()


class _Facts:
    reason = None
    stderr = b""
    exit_status = None


@pytest.mark.parametrize("states, message, keepable", [
    # Pod and claim gone: nothing to keep.
    ([None], "the session's pod was deleted", False),
    # Its claim stays: offered to be kept, as a stopped container is.
    ([{"Running": True, "Status": "removing"}], "the session's pod was deleted", True),
    ([{"Running": False, "Status": "exited", "Reason": "Deleted"}],
     "the session's pod was deleted", True),
    ([{"Running": False, "Status": "exited", "Reason": "Evicted",
       "Error": "The node had condition: [DiskPressure]."}],
     "the session's pod was evicted: The node had condition: [DiskPressure].", True),
])
def test_a_closed_stream_of_a_pod_taken_away_ends_the_session_with_why(states, message,
                                                                      keepable):
    from capsule.sessions.engine_watch import EngineWatch
    stopped = []
    watch = EngineWatch(_GoneEngine(states), Clock(), lambda s: None, keeper=True, grace=10,
                        stopped=lambda session, why: stopped.append(why) or False)
    session = _Session()
    watch.diagnose(session, _Facts())
    # (The keeping here declines: the session ends, with why.)
    assert session.events.ended == [(None, message)]
    assert stopped == ([message] if keepable else [])


def test_an_engine_that_cannot_weigh_sessions_is_said_once_and_not_asked_again():
    from types import SimpleNamespace

    from twisted.internet.defer import fail
    from twisted.logger import globalLogPublisher

    from capsule.engine.kube_pods import Unsupported
    from capsule.sessions.fair_share import FairShare

    calls = []

    class Engine:
        def set_cpu_shares(self, container_id, shares):
            calls.append((container_id, shares))
            return fail(Unsupported("the Kubernetes engine cannot do this: changing a running"
                                    " pod's CPU weight"))

    def session(n):
        return SimpleNamespace(id=f"{n}" * 8, container_id=f"pod-{n}",
                               core=SimpleNamespace(user="alice", cpu_shares=None))
    sessions = {"1": session(1), "2": session(2)}
    said = []
    globalLogPublisher.addObserver(said.append)
    try:
        share = FairShare(Engine(), sessions, 256)
        share.share("alice")
        sessions["3"] = session(3)
        share.share("alice")
    finally:
        globalLogPublisher.removeObserver(said.append)
    assert share.unsupported is True
    assert calls == [("pod-1", 128)]
    lines = [e for e in said if "not weighted" in e.get("log_format", "")]
    assert len(lines) == 1 and lines[0]["log_level"].name == "info"


@pytest.mark.parametrize("message, reason", [
    ("the session's pod was evicted: The node was low on resource: memory.", "killed"),
    ("the Kubernetes API server did not come back within 60 s", "engine"),
    ("the session's pod was deleted", "other"),
])
def test_a_pods_end_is_counted_by_its_reason(message, reason):
    from capsule.ops.metrics import end_reason
    assert end_reason(None, message) == reason
