"""
The Kubernetes engine behind L{IDockerAPI}: a session is a pod.

The REST calls go through the official Kubernetes client on a dedicated,
bounded L{ThreadPool} (as L{capsule.engine.docker} does with docker-py),
with an explicit timeout; they ask for the API's JSON as it is
(C{_preload_content=False}), so what capsule reads is what the API
reference describes.  Execs are streamed by the reactor: the pods/exec
WebSocket (subprotocol C{v5.channel.k8s.io}, else C{v4.channel.k8s.io}) is
opened by an Autobahn client (L{capsule.engine.kube_exec}), not by the
client library's blocking stream, and adapted to L{IExecProcess} (input on
channel 0, output on 1 and 2, the exec's end as a C{Status} on 3, resizes on
4, and with v5 the end of the input as a close of channel 0 on 255).

A session's pod is made from its L{ContainerSpec}: image, command,
environment, CPU and memory request and limit, the hardening capsule gives
its Docker containers as a security context (uid L{RUN_AS_USER}, non-root,
every capability dropped, no privilege escalation, the runtime's default
seccomp profile, a read-only root as an option), an optional RuntimeClass
(C{spec.runtime}: gVisor, Kata), and capsule's labels (instance, session,
user, profile...).  Named volumes are PersistentVolumeClaims.  Its secrets
(C{spec.secrets}) are a Secret of its own, which the pod refers to
(L{capsule.engine.kube_secrets}): never values in a pod or a claim.  The manifest,
and what a pod read back says, are L{capsule.engine.kube_pods}'s; the execs
L{capsule.engine.kube_execs}'s (L{PodExecs}, a base of L{KubernetesAPI}).

What Docker can do and a cluster cannot, this engine refuses with
L{Unsupported} (a L{DockerError}) rather than pretend: networks (the
cluster's own; sessions are kept apart by a NetworkPolicy instead), layer
sizes, CPU weights of a running pod; and, for now, snapshots and forks
(they would be VolumeSnapshots).  Kept sessions are
L{capsule.engine.kube_keep}'s (L{KeptPods}, a base of L{KubernetesAPI}):
every session pod has a volume claim of its own holding C{/workspace} and
the saved screen; a kept session is that claim, its pod deleted and made
again on resume.  A pod's files are read and written by an exec
(C{put_file}, C{read_file}: paths as Docker's, no symbolic link followed),
a kept session's in a short-lived pod mounting its claim; a pod's CPU time
is not known (C{container_cpu} fires C{None}).

Replicas of capsule on one cluster (L{capsule.engine.kube_replicas}, a base
of L{KubernetesAPI}): a Lease per replica, the replica holding a pod in its
annotation C{capsule.io/replica} (set at the pod's creation to L{replica}),
claims by a merge PATCH on the pod's C{resourceVersion}; a pod refused by a
ResourceQuota is L{ClusterFull}.
"""

from __future__ import annotations

import json
import threading
from typing import Callable

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from capsule.core.counting import Uncounted
from capsule.core.errors import ContainerGone, DockerError, DockerUnavailable
from capsule.core.interfaces import IDockerAPI
from capsule.core.spec import ContainerSpec
# (The pods' and the execs' names are this module's too, as they were.)
from capsule.engine.kube_execs import PodExecs, exec_argv  # noqa: F401
from capsule.engine.kube_replicas import ClusterFull, PodReplicas, holder_of, quota_refusal
# (put_file's and read_file's scripts are this module's too, as they were.)
from capsule.engine.kube_keep import (LINK_EXIT, NO_FILE_EXIT, PUT_SCRIPT,  # noqa: F401
                                      READ_SCRIPT, KeptPods)
from capsule.engine.kube_pods import (CONTAINER, LABELS_ANNOTATION, RUN_AS_USER,  # noqa: F401
                                      api_status,
                                      Unsupported, capsule_labels, docker_bytes,
                                      label_value_valid, pod_failed, pod_manifest, pod_name,
                                      pod_started, pod_state, volume_claim_name)
from capsule.engine.kube_policies import network_policies, own_namespace
from capsule.engine.kube_secrets import PodSecrets

