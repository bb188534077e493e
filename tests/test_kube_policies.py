"""
The session namespace's NetworkPolicies and capsule's rights there, as
L{capsule.engine.kube_policies} builds them (pure: no cluster).
"""

import ipaddress

import pytest

from capsule.core.egress import ALLOWLIST, NONE, EgressPolicy
from capsule.core.egress import OPEN_POLICY as OPEN_EGRESS
from capsule.core.profiles import Profile
from capsule.core.spec import ContainerSpec
from capsule.engine.firewall import BLOCKED
from capsule.engine.kube_pods import pod_manifest
from capsule.engine.kube_policies import (CAPSULE_POD_LABELS, EGRESS_LABEL, FENCED,
                                          FENCED_POLICY, INGRESS_POLICY, OPEN_POLICY, RIGHTS,
                                          blocked_ranges, kubernetes_profile,
                                          network_policies, own_namespace, pod_labels,
                                          role_rules)
from capsule.engine.network import CAPSULE_NETWORK, FENCED_NETWORK


def _selects(selector: dict, labels: dict) -> bool:
    """
    Whether a label selector (matchLabels, matchExpressions In/NotIn/Exists)
    selects a pod with C{labels}, as the API server reads it.
    """
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


SESSION = {"io.capsule.managed": "true", "io.capsule.instance": "default"}
FENCED_SESSION = {**SESSION, EGRESS_LABEL: FENCED}


def _by_name(policies):
    return {p["metadata"]["name"]: p for p in policies}


def test_every_policy_is_in_the_session_namespace():
    policies = network_policies("capsule-sessions", "capsule")
    assert [p["metadata"]["name"] for p in policies] == [INGRESS_POLICY, FENCED_POLICY,
                                                         OPEN_POLICY]
    for p in policies:
        assert p["apiVersion"] == "networking.k8s.io/v1" and p["kind"] == "NetworkPolicy"
        assert p["metadata"]["namespace"] == "capsule-sessions"


def test_sessions_take_connections_from_capsule_only():
    policy = _by_name(network_policies("capsule-sessions", "capsule"))[INGRESS_POLICY]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert _selects(spec["podSelector"], SESSION)
    assert _selects(spec["podSelector"], FENCED_SESSION)
    # capsule's own pods are not fenced in, should they share the namespace.
    assert not _selects(spec["podSelector"], CAPSULE_POD_LABELS)
    assert spec["ingress"] == [{"from": [{
        "podSelector": {"matchLabels": CAPSULE_POD_LABELS},
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "capsule"}}}]}]
    # A session is no source: sessions never reach each other.
    source = spec["ingress"][0]["from"][0]
    assert not _selects(source["podSelector"], SESSION)


@pytest.mark.parametrize("capsule_namespace", [None, "capsule-sessions"])
def test_capsule_in_the_session_namespace(capsule_namespace):
    policy = _by_name(network_policies("capsule-sessions", capsule_namespace))[INGRESS_POLICY]
    assert policy["spec"]["ingress"] == [{"from": [{
        "podSelector": {"matchLabels": CAPSULE_POD_LABELS}}]}]


def test_fenced_sessions_send_nothing():
    policies = network_policies("capsule-sessions", "capsule")
    fenced_policy = _by_name(policies)[FENCED_POLICY]["spec"]
    assert fenced_policy["policyTypes"] == ["Egress"] and fenced_policy["egress"] == []
    assert _selects(fenced_policy["podSelector"], FENCED_SESSION)
    assert not _selects(fenced_policy["podSelector"], SESSION)
    # Policies add up: no other egress policy selects a fenced pod.
    egress = [p for p in policies if "Egress" in p["spec"]["policyTypes"]
              and _selects(p["spec"]["podSelector"], FENCED_SESSION)]
    assert [p["metadata"]["name"] for p in egress] == [FENCED_POLICY]


