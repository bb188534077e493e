"""
Replicas of capsule on one cluster (a base of
L{capsule.engine.kubernetes.KubernetesAPI}): each replica's liveness is a
C{coordination.k8s.io/v1} Lease named C{capsule-replica-NAME} in the
sessions' namespace, renewed by that replica (C{holderIdentity},
C{renewTime}, C{leaseDurationSeconds}); each session's and warm pod carries
the annotation L{REPLICA_ANNOTATION} naming the replica that holds it.  A
replica takes a pod over by a merge PATCH of that annotation with the pod's
C{resourceVersion} as a precondition, so of two replicas that try at once
one wins, and the other is told (409 Conflict).

The pod-creation refusal of a ResourceQuota (403 "exceeded quota") is
L{ClusterFull}: the cluster says it has no room, which a client is told as
a capacity refusal.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from kubernetes.client.exceptions import ApiException
from twisted.internet.defer import Deferred

from capsule.core.admission import CLUSTER_FULL
from capsule.core.errors import ContainerGone, DockerError
from capsule.engine.kube_pods import label_value_valid

# The replica holding a pod (a session's or a warm one).
REPLICA_ANNOTATION = "capsule.io/replica"
LEASE_PREFIX = "capsule-replica-"
# Tries of a claim whose pod changed between its read and its patch (its
# status, say) while its holder stayed the one expected.
CLAIM_TRIES = 5
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?\Z")


class ClusterFull(DockerError):
    """
    The cluster refused a session's pod for want of room (a ResourceQuota
    of the sessions' namespace is used up).
    """

    code = CLUSTER_FULL


def lease_name(replica: str) -> str:
    """
    The name of C{replica}'s Lease.

    @raise DockerError: if C{replica} cannot be in an object's name.
    """
    name = LEASE_PREFIX + replica
    if len(name) > 253 or not _NAME.match(name):
        raise DockerError(f"the replica name {replica!r} cannot name a Lease: use lower-case"
                          " letters, digits, '-' and '.' (as a pod's name)")
    return name


def micro_time(seconds: float) -> str:
    """
    A C{MicroTime} (RFC 3339 with microseconds) of the POSIX time C{seconds}.
    """
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text) -> float | None:
    """
    The POSIX time of an RFC 3339 time (with or without fractions), or
    C{None}.
    """
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def lease_live(lease: dict, now: float) -> bool:
    """
    Whether a replica's Lease still holds at C{now}: renewed less than its
    C{leaseDurationSeconds} ago.
    """
    spec = lease.get("spec") or {}
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds")
    if renewed is None or not isinstance(duration, (int, float)):
        return False
    return now < renewed + duration


def holder_of(pod: dict) -> str | None:
    """
    The replica holding a pod, by its annotation (C{None}: none says).
    """
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(REPLICA_ANNOTATION) or None


def quota_refusal(error: ApiException) -> str | None:
    """
    The API server's message when C{error} is a ResourceQuota's refusal of
    a pod (403, "exceeded quota" or "failed quota"), else C{None}.
    """
    if error.status != 403:
        return None
    try:
        message = json.loads(error.body).get("message") or ""
    except (TypeError, ValueError, AttributeError):
        return None
    return message if ("exceeded quota" in message or "failed quota" in message) else None


class PodReplicas:
    """
    The replica calls of L{capsule.core.interfaces.IDockerAPI} on a cluster.
    Needs C{_core}, C{_call}, C{_thd_request}, C{_reactor} and C{namespace}
    of L{capsule.engine.kubernetes.KubernetesAPI}.

    @ivar replica: this replica's name (C{None}: pods carry no holder).
    """

    replica: str | None = None

    def annotate_replica(self, manifest: dict) -> dict:
        """
        Mark a pod's manifest as held by this replica.
        """
        if self.replica:
            manifest.setdefault("metadata", {}).setdefault("annotations", {})[
                REPLICA_ANNOTATION] = self.replica
        return manifest

    def renew_replica(self, replica: str, seconds: float) -> Deferred:
        """
        Make or renew C{replica}'s Lease for C{seconds}; fire with C{None}.
        """
        name = lease_name(replica)
        duration = max(1, int(round(seconds)))

        def _thd():
            now = micro_time(self._reactor.seconds())
            api = "CoordinationV1Api"
            for _ in range(3):
                try:
                    lease = self._thd_request(api, "read_namespaced_lease", name,
                                              self.namespace)
                except ApiException as e:
                    if e.status != 404:
                        raise _failed(f"read the Lease {name}", e) from None
                    body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                            "metadata": {"name": name},
                            "spec": {"holderIdentity": replica, "leaseDurationSeconds": duration,
                                     "acquireTime": now, "renewTime": now,
                                     "leaseTransitions": 0}}
                    try:
                        self._thd_request(api, "create_namespaced_lease", self.namespace, body)
                        return None
                    except ApiException as e:
                        if e.status == 409:
                            continue
                        raise _failed(f"create the Lease {name}", e) from None
                spec = dict(lease.get("spec") or {})
                if spec.get("holderIdentity") != replica:
                    spec["acquireTime"] = now
                    spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
                spec.update(holderIdentity=replica, leaseDurationSeconds=duration,
                            renewTime=now)
                lease["spec"] = spec
                try:
                    self._thd_request(api, "replace_namespaced_lease", name, self.namespace,
                                      lease)
                    return None
                except ApiException as e:
                    if e.status not in (404, 409):
                        raise _failed(f"renew the Lease {name}", e) from None
            raise DockerError(f"could not renew the Lease {name}: it changed under each try")
        return self._call(_thd)

    def drop_replica(self, replica: str) -> Deferred:
        """
        Delete C{replica}'s Lease (a replica that stops cleanly): its pods
        are orphans at once.  Fire with whether there was one.
        """
        name = lease_name(replica)

        def _thd():
            try:
                self._thd_request("CoordinationV1Api", "delete_namespaced_lease", name,
                                  self.namespace)
            except ApiException as e:
                if e.status == 404:
                    return False
                raise _failed(f"delete the Lease {name}", e) from None
            return True
        return self._call(_thd)

    def live_replicas(self) -> Deferred:
        """
        Fire with the names of the replicas whose Lease holds now.
        """
        def _thd():
            try:
                found = self._thd_request("CoordinationV1Api", "list_namespaced_lease",
                                          self.namespace)
            except ApiException as e:
                raise _failed("list the Leases", e) from None
            now = self._reactor.seconds()
            return {lease["metadata"]["name"][len(LEASE_PREFIX):]
                    for lease in found.get("items") or []
                    if lease["metadata"]["name"].startswith(LEASE_PREFIX)
                    and lease_live(lease, now)}
        return self._call(_thd)

    def container_holder(self, container_id: str) -> Deferred:
        """
        Fire with the replica holding the pod C{container_id} (C{None}: none
        says); fail with L{capsule.core.errors.ContainerGone} if it is gone.
        """
        async def holder():
            pod = await self._get_pod(container_id)
            if pod is None:
                raise ContainerGone("the session's pod no longer exists")
            return holder_of(pod)
        return Deferred.fromCoroutine(holder())

    def claim_container(self, container_id: str, replica: str,
                        holder: str | None = None,
                        annotations: dict[str, str] | None = None,
                        labels: dict[str, str] | None = None) -> Deferred:
        """
        Take the pod C{container_id} for C{replica} if its holder is still
        C{holder}, writing C{annotations} with it, and those of C{labels}
        whose values a label can hold: fire with C{True} if
        C{replica} holds it now, C{False} if another replica does (it took
        it first: 409 Conflict on the pod's C{resourceVersion}, then another
        holder read); fail with L{capsule.core.errors.ContainerGone} if the
        pod is gone.
        """
        wanted = {k: v for k, v in (labels or {}).items() if label_value_valid(v)}

        def _thd():
            for _ in range(CLAIM_TRIES):
                try:
                    pod = self._thd_request("CoreV1Api", "read_namespaced_pod", container_id,
                                            self.namespace)
                except ApiException as e:
                    if e.status == 404:
                        raise ContainerGone("the session's pod no longer exists") from None
                    raise _failed(f"read the pod {container_id}", e) from None
                current = holder_of(pod)
                present = (pod["metadata"].get("annotations") or {})
                labelled = (pod["metadata"].get("labels") or {})
                if current == replica and all(present.get(k) == v for k, v in (
                        annotations or {}).items()) and all(
                        labelled.get(k) == v for k, v in wanted.items()):
                    return True
                if current not in (holder, replica):
                    return False
                patch = {"metadata": {"resourceVersion": pod["metadata"]["resourceVersion"],
                                      "annotations": {**(annotations or {}),
                                                      REPLICA_ANNOTATION: replica}}}
                if wanted:
                    patch["metadata"]["labels"] = wanted
                try:
                    self._thd_request("CoreV1Api", "patch_namespaced_pod", container_id,
                                      self.namespace, patch,
                                      _content_type="application/merge-patch+json")
                    return True
                except ApiException as e:
                    if e.status == 404:
                        raise ContainerGone("the session's pod no longer exists") from None
                    if e.status != 409:
                        raise _failed(f"claim the pod {container_id}", e) from None
            return False
        return self._call(_thd)


def _failed(what: str, error: ApiException) -> DockerError:
    try:
        message = json.loads(error.body).get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    return DockerError(f"Kubernetes could not {what}: {error.status}"
                       f" {(message or error.reason or '')[:300]}")