_log = Logger()

HEALTH_THREADS = 2
# Said of what a cluster could do with VolumeSnapshots (snapshots, forks)
# and this engine does not do yet.
NOT_YET = "not yet on Kubernetes: "



@implementer(IDockerAPI)
class KubernetesAPI(KeptPods, PodExecs, PodReplicas, PodSecrets):
    """
    @param configuration: a C{kubernetes.client.Configuration} (from
        L{kube_configuration}: a kubeconfig, or the pod's service account).
    @param namespace: where session pods, their claims and policies are.
    @param threads: the size of the pool for REST calls.
    @param export_threads: the size of the pool that feeds exports.
    @param timeout: the timeout of each call, in seconds.
    @param start_timeout: how long a pod may take to run (image pulls).
    @param exec_users: the users an exec may ask for: a pod's execs run as
        its user (L{RUN_AS_USER}), whatever their name.
    @param memory_request: a pod's memory request as a share of its limit.
    @param storage_class: the storage class of volume claims (C{None}: the
        cluster's default).
    """

    # What a session runs in, as its end is told ("the session's pod was
    # deleted").
    session_unit = "pod"

    def __init__(self, reactor, configuration, namespace: str = "capsule",
                 threads: int = 16, export_threads: int = 4, timeout: float = 60.0,
                 start_timeout: float = 300.0, metrics=None,
                 exec_users=("developer", str(RUN_AS_USER)), memory_request: float = 1.0,
                 volume_size: str = "10Gi", storage_class: str | None = None) -> None:
        self._reactor = reactor
        self.metrics = metrics if metrics is not None else Uncounted()
        self.namespace = namespace
        self._timeout = timeout
        self._start_timeout = start_timeout
        self._exec_users = {"", None, *exec_users}
        self._memory_request = memory_request
        self._volume_size = volume_size
        self._storage_class = storage_class
        self._connections = threads + export_threads + HEALTH_THREADS
        # A configuration may be given as what reads it (a kubeconfig):
        # read at the first call, and again at each while it cannot be.
        self._configuration = None
        self._load_configuration = None
        self.host = "the cluster of capsule's kubeconfig"
        if callable(configuration):
            self._load_configuration = configuration
        else:
            self._configured(configuration)
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="capsule-kube")
        self._export_pool = ThreadPool(minthreads=0, maxthreads=export_threads,
                                       name="capsule-kube-export")
        self._health_pool = ThreadPool(minthreads=0, maxthreads=HEALTH_THREADS,
                                       name="capsule-kube-health")
        self._client_lock = threading.Lock()
        self._client = None

    def start(self) -> None:
        self._pool.start()
        self._export_pool.start()
        self._health_pool.start()

    def stop(self) -> None:
        self._pool.stop()
        self._export_pool.stop()
        self._health_pool.stop()

    def _configured(self, configuration) -> None:
        self.host = configuration.host
        configuration.connection_pool_maxsize = self._connections
        # A call fails at once when the server cannot be reached: the
        # caller decides whether to try again.
        configuration.retries = False
        self._configuration = configuration

    # -- the thread side ---------------------------------------------------

    def _thd_configuration(self):
        """
        The client's configuration, read first if it was given as what
        reads it.

        @raise DockerUnavailable: it cannot be read (no kubeconfig, a bad
            one, no such context): said as an engine that cannot be reached.
        """
        with self._client_lock:
            if self._configuration is None:
                try:
                    configuration = self._load_configuration()
                except Exception as e:
                    raise DockerUnavailable(
                        f"cannot read the Kubernetes configuration ({_short(e)}): give"
                        " --kubeconfig FILE (and --kube-context NAME), or run capsule in a"
                        " pod with a service account") from None
                self._configured(configuration)
            return self._configuration

    def _thd_client(self):
        configuration = self._thd_configuration()
        with self._client_lock:
            if self._client is None:
                self._client = kubernetes.client.ApiClient(configuration)
            return self._client

    def _thd_request(self, api: str, method: str, *args, **kwargs):
        """
        C{api}'s C{method} (C{"CoreV1Api"}, C{"read_namespaced_pod"}); fire
        with the answer's JSON.
        """
        client = self._thd_client()
        call = getattr(getattr(kubernetes.client, api)(client), method)
        try:
            response = call(*args, _preload_content=False, _request_timeout=self._timeout,
                            **kwargs)
        except urllib3.exceptions.HTTPError as e:
            raise self._unavailable(e) from None
        except ApiException as e:
            if e.status in (0, None):
                raise self._unavailable(e) from None
            if e.status == 401 or (e.status == 403 and _rbac_denied(e)):
                raise self._refused(e) from None
            raise
        try:
            data = response.data
        finally:
            response.release_conn()
        return json.loads(data) if data else {}

    def _unavailable(self, error: Exception) -> DockerUnavailable:
        return DockerUnavailable(
            f"cannot reach the Kubernetes API server at {self.host} ({_short(error)}):"
            " is the cluster up, and may capsule's kubeconfig or service account reach it?")

    def _refused(self, error: ApiException) -> DockerUnavailable:
        """
        The API server refuses capsule (401: who it is; 403: what it may
        do): said as an engine that cannot be reached (asked again), since
        no session can be served until its rights are given.
        """
        return DockerUnavailable(
            f"the Kubernetes API server at {self.host} refuses capsule ({api_status(error)}):"
            f" may its kubeconfig or service account use pods, pods/exec,"
            f" persistentvolumeclaims and secrets in the namespace {self.namespace}? (its Role:"
            " docs/kubernetes.md)")

    def _call(self, function: Callable, *args) -> Deferred:
        return self.metrics.docker_call(deferToThreadPool(
            self._reactor, self._pool, function, *args))

    def _core(self, method: str, *args, **kwargs) -> Deferred:
        return self._call(lambda: self._thd_request("CoreV1Api", method, *args, **kwargs))

    # -- IDockerAPI ----------------------------------------------------

    def ping(self) -> Deferred:
        def _thd():
            found = self._thd_request("VersionApi", "get_code")
            return {"Version": found.get("gitVersion"), "ApiVersion": "{}.{}".format(
                found.get("major"), found.get("minor")), "Os": "linux",
                "Platform": {"Name": "Kubernetes"}, "Kubernetes": found}
        return self.metrics.docker_call(deferToThreadPool(self._reactor, self._health_pool,
                                                          _thd))

    def info(self) -> Deferred:
        def _thd():
            found = self._thd_request("VersionApi", "get_code")
            # Pods live on when capsule or the API server restart: what
            # Docker calls live restore.
            # No SecurityOptions: the pods' uids are the nodes' business,
            # not this host's accounts'.
            return {"ServerVersion": found.get("gitVersion"), "LiveRestoreEnabled": True,
                    "Name": self.host, "Namespace": self.namespace,
                    "OperatingSystem": "Kubernetes"}
        return self._call(_thd)

    def image_exists(self, image: str) -> Deferred:
        # A cluster has no image store to ask: its nodes pull an image when
        # a pod needs it.  A missing one fails the pod's start (ImageMissing).
        return self.metrics.docker_call(deferToThreadPool(
            self._reactor, self._health_pool, self._thd_request, "VersionApi", "get_code"
        )).addCallback(lambda _: True)

    def container_sizes(self, labels):
        return _unsupported("the writable layer's size of a pod (the kubelet enforces a pod's"
                            " ephemeral-storage limit instead)")

    def disk_usage(self, labels, volumes=False):
        return _unsupported("the disk use of pods (the kubelet enforces a pod's"
                            " ephemeral-storage limit instead)")

    def create_session_container(self, session_id: str, spec: ContainerSpec) -> Deferred:
        return Deferred.fromCoroutine(self._create(spec))

    async def _create(self, spec: ContainerSpec) -> str:
        name = pod_name()
        manifest = self.annotate_replica(
            pod_manifest(name, spec, memory_request=self._memory_request))
        for volume, _ in spec.volumes:
            await self._ensure_claim(volume_claim_name(volume), spec.volume_labels)
        manifest, claim = await self._make_session_claim(name, manifest)
        try:
            # (After the claim, and owned by it: a Secret left by a capsule
            # that stopped here goes with the claim, which is found as a kept
            # session; the cluster's garbage collector deletes it with the
            # claim, whoever deletes that.)
            await self._make_secret(manifest, spec.secrets, claim)
            try:
                created = await self._core("create_namespaced_pod", self.namespace, manifest)
            except ApiException as e:
                refusal = quota_refusal(e)
                if refusal is not None:
                    _log.warn("the cluster has no room for a session's pod: {refusal}",
                              refusal=refusal)
                    raise ClusterFull(
                        "the cluster has no room for another session now (its quota is used"
                        f" up: {refusal}): try again later, or end a session") from None
                raise DockerError(f"Kubernetes could not create the session's pod:"
                                  f" {api_status(e)}") from None
            await self._running(name, created["metadata"]["resourceVersion"])
        except BaseException:
            try:
                await self._delete_pod(name)
                await self._gone(name, self._timeout)
                await self._delete_claim(name)
                await self._delete_secret(name)
            except DockerError:
                pass
            raise
        return name

    async def _ensure_claim(self, name: str, labels: dict[str, str]) -> None:
        claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                 "metadata": {"name": name,
                              "labels": {k: v for k, v in labels.items()
                                         if label_value_valid(v)},
                              "annotations": {LABELS_ANNOTATION: json.dumps(labels,
                                                                            sort_keys=True)}},
                 "spec": {"accessModes": ["ReadWriteOnce"],
                          "resources": {"requests": {"storage": self._volume_size}}}}
        if self._storage_class:
            claim["spec"]["storageClassName"] = self._storage_class
        try:
            await self._core("create_namespaced_persistent_volume_claim", self.namespace, claim)
        except ApiException as e:
            if e.status != 409:
                raise DockerError(f"Kubernetes could not create the volume claim {name}:"
                                  f" {api_status(e)}") from None

    async def _running(self, name: str, version: str) -> None:
        """
        Wait until the pod C{name} runs (or ran), watching it from
        C{version}; fail with L{ImageMissing} or L{DockerError} when it
        cannot start.
        """
        deadline = self._reactor.seconds() + self._start_timeout
        while True:
            left = deadline - self._reactor.seconds()
            if left <= 0:
                raise DockerError(f"the session's pod did not start within"
                                  f" {self._start_timeout:.0f} seconds")
            pod, version = await self._call(self._thd_watch_start, name, version, left)
            if pod is None:
                raise ContainerGone("the session's pod was deleted while it started")
            if pod_started(pod):
                return

    def _thd_watch_start(self, name: str, version: str | None, left: float):
        """
        Watch the pod until it has started or cannot (or C{left} seconds
        pass); return it (C{None}: deleted) and the last resourceVersion.
        """
        if version is None:
            try:
                pod = self._thd_request("CoreV1Api", "read_namespaced_pod", name,
                                        self.namespace)
            except ApiException as e:
                if e.status == 404:
                    return None, None
                raise
            version = pod["metadata"]["resourceVersion"]
            if pod_started(pod) or pod_failed(pod):
                return pod, version
        client = self._thd_client()
        try:
            response = kubernetes.client.CoreV1Api(client).list_namespaced_pod(
                self.namespace, field_selector=f"metadata.name={name}", watch=True,
                resource_version=version, timeout_seconds=max(1, int(min(left, 60))),
                allow_watch_bookmarks=True, _preload_content=False,
                _request_timeout=(self._timeout, min(left, 60) + self._timeout))
        except urllib3.exceptions.HTTPError as e:
            raise self._unavailable(e) from None
        pod = None
        try:
            for line in _lines(response):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        # Too old: start again from what is there now.
                        return self._thd_watch_start(name, None, left)
                    raise DockerError(f"watching the session's pod failed: {obj.get('message')}")
                if kind == "BOOKMARK":
                    version = obj["metadata"]["resourceVersion"]
                    continue
                version = obj["metadata"]["resourceVersion"]
                if kind == "DELETED":
                    return None, version
                pod = obj
                if pod_started(pod):
                    return pod, version
                pod_failed(pod)
        except urllib3.exceptions.HTTPError as e:
            raise self._unavailable(e) from None
        finally:
            response.release_conn()
        return pod or {}, version

    async def _delete_pod(self, name: str, grace: int = 0) -> bool:
        try:
            await self._call(lambda: self._thd_request(
                "CoreV1Api", "delete_namespaced_pod", name, self.namespace,
                grace_period_seconds=grace, propagation_policy="Background"))
        except ApiException as e:
            if e.status == 404:
                return False
            raise DockerError(f"Kubernetes could not delete the pod {name}: {api_status(e)}"
                              ) from None
        return True

    def inspect_network(self, name):
        return _unsupported("Docker networks (a cluster's network is its own: session pods"
                            " are kept apart by a NetworkPolicy)")

    def ensure_network(self, name, options, labels, internal=False):
        return self.inspect_network(name)

    def network_addresses(self, name: str) -> Deferred:
        """
        The addresses of the pods of the namespace (C{name} is Docker's and
        has no meaning here): C{{address: pod name}}.
        """
        d = self._core("list_namespaced_pod", self.namespace)
        d.addCallback(lambda found: {
            ip["ip"]: pod["metadata"]["name"] for pod in found.get("items") or []
            for ip in (pod.get("status") or {}).get("podIPs") or [] if ip.get("ip")})
        return d

    def ensure_network_policies(self, capsule_namespace: str | None = None) -> Deferred:
        """
        Make sure the session namespace's NetworkPolicies exist
        (L{capsule.engine.kube_policies.network_policies}: session pods
        take connections from capsule's pods only, fenced ones send
        nothing, open ones reach the internet but no private range); fire
        with C{[(policy, created)]}.  A policy of that name already there
        (applied with C{deploy/kubernetes/}, or by an operator) is used as
        it is, with a warning when it says something else.

        @param capsule_namespace: where capsule's pods are (C{None}: its
            own pod's, L{own_namespace}).
        """
        wanted = network_policies(self.namespace, capsule_namespace or own_namespace())

        def _thd():
            answers = []
            for policy in wanted:
                name = policy["metadata"]["name"]
                try:
                    answers.append((self._thd_request(
                        "NetworkingV1Api", "create_namespaced_network_policy", self.namespace,
                        policy), True))
                    continue
                except ApiException as e:
                    if e.status != 409:
                        raise DockerError(f"Kubernetes could not create the network policy"
                                          f" {name}: {api_status(e)}") from None
                try:
                    found = self._thd_request("NetworkingV1Api",
                                              "read_namespaced_network_policy", name,
                                              self.namespace)
                except ApiException as e:
                    raise DockerError(f"Kubernetes could not read the network policy {name}:"
                                      f" {api_status(e)}") from None
                if found.get("spec") != policy["spec"]:
                    _log.warn("the network policy {name} in {namespace} is not capsule's: it"
                              " is used as it is", name=name, namespace=self.namespace)
                answers.append((found, False))
            return answers
        return self._call(_thd)

    def set_cpu_shares(self, container_id, shares):
        return _unsupported("changing a running pod's CPU weight")

    def remove_container(self, container_id: str) -> Deferred:
        """
        Remove the session's pod, its claim (a kept session's too) and its
        Secret; fire with whether the pod or the claim existed.
        """
        async def remove():
            existed = await self._delete_pod(container_id)
            if existed:
                # Deleting is asynchronous: the pod is gone once its
                # containers are (the API then answers 404).
                await self._gone(container_id, self._timeout)
            if await self._delete_claim(container_id):
                await self._remove_files_pods(container_id)
                await self._delete_secret(container_id)
                return True
            await self._delete_secret(container_id)
            return existed
        return Deferred.fromCoroutine(remove())

    async def _get_pod(self, name: str) -> dict | None:
        try:
            return await self._core("read_namespaced_pod", name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise DockerError(f"Kubernetes could not read the pod {name}: {api_status(e)}"
                              ) from None

    def list_containers(self, labels: dict[str, str]) -> Deferred:
        """
        The pods carrying C{labels}, and the kept sessions (claims whose pod
        is gone) as stopped containers.
        """
        async def listed():
            pods = await self._list_pods(labels)
            return [{"id": pod["metadata"]["name"], "name": pod["metadata"]["name"],
                     "labels": capsule_labels(pod), "state": pod_state(pod)["Status"],
                     "replica": holder_of(pod),
                     "annotations": dict(pod["metadata"].get("annotations") or {})}
                    for pod in pods] + await self._kept_listed(labels, pods)
        return Deferred.fromCoroutine(listed())

    def _list_pods(self, labels: dict[str, str]) -> Deferred:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items())
                            if label_value_valid(v))
        d = self._core("list_namespaced_pod", self.namespace, label_selector=selector)

        def matching(found):
            # Values no label can hold are checked in capsule's annotation.
            return [pod for pod in found.get("items") or []
                    if all(capsule_labels(pod).get(k) == v for k, v in labels.items())]
        d.addCallback(matching)
        return d

    def container_state(self, container_id: str) -> Deferred:
        async def state():
            pod = await self._get_pod(container_id)
            if pod is None:
                return await self._kept_state(container_id)
            return pod_state(pod)
        return Deferred.fromCoroutine(state())

    def keeper_address(self, container_id: str) -> Deferred:
        """
        The pod's address, and no keeper's secret: a pod never carries one
        (L{pod_manifest} drops it; sessions here have no network of their
        own, so capsule gives none and reaches keepers by the exec stream).
        """
        async def address():
            pod = await self._get_pod(container_id)
            if pod is None:
                raise ContainerGone("the session's pod no longer exists")
            return (pod.get("status") or {}).get("podIP") or None, None
        return Deferred.fromCoroutine(address())

    def container_cpu(self, container_id):
        # The metrics API (metrics.k8s.io) is not always there, and is a
        # sample, not a counter: not asked.  (Idleness then goes by output
        # and input alone.)
        return succeed(None)

    def unpause_container(self, container_id: str) -> Deferred:
        # A pod cannot be paused (the API has no pause, and this engine
        # makes no forks, whose copy is what pauses a Docker container):
        # never was.  The pod is read so that an unreachable cluster says so.
        d = Deferred.fromCoroutine(self._get_pod(container_id))
        d.addCallback(lambda _: False)
        return d

    def snapshot_container(self, container_id, repository, tag, labels):
        return _unsupported(NOT_YET + "snapshots of a pod's files (a cluster has no commit;"
                            " they will be VolumeSnapshots of its volume claims)")

    def list_snapshots(self, labels):
        return self.snapshot_container(None, None, None, labels)

    def remove_snapshot(self, snapshot):
        return self.snapshot_container(None, None, None, {})

    def copy_snapshot_volumes(self, snapshot, labels):
        return self.snapshot_container(None, None, None, labels)

    def prune_snapshots(self, labels, grace=600.0):
        return self.snapshot_container(None, None, None, labels)

    def fork_container(self, container_id, session_id, spec, fast=True):
        return _unsupported(NOT_YET + "forks of a pod (a new pod on VolumeSnapshots of its"
                            " volume claims)")


def _lines(response):
    buffer = b""
    for chunk in response.stream(4096, decode_content=True):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def _unsupported(what: str) -> Deferred:
    d = Deferred()
    d.errback(Unsupported(f"the Kubernetes engine cannot do this: {what}"))
    return d



def _rbac_denied(error: ApiException) -> bool:
    """
    Whether a 403 is the authorizer's (RBAC: C{User "..." cannot list
    resource "pods"...}), not an admission's refusal of one object (a quota
    exceeded, an unknown RuntimeClass).
    """
    message = api_status(error)
    return 'User "' in message and " cannot " in message


def _short(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def kube_configuration(kubeconfig: str | None = None, context: str | None = None):
    """
    The client's configuration: from C{kubeconfig} (C{None}: C{$KUBECONFIG}
    or C{~/.kube/config}), or, inside a pod with no kubeconfig, from its
    service account.
    """
    import os

    import kubernetes.config

    configuration = kubernetes.client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and not (
            os.environ.get("KUBECONFIG")):
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    else:
        kubernetes.config.load_kube_config(config_file=kubeconfig, context=context,
                                           client_configuration=configuration)
    return configuration
