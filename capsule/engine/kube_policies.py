"""
What the Kubernetes engine (L{capsule.engine.kubernetes}) may do and what
its session pods may reach, as data: the NetworkPolicies of the session
namespace, and the rights capsule's Role grants there.  Pure: no I/O.

The same builders make what the engine ensures at its start
(L{capsule.engine.kubernetes.KubernetesAPI.ensure_network_policies}) and
what C{deploy/kubernetes/} applies (a test holds the two equal).

The policies, all in the session namespace, all for every pod there but
capsule's own (should capsule run there too):

  - L{INGRESS_POLICY}: a session pod takes connections only from capsule's
    pods (L{CAPSULE_POD_LABELS}, in capsule's namespace): never from
    another session, nor from anything else in the cluster.
  - L{FENCED_POLICY}: a pod labelled C{io.capsule.egress: fenced} (a
    profile whose egress is not open: L{kubernetes_profile}) sends nothing;
    its one way out is capsule's door, over its keeper's channel.
  - L{OPEN_POLICY}: the other pods reach the internet, IPv4 and IPv6, but
    not the ranges the Docker engine's host firewall refuses
    (L{capsule.engine.firewall.BLOCKED}: private, link-local with the cloud
    metadata service, carrier-grade NAT, unique local), nor loopback; and
    the cluster's DNS (C{kube-system}, port 53 over UDP and TCP).

NetworkPolicies add up: a pod is allowed what any policy that selects it
allows, so the open policy's selector leaves out the fenced pods.
"""

from __future__ import annotations

import os
from dataclasses import replace

from capsule.core.profiles import Profile
from capsule.core.spec import ContainerSpec
from capsule.engine.firewall import BLOCKED
from capsule.engine.network import FENCED_NETWORK

# The labels of capsule's own pods (the Deployment's pod template carries
# them): the only pods session pods take connections from.
CAPSULE_POD_LABELS = {"app.kubernetes.io/name": "capsule"}
# The label of a session pod whose profile's egress is not open.
EGRESS_LABEL = "io.capsule.egress"
FENCED = "fenced"
# The policies' names.
INGRESS_POLICY = "capsule-sessions-ingress"
FENCED_POLICY = "capsule-sessions-egress-fenced"
OPEN_POLICY = "capsule-sessions-egress-open"
POLICY_LABELS = {"app.kubernetes.io/name": "capsule",
                 "app.kubernetes.io/component": "session-network"}
# What open sessions may not reach besides the host firewall's ranges.
LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}
# The cluster's DNS: CoreDNS (or kube-dns) in kube-system, as kubeadm,
# kind, k3s and the managed clusters label it.
DNS_NAMESPACE = "kube-system"
DNS_POD_LABELS = {"k8s-app": "kube-dns"}
DNS_PORT = 53
# The label every namespace carries with its own name (Kubernetes 1.22+).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# Where a pod's service account says its namespace.
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# The rights capsule's Role grants in the session namespace, by API group
# and resource: exactly the calls the engine makes (a test reads them from
# capsule/engine/kube*.py).  pods/exec is opened as a WebSocket, an HTTP
# GET ("get"); API servers with AuthorizePodWebsocketUpgradeCreatePermission
# (beta, on by default, since 1.35) ask "create" of it as well.
RIGHTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "pods"): ("create", "delete", "get", "list", "patch", "watch"),
    ("", "pods/exec"): ("create", "get"),
    ("", "persistentvolumeclaims"): ("create", "delete", "get", "list", "patch"),
    # A session's Secret (capsule.engine.kube_secrets): made and deleted,
    # never read.
    ("", "secrets"): ("create", "delete"),
    ("networking.k8s.io", "networkpolicies"): ("create", "get"),
    ("coordination.k8s.io", "leases"): ("create", "delete", "get", "list", "update"),
}