def test_open_sessions_reach_the_internet_and_dns_only():
    policies = network_policies("capsule-sessions", "capsule")
    spec = _by_name(policies)[OPEN_POLICY]["spec"]
    assert spec["policyTypes"] == ["Egress"]
    assert _selects(spec["podSelector"], SESSION)
    assert not _selects(spec["podSelector"], CAPSULE_POD_LABELS)
    internet, dns = spec["egress"]
    assert internet == {"to": [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": blocked_ranges(4)}},
        {"ipBlock": {"cidr": "::/0", "except": blocked_ranges(6)}}]}
    assert dns == {"to": [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    # capsule's own pods get no egress policy of these.
    assert not [p for p in policies if "Egress" in p["spec"]["policyTypes"]
                and _selects(p["spec"]["podSelector"], CAPSULE_POD_LABELS)]


def test_the_refused_ranges_are_the_host_firewalls_and_loopback():
    for version in (4, 6):
        ranges = [ipaddress.ip_network(r) for r in blocked_ranges(version)]
        assert {str(r) for r in ranges} == {c for c, _ in BLOCKED[version]} | {
            "127.0.0.0/8" if version == 4 else "::1/128"}
        assert all(r.version == version for r in ranges)
    for address in ("169.254.169.254", "10.1.2.3", "172.20.0.1", "192.168.1.1", "100.64.0.1",
                    "127.0.0.1", "fe80::1", "fd00::1", "::1"):
        ip = ipaddress.ip_address(address)
        assert any(ip in ipaddress.ip_network(r) for r in blocked_ranges(ip.version)), address
    for address in ("1.1.1.1", "2606:4700:4700::1111"):
        ip = ipaddress.ip_address(address)
        assert not any(ip in ipaddress.ip_network(r) for r in blocked_ranges(ip.version))


@pytest.mark.parametrize("egress, expected", [
    (OPEN_EGRESS, False), (EgressPolicy(NONE), True),
    (EgressPolicy(ALLOWLIST, ("pypi.org",)), True)])
@pytest.mark.parametrize("network", [CAPSULE_NETWORK, FENCED_NETWORK, "none", None])
def test_a_profile_on_kubernetes(egress, expected, network):
    """
    Its egress decides whether its pods are fenced; its network, Docker's,
    is none (as every profile's is on Kubernetes).
    """
    profile = Profile(name="p", spec=ContainerSpec(image="i", labels=dict(SESSION),
                                                   network=network), egress=egress)
    spec = kubernetes_profile(profile).spec
    assert spec.network == "none"
    assert spec.labels == (FENCED_SESSION if expected else SESSION)
    assert kubernetes_profile(profile).egress == egress


def test_a_fenced_sessions_pod_carries_the_label():
    policies = _by_name(network_policies("capsule-sessions", "capsule"))
    fenced = Profile(name="p", spec=ContainerSpec(image="i", labels=dict(SESSION)),
                     egress=EgressPolicy(NONE))
    for spec in (kubernetes_profile(fenced).spec,
                 # A spec still on the fenced network (not made for Kubernetes).
                 ContainerSpec(image="i", labels=dict(SESSION), network=FENCED_NETWORK)):
        pod = pod_manifest("capsule-x", spec)
        assert pod["metadata"]["labels"] == FENCED_SESSION
        assert _selects(policies[FENCED_POLICY]["spec"]["podSelector"],
                        pod["metadata"]["labels"])
        assert not _selects(policies[OPEN_POLICY]["spec"]["podSelector"],
                            pod["metadata"]["labels"])
    opened = Profile(name="o", spec=ContainerSpec(image="i", labels=dict(SESSION)))
    for spec in (kubernetes_profile(opened).spec,
                 ContainerSpec(image="i", labels=dict(SESSION), network="none")):
        pod = pod_manifest("capsule-y", spec)
        assert pod["metadata"]["labels"] == SESSION
        assert pod_labels(spec) == {}
        assert _selects(policies[OPEN_POLICY]["spec"]["podSelector"],
                        pod["metadata"]["labels"])


def test_own_namespace(tmp_path):
    path = tmp_path / "namespace"
    assert own_namespace({"POD_NAMESPACE": "capsule"}, str(path)) == "capsule"
    assert own_namespace({}, str(path)) is None
    path.write_text("capsule-system\n")
    assert own_namespace({}, str(path)) == "capsule-system"
    assert own_namespace({"POD_NAMESPACE": ""}, str(path)) == "capsule-system"


def test_role_rules_are_the_rights():
    rules = role_rules()
    assert {(r["apiGroups"][0], r["resources"][0]): tuple(r["verbs"]) for r in rules} == RIGHTS
    # Never a wildcard, never more than the session namespace's objects.
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]


class _Engine:
    """
    An engine whose ensure_network_policies fails C{failures} times (the
    API server away), then answers.
    """

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, []

    def ensure_network_policies(self, capsule_namespace=None):
        from twisted.internet.defer import fail, succeed

        from capsule.core.errors import DockerUnavailable
        self.calls.append(capsule_namespace)
        if len(self.calls) <= self.failures:
            return fail(DockerUnavailable("cannot reach the Kubernetes API server"))
        return succeed([(p, True) for p in network_policies("capsule-sessions",
                                                            capsule_namespace)])


def test_the_policies_are_ensured_at_start_until_they_are():
    from twisted.internet.task import Clock

    from capsule.engine.kube_startup import NetworkPoliciesAtStart

    clock, engine = Clock(), _Engine(failures=2)
    service = NetworkPoliciesAtStart(engine, clock, "capsule", retry=30)
    service.startService()
    assert engine.calls == ["capsule"] and not service.done.called
    clock.advance(30)
    assert len(engine.calls) == 2 and not service.done.called
    clock.advance(30)
    assert len(engine.calls) == 3
    answers = []
    service.done.addCallback(answers.append)
    assert [p["metadata"]["name"] for p, _ in answers[0]] == [INGRESS_POLICY, FENCED_POLICY,
                                                               OPEN_POLICY]
    clock.advance(300)
    assert len(engine.calls) == 3
    service.stopService()


def test_stopped_before_the_api_server_answered():
    from twisted.internet.task import Clock

    from capsule.engine.kube_startup import NetworkPoliciesAtStart

    clock, engine = Clock(), _Engine(failures=100)
    service = NetworkPoliciesAtStart(engine, clock, retry=30)
    service.startService()
    service.stopService()
    answers = []
    service.done.addCallback(answers.append)
    assert answers == [None]
    clock.advance(300)
    assert engine.calls == [None]
    assert not clock.getDelayedCalls()
