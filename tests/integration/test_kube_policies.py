"""
The session namespace's NetworkPolicies (L{capsule.engine.kube_policies})
as the Kubernetes engine ensures them, on the stand-in API server
(tests/support/kube_standin.py), over real HTTP; and the label a fenced
session's pod carries for them.

The stand-in stores, validates by name and lists NetworkPolicies, and does
not enforce them (its pods share one Docker network): what is checked here
is that the policies are there, as built, after the engine's ensure, and
that pods carry what their selectors select.  That a cluster's network
plugin enforces them is not verified (see docs/kubernetes.md).
"""

import json
import uuid

import kubernetes.client
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from capsule.core.egress import NONE, EgressPolicy
from capsule.core.profiles import Profile
from capsule.core.spec import ContainerSpec
from capsule.engine.kube_policies import (EGRESS_LABEL, FENCED, INGRESS_POLICY,
                                          kubernetes_profile, network_policies)
from capsule.engine.kubernetes import KubernetesAPI

from .harness import IMAGE, remove_instance_containers

LABEL_INSTANCE = "io.capsule.instance"


@pytest.fixture
def namespace():
    return f"policies-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def api(standin, namespace):
    configuration = kubernetes.client.Configuration()
    configuration.host = standin.url
    api = KubernetesAPI(reactor, configuration, namespace=namespace, threads=2,
                        export_threads=1, timeout=30, start_timeout=60)
    api.start()
    yield api
    api.stop()


def _request(base: str, method: str, path: str, body=None):
    def _thd():
        import requests
        response = requests.request(method, base + path, json=body, timeout=30)
        return response.status_code, json.loads(response.content or b"{}")
    return deferToThread(_thd)


def _policies_path(namespace: str) -> str:
    return f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"


@pytest_twisted.ensureDeferred
async def test_the_engine_ensures_the_policies(api, standin, namespace):
    """
    The engine makes every policy once; made again, each is found there.
    """
    wanted = network_policies(namespace, "capsule")
    answers = await api.ensure_network_policies("capsule")
    assert [created for _, created in answers] == [True] * len(wanted)
    status, listed = await _request(standin.url, "GET", _policies_path(namespace))
    assert status == 200
    stored = {p["metadata"]["name"]: p for p in listed["items"]}
    assert sorted(stored) == sorted(p["metadata"]["name"] for p in wanted)
    for policy in wanted:
        found = stored[policy["metadata"]["name"]]
        assert found["spec"] == policy["spec"]
        assert found["metadata"]["labels"] == policy["metadata"]["labels"]
    again = await api.ensure_network_policies("capsule")
    assert [created for _, created in again] == [False] * len(wanted)
    assert [p["metadata"]["uid"] for p, _ in again] == [
        stored[p["metadata"]["name"]]["metadata"]["uid"] for p in wanted]


@pytest_twisted.ensureDeferred
async def test_a_policy_already_there_is_used_as_it_is(api, standin, namespace):
    """
    An operator's policy of the same name stays as the operator made it.
    """
    own = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": INGRESS_POLICY},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    status, _ = await _request(standin.url, "POST", _policies_path(namespace), own)
    assert status == 201
    answers = await api.ensure_network_policies("capsule")
    assert [created for _, created in answers] == [False, True, True]
    assert answers[0][0]["spec"] == own["spec"]


@pytest_twisted.ensureDeferred
async def test_a_fenced_pod_carries_the_fenced_label(api, namespace):
    """
    A session on the fenced network is a pod the fenced policy selects; an
    open one is not.
    """
    instance = f"policies-{uuid.uuid4().hex[:10]}"
    spec = ContainerSpec(image=IMAGE, memory="256m", cpus=0.5,
                         labels={"io.capsule.managed": "true", LABEL_INSTANCE: instance})
    try:
        # As the server gives profiles' specs to the engine.
        fenced = await api.create_session_container("f", kubernetes_profile(Profile(
            name="f", spec=spec, egress=EgressPolicy(NONE))).spec)
        opened = await api.create_session_container(
            "o", kubernetes_profile(Profile(name="o", spec=spec)).spec)
        found = {c["id"]: c["labels"] for c in await api.list_containers(
            {LABEL_INSTANCE: instance})}
        assert found[fenced][EGRESS_LABEL] == FENCED
        assert EGRESS_LABEL not in found[opened]
        selected = await api.list_containers({LABEL_INSTANCE: instance, EGRESS_LABEL: FENCED})
        assert [c["id"] for c in selected] == [fenced]
    finally:
        remove_instance_containers(instance)


@pytest_twisted.ensureDeferred
async def test_the_policies_are_ensured_when_capsule_starts(api, standin, namespace):
    """
    The service capsule runs at start on Kubernetes leaves the policies
    there, as built.
    """
    from capsule.engine.kube_startup import NetworkPoliciesAtStart

    service = NetworkPoliciesAtStart(api, reactor, "capsule")
    service.startService()
    try:
        answers = await service.done
    finally:
        service.stopService()
    assert [p["metadata"]["name"] for p, _ in answers] == [
        p["metadata"]["name"] for p in network_policies(namespace, "capsule")]
    status, listed = await _request(standin.url, "GET", _policies_path(namespace))
    assert status == 200
    assert sorted((p["metadata"]["name"], json.dumps(p["spec"], sort_keys=True))
                  for p in listed["items"]) == sorted(
        (p["metadata"]["name"], json.dumps(p["spec"], sort_keys=True))
        for p in network_policies(namespace, "capsule"))
