"""
Replicas (L{capsule.sessions.replicas}) against an in-memory engine that
says which replica holds each container and which replicas live, on a
Clock; the engine's pure parts (L{capsule.engine.kube_replicas}); and the
stand-in's updates and quotas (L{tests.support.kube_standin_coord}).
"""

import json
import struct

import pytest
from kubernetes.client.exceptions import ApiException
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent

from capsule.core.errors import ContainerGone, DockerError, DockerUnavailable
from capsule.core.spec import ContainerSpec
from capsule.engine.kube_replicas import (lease_live, lease_name, micro_time, parse_time,
                                          quota_refusal)
from capsule.sessions.cleanup import expire_due
from capsule.sessions.manager import SessionManager
from capsule.sessions.replicas import OWNER_ANNOTATION, Replicas, owner_of
from capsule.sessions.session import LABEL_INSTANCE, LABEL_SESSION, SessionConfig
from tests.support import kube_standin_coord as coord
from tests.support.fakes import FakeDockerAPI, RecordingClient
from tests.support.kube_standin import quantity

SID = "6f9619ff-8b86-4011-b42d-00c04fc964ff"
LABELS = {"io.capsule.managed": "true", LABEL_INSTANCE: "t"}


class ClusterEngine(FakeDockerAPI):
    """
    The fake engine, with holders and owners of containers and live
    replicas, as a cluster's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.holders: dict[str, str] = {}
        self.annotations: dict[str, dict] = {}
        self.claim_labels: dict[str, dict] = {}
        self.live: set[str] = set()
        # Claims another replica wins first: container -> that replica.
        self.beaten: dict[str, str] = {}

    # The replica whose pods it makes (as the Kubernetes engine's are
    # annotated when made).
    replica = "ra"

    def create_session_container(self, session_id, spec):
        d = super().create_session_container(session_id, spec)
        d.addCallback(lambda container_id: (self.holders.__setitem__(container_id,
                                                                     self.replica),
                                            container_id)[1])
        return d

    def _listing(self, labels):
        d = super()._listing(labels)
        d.addCallback(lambda found: [{**c, "replica": self.holders.get(c["id"]),
                                      "annotations": dict(self.annotations.get(c["id"], {}))}
                                     for c in found])
        return d

    def live_replicas(self):
        return succeed(set(self.live))

    def container_holder(self, container_id):
        if container_id not in self.containers:
            d = Deferred()
            d.errback(ContainerGone("gone"))
            return d
        return succeed(self.holders.get(container_id))

    def claim_container(self, container_id, replica, holder=None, annotations=None,
                        labels=None):
        if container_id in self.beaten:
            self.holders[container_id] = self.beaten.pop(container_id)
        current = self.holders.get(container_id)
        if current not in (holder, replica):
            return succeed(False)
        self.holders[container_id] = replica
        self.annotations.setdefault(container_id, {}).update(annotations or {})
        self.claim_labels.setdefault(container_id, {}).update(labels or {})
        return succeed(True)


def owned(user):
    return {OWNER_ANNOTATION: json.dumps({"user": user})}


@pytest.fixture
def docker():
    return ClusterEngine()


@pytest.fixture
def clock():
    return MemoryReactorClock()


def make_manager(docker, clock, replica="ra"):
    spec = ContainerSpec(image="capsule-runtime:latest")
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", grace=60))
    manager.replicas = Replicas(manager, docker, clock, replica, lease=15, renew=5)
    manager.observers.add(manager.replicas)
    return manager


def adopt(manager, session_id, user):
    results = []
    manager.replicas.adopt(session_id, user).addBoth(results.append)
    return results[0]


def test_a_session_another_replica_served_is_taken_over_and_replays(docker, clock):
    docker.add_container("pod", {**LABELS, LABEL_SESSION: SID})
    docker.holders["pod"], docker.annotations["pod"] = "rb", owned("alice")
    docker.keeper_output["pod"] = (100, 500)
    manager = make_manager(docker, clock)
    assert adopt(manager, SID, "alice") is True
    assert docker.holders["pod"] == "ra"
    client = RecordingClient()
    manager.reconnect(SID, client, offset=300, user="alice")
    assert client.events == [("started", SID, True)] and client.offset == 300
    assert docker.processes[0].argv[:6] == ("capsule-keeper", "-r", "-b", str(1024 * 1024),
                                            "-o", "300")


@pytest.mark.parametrize("user", ["bob", None])
def test_another_users_session_is_not_found_and_not_taken(docker, clock, user):
    docker.add_container("pod", {**LABELS, LABEL_SESSION: SID})
    docker.holders["pod"], docker.annotations["pod"] = "rb", owned("alice")
    manager = make_manager(docker, clock)
    assert adopt(manager, SID, user) is False
    assert docker.holders["pod"] == "rb" and SID not in manager.sessions


def test_a_session_without_an_owner_or_warm_or_unknown_is_not_found(docker, clock):
    manager = make_manager(docker, clock)
    assert adopt(manager, SID, None) is False
    assert adopt(manager, "not-a-session", None) is False
    docker.add_container("pod", {**LABELS, LABEL_SESSION: SID})
    assert adopt(manager, SID, None) is False
    docker.annotations["pod"] = owned(None)
    docker.containers["pod"]["labels"]["io.capsule.warm"] = "true"
    assert adopt(manager, SID, None) is False


def test_a_claim_another_replica_won_is_a_try_again(docker, clock):
    docker.add_container("pod", {**LABELS, LABEL_SESSION: SID})
    docker.holders["pod"], docker.annotations["pod"] = "rb", owned(None)
    docker.beaten["pod"] = "rc"
    manager = make_manager(docker, clock)
    failure = adopt(manager, SID, None)
    assert failure.check(DockerUnavailable)
    assert "just taken over by another capsule replica: try again" in (
        failure.value.message)
    assert docker.holders["pod"] == "rc" and SID not in manager.sessions


def test_a_started_session_says_its_owner_and_holder(docker, clock):
    manager = make_manager(docker, clock)
    session = manager.create(RecordingClient(), 80, 24, user="alice")
    assert docker.holders[session.container_id] == "ra"
    assert owner_of({"annotations": docker.annotations[session.container_id]}) == "alice"
    assert docker.claim_labels[session.container_id] == {"io.capsule.user": "alice"}


def test_at_grace_end_a_session_another_replica_took_is_forgotten_not_removed(docker, clock):
    manager = make_manager(docker, clock)
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    container = session.container_id
    manager.detach(session, client)
    docker.holders[container] = "rb"
    clock.advance(61)
    expire_due(manager, clock)
    assert session.id not in manager.sessions
    assert container in docker.containers and container not in docker.removed


def test_at_grace_end_a_session_still_held_here_expires(docker, clock):
    manager = make_manager(docker, clock)
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    manager.detach(session, client)
    clock.advance(61)
    expire_due(manager, clock)
    assert session.id not in manager.sessions
    assert session.container_id in docker.removed


def test_an_ended_session_whose_container_another_took_leaves_it(docker, clock):
    manager = make_manager(docker, clock)
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    container = session.container_id
    docker.holders[container] = "rb"
    manager.end(session, "ended")
    assert container not in docker.removed


def test_a_session_its_owner_ends_goes_wherever_it_is_served(docker, clock):
    manager = make_manager(docker, clock)
    session = manager.create(RecordingClient(), 80, 24)
    container = session.container_id
    docker.holders[container] = "rb"
    session.core.owner_ended = True
    manager.end(session, "the session was ended through the API")
    assert container in docker.removed


# -- a session another replica took over while it was served here ----------------------

def replaced(process) -> None:
    """
    As the keeper does to an attach another one replaced: a C{k} frame,
    then the end of its stream.
    """
    process.process_protocol.childDataReceived(1, b"k" + struct.pack(">I", 0))
    process.end(0)


def settle(clock) -> None:
    "Let the diagnosis of a closed stream ask about its container until it knows."
    for _ in range(10):
        clock.advance(0.2)


def problems(logged) -> list[str]:
    return [formatEvent(e) for e in logged
            if e.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical)]


def two_replicas(docker, clock):
    """
    Replicas ra and rb on one cluster, and a session of alice's started
    through ra with its client attached and some output; ra, rb, the
    session, ra's client and ra's shell's exec.
    """
    a, b = make_manager(docker, clock, "ra"), make_manager(docker, clock, "rb")
    docker.live = {"ra", "rb"}
    first = RecordingClient()
    session = a.create(first, 80, 24, user="alice")
    shell = docker.processes[-1]
    shell.emit(b"hello")
    docker.keeper_output[session.container_id] = (0, 5)
    return a, b, session, first, shell


def take_over(b, docker, session_id, user, offset=None):
    """
    A client attaches to C{session_id} through replica C{b}, as the
    WebSocket does (L{capsule.web.replica_ws}); it and its exec.
    """
    assert adopt(b, session_id, user) is True
    client = RecordingClient()
    b.reconnect(session_id, client, offset, user=user)
    return client, docker.processes[-1]


def test_a_client_whose_session_another_replica_took_over_hears_a_takeover(docker, clock,
                                                                             logged):
    a, b, session, first, shell = two_replicas(docker, clock)
    container = session.container_id
    second, b_shell = take_over(b, docker, session.id, "alice")
    assert docker.holders[container] == "rb"
    replaced(shell)
    # As from another tab: a takeover, not an end.
    assert first.events[-1] == ("taken_over",)
    assert not any(e[0] in ("ended", "failed") for e in first.events)
    # Forgotten here, its pod left alone.
    assert session.id not in a.sessions and session.over
    assert container in docker.containers and docker.removed == []
    assert docker.holders[container] == "rb"
    assert problems(logged) == []
    assert any("is served by replica rb now: forgotten here" in formatEvent(e)
               for e in logged)
    # It goes on through rb.
    b_shell.emit(b"hello")
    assert second.output == b"hello"
    assert b.sessions[session.id].status() == "running"


def test_the_first_client_takes_it_back_through_its_replica_with_exact_replay(docker,
                                                                                clock):
    a, b, session, first, shell = two_replicas(docker, clock)
    container = session.container_id
    second, b_shell = take_over(b, docker, session.id, "alice")
    b_shell.emit(b"hello")
    replaced(shell)
    b_shell.emit(b" world")
    docker.keeper_output[container] = (0, 11)
    assert first.offset == 5
    again, a_shell = take_over(a, docker, session.id, "alice", offset=first.offset)
    assert docker.holders[container] == "ra"
    # The keeper is asked for what the client lacks, from its offset.
    assert a_shell.argv[a_shell.argv.index("-o") + 1] == "5"
    a_shell.emit(b" world")
    assert again.events[0] == ("started", session.id, True) and again.output == b" world"
    assert first.output + again.output == b"hello world"
    # rb, replaced in turn, lets its client go the same way.
    replaced(b_shell)
    assert second.events[-1] == ("taken_over",)
    assert session.id not in b.sessions and a.sessions[session.id].status() == "running"
    assert docker.removed == []


def test_a_session_left_without_a_client_is_forgotten_quietly(docker, clock, logged):
    a, b, session, first, shell = two_replicas(docker, clock)
    a.detach(session, first)
    heard = list(first.events)
    take_over(b, docker, session.id, "alice")
    replaced(shell)
    assert first.events == heard
    assert session.id not in a.sessions and docker.removed == []
    assert problems(logged) == []
    # Its grace period ends with nothing left to do here.
    clock.advance(61)
    expire_due(a, clock)
    assert docker.removed == [] and session.container_id in docker.containers


def test_a_replaced_stream_of_a_session_still_held_here_is_diagnosed_as_before(docker,
                                                                              clock):
    a, b, session, first, shell = two_replicas(docker, clock)
    # Another attach, not another replica's (the pod still says ra).
    replaced(shell)
    settle(clock)
    assert first.events[-1][0] == "ended"
    assert "the connection to the shell was lost" in first.events[-1][2]


def test_a_holder_that_cannot_be_asked_is_diagnosed_as_before(docker, clock):
    a, b, session, first, shell = two_replicas(docker, clock)
    take_over(b, docker, session.id, "alice")

    def unknown(container_id):
        d = Deferred()
        d.errback(DockerError("forbidden"))
        return d
    docker.container_holder = unknown
    replaced(shell)
    settle(clock)
    assert first.events[-1][0] == "ended"


def test_on_one_server_a_replaced_stream_ends_as_before(docker, clock):
    spec = ContainerSpec(image="capsule-runtime:latest")
    manager = SessionManager(docker, clock, SessionConfig(spec=spec, instance="t", grace=60))
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    replaced(docker.processes[-1])
    settle(clock)
    assert client.events[-1][0] == "ended" and session.container_id in docker.removed


def test_recovery_skips_live_replicas_and_adopts_lapsed_ones(docker, clock):
    other = "7f9619ff-8b86-4011-b42d-00c04fc964ff"
    docker.add_container("live", {**LABELS, LABEL_SESSION: SID})
    docker.holders["live"], docker.annotations["live"] = "rb", owned("alice")
    docker.add_container("orphan", {**LABELS, LABEL_SESSION: other})
    docker.holders["orphan"], docker.annotations["orphan"] = "rc", owned("bob")
    docker.live = {"rb"}
    manager = make_manager(docker, clock)
    Deferred.fromCoroutine(manager.recovery.recover())
    assert SID not in manager.sessions and "live" not in docker.removed
    assert manager.sessions[other].core.user == "bob"
    assert docker.holders["orphan"] == "ra"


def test_the_orphan_sweep_adopts_a_lapsed_replicas_sessions(docker, clock):
    manager = make_manager(docker, clock)
    docker.add_container("orphan", {**LABELS, LABEL_SESSION: SID})
    docker.holders["orphan"], docker.annotations["orphan"] = "rc", owned(None)
    docker.add_container("warm", {**LABELS, LABEL_SESSION: "7f9619ff-8b86-4011-b42d-00c04fc964ff",
                                  "io.capsule.warm": "true"})
    docker.holders["warm"] = "rb"
    docker.live = {"rb"}
    Deferred.fromCoroutine(manager.recovery.remove_leftovers())
    assert manager.sessions[SID].status() == "recovered"
    assert docker.holders["orphan"] == "ra"
    assert docker.removed == []
    # Its client never comes: it expires after the grace period, here.
    clock.advance(61)
    expire_due(manager, clock)
    assert "orphan" in docker.removed


def test_renewals_learn_the_live_replicas_and_stop_drops_the_lease(docker, clock):
    calls = []
    docker.renew_replica = lambda name, seconds: (calls.append((name, seconds)),
                                                  succeed(None))[1]
    docker.drop_replica = lambda name: (calls.append(("drop", name)), succeed(True))[1]
    docker.live = {"rb"}
    manager = make_manager(docker, clock)
    manager.replicas.start()
    assert manager.replicas.live == {"ra", "rb"}
    clock.advance(5)
    assert calls == [("ra", 15), ("ra", 15)]
    manager.replicas.stop()
    assert calls[-1] == ("drop", "ra")
    clock.advance(5)
    assert len(calls) == 3


def test_a_failed_renewal_is_said_once(docker, clock):
    def unreachable(name, seconds):
        d = Deferred()
        d.errback(DockerUnavailable("away"))
        return d
    docker.renew_replica = unreachable
    manager = make_manager(docker, clock)
    manager.replicas.start()
    clock.advance(5)
    assert manager.replicas.live == {"ra"}
    manager.replicas.stop()


# -- the engine's pure parts --------------------------------------------------

def test_a_lease_lives_for_its_duration_from_its_renewal():
    lease = {"spec": {"renewTime": micro_time(1000.5), "leaseDurationSeconds": 10}}
    assert parse_time(micro_time(1000.5)) == 1000.5
    assert lease_live(lease, 1010.4) and not lease_live(lease, 1010.5)
    assert not lease_live({"spec": {"leaseDurationSeconds": 10}}, 0)
    assert not lease_live({"spec": {"renewTime": "never", "leaseDurationSeconds": 10}}, 0)


def test_a_replica_name_must_name_a_lease():
    assert lease_name("capsule-0") == "capsule-replica-capsule-0"
    for bad in ("Upper", "under_score", "dot.", "x" * 250):
        with pytest.raises(DockerError, match="cannot name a Lease"):
            lease_name(bad)


def test_only_a_quotas_refusal_is_one():
    def error(status, message):
        e = ApiException(status=status, reason="Forbidden")
        e.body = json.dumps({"message": message})
        return e
    said = 'pods "p" is forbidden: exceeded quota: q, requested: pods=1, used: pods=1,' \
           ' limited: pods=1'
    assert quota_refusal(error(403, said)) == said
    assert quota_refusal(error(403, 'pods "p" is forbidden: failed quota: q: must specify'
                                    ' limits.cpu')).endswith("limits.cpu")
    assert quota_refusal(error(403, 'pods is forbidden: User "x" cannot create')) is None
    assert quota_refusal(error(409, said)) is None


# -- the stand-in's updates and quotas -----------------------------------------

def pod(name="p", version="5", **resources):
    return {"metadata": {"name": name, "namespace": "n", "uid": "u", "resourceVersion": version,
                         "labels": {"a": "1"}, "annotations": {"k": "v"}},
            "spec": {"containers": [{"name": "c", "image": "i", "resources": resources}]},
            "status": {"phase": "Running"}}


def test_a_merge_patch_changes_metadata_and_keeps_what_the_server_owns():
    changed = coord.patched(pod(), {"metadata": {"annotations": {"k": None, "r": "ra"},
                                                 "uid": "other", "resourceVersion": "5"},
                                    "status": {"phase": "Failed"}},
                            "application/merge-patch+json", "pods", "api/v1")
    assert changed["metadata"]["annotations"] == {"r": "ra"}
    assert changed["metadata"]["uid"] == "u" and changed["status"]["phase"] == "Running"


def test_a_patch_with_a_stale_version_is_a_conflict():
    with pytest.raises(coord.Refusal) as caught:
        coord.patched(pod(), {"metadata": {"resourceVersion": "4", "annotations": {"r": "x"}}},
                      "application/strategic-merge-patch+json", "pods", "api/v1")
    assert caught.value.code == 409 and caught.value.reason == "Conflict"
    assert caught.value.message == (
        'Operation cannot be fulfilled on pods "p": the object has been modified; please'
        " apply your changes to the latest version and try again")


def test_other_patches_are_refused():
    with pytest.raises(coord.Refusal) as caught:
        coord.patched(pod(), [{"op": "add"}], "application/json-patch+json", "pods", "api/v1")
    assert caught.value.code == 415
    with pytest.raises(coord.Refusal) as caught:
        coord.patched(pod(), {"spec": {"containers": []}}, "application/merge-patch+json",
                      "pods", "api/v1")
    assert caught.value.code == 422 and "pod updates may not change" in caught.value.message
    with pytest.raises(coord.Refusal) as caught:
        coord.patched(pod(), [1], "application/merge-patch+json", "pods", "api/v1")
    assert caught.value.code == 400


def test_a_put_with_a_stale_version_is_a_conflict():
    lease = {"metadata": {"name": "l", "resourceVersion": "3", "uid": "u"},
             "spec": {"holderIdentity": "a"}}
    body = {"metadata": {"name": "l", "resourceVersion": "3"}, "spec": {"holderIdentity": "b"}}
    assert coord.replaced(lease, body, "leases", "apis/coordination.k8s.io/v1")["spec"] == {
        "holderIdentity": "b"}
    body["metadata"]["resourceVersion"] = "2"
    with pytest.raises(coord.Refusal) as caught:
        coord.replaced(lease, body, "leases", "apis/coordination.k8s.io/v1")
    assert caught.value.code == 409
    assert 'on leases.coordination.k8s.io "l"' in caught.value.message


def test_a_quota_refuses_what_would_exceed_it_as_the_api_server_says():
    quota = {"metadata": {"name": "q"}, "spec": {"hard": {"limits.memory": "1Gi",
                                                          "cpu": "1", "pods": "3"}}}
    running = pod("a", limits={"memory": "512Mi", "cpu": "500m"})
    asked = pod("b", limits={"memory": "768Mi", "cpu": "250m"})
    with pytest.raises(coord.Refusal) as caught:
        coord.admit("b", asked, [quota], [running], quantity)
    assert caught.value.code == 403 and caught.value.message == (
        'pods "b" is forbidden: exceeded quota: q, requested: limits.memory=768Mi, used:'
        " limits.memory=512Mi, limited: limits.memory=1Gi")
    # What is over holds nothing.
    running["status"]["phase"] = "Failed"
    coord.admit("b", asked, [quota], [running], quantity)
    with pytest.raises(coord.Refusal) as caught:
        coord.admit("c", pod("c"), [quota], [], quantity)
    assert caught.value.message == (
        'pods "c" is forbidden: failed quota: q: must specify limits.memory,requests.cpu')
    assert coord.quota_status(quota, [asked], quantity) == {
        "hard": {"limits.memory": "1Gi", "requests.cpu": "1", "pods": "3"},
        "used": {"limits.memory": "768Mi", "requests.cpu": "250m", "pods": "1"}}