def kubernetes_profile(profile: Profile) -> Profile:
    """
    A profile as the Kubernetes engine runs its sessions: no Docker network
    (C{"none"}: the door and previews over the keeper's channels), and,
    when its egress is not open, the label the fenced policy selects.  (On
    Kubernetes the profile's egress decides: C{network} is Docker's.)
    """
    spec = profile.spec
    labels = {**spec.labels, EGRESS_LABEL: FENCED} if profile.egress.fenced else spec.labels
    return replace(profile, spec=replace(spec, network="none", labels=labels))


def pod_labels(spec: ContainerSpec) -> dict[str, str]:
    """
    The labels a session pod gets for the policies besides its spec's: the
    fenced one for a spec still on capsule's fenced network (a profile not
    made by L{kubernetes_profile}).
    """
    return {EGRESS_LABEL: FENCED} if spec.network == FENCED_NETWORK else {}


def blocked_ranges(version: int) -> list[str]:
    """
    What an open session may not reach, for IP C{version} 4 or 6.
    """
    return [cidr for cidr, _ in BLOCKED[version]] + [LOOPBACK[version]]


def _not_capsule(*more: dict) -> dict:
    return {"matchExpressions": [
        *({"key": k, "operator": "NotIn", "values": [v]} for k, v in
          CAPSULE_POD_LABELS.items()), *more]}


def _policy(name: str, namespace: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(POLICY_LABELS)},
            "spec": spec}


def ingress_policy(namespace: str, capsule_namespace: str | None) -> dict:
    """
    Session pods take connections from capsule's pods only.

    @param namespace: the session namespace.
    @param capsule_namespace: where capsule's pods are (C{None}: the
        session namespace).
    """
    source = {"podSelector": {"matchLabels": dict(CAPSULE_POD_LABELS)}}
    if capsule_namespace and capsule_namespace != namespace:
        source["namespaceSelector"] = {"matchLabels": {NAMESPACE_NAME_LABEL: capsule_namespace}}
    return _policy(INGRESS_POLICY, namespace, {
        "podSelector": _not_capsule(), "policyTypes": ["Ingress"],
        "ingress": [{"from": [source]}]})


def fenced_policy(namespace: str) -> dict:
    """
    Fenced session pods send nothing.
    """
    return _policy(FENCED_POLICY, namespace, {
        "podSelector": _not_capsule({"key": EGRESS_LABEL, "operator": "In",
                                     "values": [FENCED]}),
        "policyTypes": ["Egress"], "egress": []})


def open_policy(namespace: str) -> dict:
    """
    Open session pods reach the internet but no private, link-local or
    loopback range, and the cluster's DNS.
    """
    return _policy(OPEN_POLICY, namespace, {
        "podSelector": _not_capsule({"key": EGRESS_LABEL, "operator": "NotIn",
                                     "values": [FENCED]}),
        "policyTypes": ["Egress"],
        "egress": [
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": blocked_ranges(4)}},
                    {"ipBlock": {"cidr": "::/0", "except": blocked_ranges(6)}}]},
            {"to": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: DNS_NAMESPACE}},
                     "podSelector": {"matchLabels": dict(DNS_POD_LABELS)}}],
             "ports": [{"protocol": "UDP", "port": DNS_PORT},
                       {"protocol": "TCP", "port": DNS_PORT}]}]})


def network_policies(namespace: str, capsule_namespace: str | None) -> list[dict]:
    """
    Every NetworkPolicy of the session namespace C{namespace}, in order.
    """
    return [ingress_policy(namespace, capsule_namespace), fenced_policy(namespace),
            open_policy(namespace)]


def own_namespace(environ=None, path: str = SERVICE_ACCOUNT_NAMESPACE) -> str | None:
    """
    The namespace capsule's own pod is in: C{$POD_NAMESPACE} (the
    Deployment sets it), else its service account's, else C{None} (capsule
    runs outside the cluster).
    """
    environ = os.environ if environ is None else environ
    if environ.get("POD_NAMESPACE"):
        return environ["POD_NAMESPACE"]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def role_rules() -> list[dict]:
    """
    The rules of capsule's Role in the session namespace (L{RIGHTS}).
    """
    return [{"apiGroups": [group], "resources": [resource], "verbs": list(verbs)}
            for (group, resource), verbs in RIGHTS.items()]
