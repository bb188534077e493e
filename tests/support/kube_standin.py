"""
A stand-in Kubernetes API server for tests: the calls capsule's Kubernetes
engine (L{capsule.engine.kubernetes}) makes, over real HTTP and WebSocket,
with every pod run as a real container on the local Docker engine.

No API server can be installed on the machines that run capsule's tests, so
the engine's contract and end-to-end tests run against this.  It follows
the Kubernetes API reference (core/v1 Pod, PersistentVolumeClaim, Secret, Status,
WatchEvent; networking.k8s.io/v1 NetworkPolicy; the pods/exec streaming
protocol of C{k8s.io/apimachinery/pkg/util/remotecommand}) for what it
does, and says here what it does not.

What it reproduces
==================

  - C{GET /version} (a C{version.Info}).
  - Pods in any namespace: C{POST} (201, the pod as stored: C{uid},
    C{resourceVersion}, C{creationTimestamp}, C{generateName}, phase
    C{Pending}); C{GET} one (200, or 404 C{NotFound}); C{GET} the list
    (C{PodList} with the list's C{resourceVersion}) by C{labelSelector}
    (equality and set-based: C{k=v}, C{k==v}, C{k!=v}, C{k}, C{!k},
    C{k in (a,b)}, C{k notin (a,b)}) and by C{fieldSelector}
    (C{metadata.name}, C{metadata.namespace}, C{status.phase});
    C{?watch=true} from a C{resourceVersion} (the events after it, then
    live ones; none given or C{0}: synthetic C{ADDED} events for what
    exists), one JSON C{WatchEvent} a line, ended after C{timeoutSeconds};
    C{DELETE} (200 with the pod; C{gracePeriodSeconds} from the query or
    the C{DeleteOptions} body, 0 removes at once (the object first, then
    its container, as a force deletion does), otherwise the pod is
    kept with a C{deletionTimestamp} while its container is stopped with
    that grace, then removed with a C{DELETED} event; C{preconditions} on
    C{uid}/C{resourceVersion}, 409 C{Conflict} when they do not hold).
  - Errors as C{Status} objects (C{kind: Status}, C{status: Failure},
    C{message}, C{reason}, C{details}, C{code}) with the API server's
    messages: 404 C{NotFound}, 409 C{AlreadyExists} (a name taken) and
    C{Conflict} (a failed precondition), 422 C{Invalid} (a name that is not
    a DNS-1123 subdomain, or label, a label value that is not one, a pod
    without containers or image, with C{causes}), 400 C{BadRequest} (exec
    into a pod that is not running, a missing command, no subprotocol it
    speaks), 403 C{Forbidden} (an unknown C{runtimeClassName}), 405
    C{MethodNotAllowed}.  A watch from a C{resourceVersion} older than the
    history it keeps (L{KubeStandin.compact} forgets it, as etcd's
    compaction does) gets 200 and then an C{ERROR} event whose object is a
    410 C{Expired} Status ("too old resource version"), as the watch cache
    answers.
  - Pod status from the container, read from Docker at each read: phase
    C{Pending} (being created; C{ErrImagePull} or C{ImagePullBackOff}
    waiting reasons when the image is missing, C{CreateContainerConfigError}
    when C{runAsNonRoot} meets an image that runs as root), C{Running}
    (C{podIP}, C{Ready} condition, C{state.running}), C{Succeeded} or
    C{Failed} (C{restartPolicy: Never}: C{state.terminated} with
    C{exitCode}, C{reason} C{Completed}, C{Error} or C{OOMKilled}).  Changes
    are sent to watchers as C{MODIFIED} events (Docker is polled every
    L{POLL} seconds while someone watches).
  - The pod spec as the kubelet applies it to a Docker container:
    C{command}/C{args} (entrypoint and command), C{env} values and
    C{valueFrom.secretKeyRef} (resolved from the stored Secret as the
    container is made; a missing Secret or key, unless C{optional: true},
    leaves the pod C{Pending}, waiting with C{CreateContainerConfigError}
    and the kubelet's message: C{secret "NAME" not found}, C{couldn't find
    key KEY in Secret NAMESPACE/NAME}),
    C{workingDir}, C{hostname}, C{securityContext} (pod and container:
    C{runAsUser}, C{runAsGroup}, C{runAsNonRoot}, C{capabilities}
    C{drop}/C{add}, C{allowPrivilegeEscalation: false} as
    no-new-privileges, C{readOnlyRootFilesystem}, C{seccompProfile}
    C{RuntimeDefault} as Docker's default profile and C{Unconfined}),
    C{resources} (C{limits.memory} as the memory and swap limit,
    C{limits.cpu} as the CPU quota, C{requests.cpu} as CPU shares as the
    kubelet computes them), C{shareProcessNamespace} as an init process
    (PID 1 reaps zombies, as the pause container does), C{runtimeClassName}
    through a table of runtime classes to Docker runtimes, C{emptyDir}
    volumes (C{medium: Memory} as a tmpfs of C{sizeLimit}) and
    C{persistentVolumeClaim} volumes (a Docker volume per claim, given to
    the pod's C{fsGroup} as the kubelet does: group-owned, group-writable,
    set-gid), mounted whole or by C{subPath} (a directory of the volume,
    made where missing as the kubelet makes it, with the owner and mode of
    the volume's root; bound from the volume's directory on the engine's
    host; an absolute C{subPath} or one with C{..} fails the pod with
    C{CreateContainerConfigError}).  The
    container carries the pod's labels (so the tests' clean-up by label
    finds it) and the kubelet's C{io.kubernetes.pod.*} labels.
  - pods/exec over WebSocket (C{GET} or C{POST} with C{command},
    C{container}, C{stdin}, C{stdout}, C{stderr}, C{tty}): subprotocols
    C{v5.channel.k8s.io} and C{v4.channel.k8s.io}; binary messages whose
    first byte is the channel (0 stdin, 1 stdout, 2 stderr, 3 the exec's
    end as a Status: C{Success}, or C{Failure} with reason
    C{NonZeroExitCode} and the code as the C{ExitCode} cause, 4 resize
    C{{"Width", "Height"}}, and with v5, 255 with a channel number: that
    channel closed, the stdin's end passed to the process); an empty
    message on the lowest writable channel once the streams are set up; a
    real C{docker exec} in the pod's container, with or without a TTY.
  - Updates (L{tests.support.kube_standin_coord}): C{PUT} of a whole
    object (its C{spec}, labels and annotations; what the server owns
    kept) and C{PATCH} as C{application/merge-patch+json} or
    C{application/strategic-merge-patch+json} (both as an RFC 7386 merge,
    which is what a strategic merge does to labels and annotations); a
    C{metadata.resourceVersion} in the body is a precondition: 409
    C{Conflict} ("the object has been modified; please apply your changes
    to the latest version and try again") when it is not the object's;
    the change is a C{MODIFIED} watch event.  A pod's spec cannot change
    (422 C{Invalid}); its status is not taken from a patch.
  - C{coordination.k8s.io/v1} Leases: create, get, list, C{PUT}, delete
    (the spec is stored as it is given: C{holderIdentity}, C{renewTime},
    C{leaseDurationSeconds}...).
  - ResourceQuotas: create, get, list (C{status.hard} and C{status.used}
    computed at each read), delete; enforced when a pod is created for
    C{pods}, C{limits.memory}, C{requests.memory} (or C{memory}),
    C{limits.cpu}, C{requests.cpu} (or C{cpu}), counting the pods not
    C{Succeeded} or C{Failed}, a request not given being its limit: 403
    C{Forbidden} with the API server's messages (C{pods "NAME" is
    forbidden: exceeded quota: QUOTA, requested: ..., used: ..., limited:
    ...}, and C{failed quota: QUOTA: must specify ...} for a pod that does
    not say a limited resource).

  - core/v1 Secrets: C{POST} (C{data} as base64, C{stringData} merged
    into it and not stored, C{type} C{Opaque} by default; 400 C{BadRequest}
    for C{data} that is not base64, 422 C{Invalid} for a key that is not a
    config key or more than 1 MiB of data), C{GET} one and the list by
    C{labelSelector} (as pods), C{DELETE}; 404 and 409 C{AlreadyExists}
    as for pods.

  - PersistentVolumeClaims: C{POST}, C{GET} one and the list by
    C{labelSelector} (as pods), C{DELETE}, and C{PATCH} as the updates
    above (a claim's labels and annotations by a merge patch, its
    C{resourceVersion} a precondition).

What it does not
================

  - Authentication and authorization: every request is allowed (no
    RBAC: the rights a Role gives are not checked here), but in the
    namespaces of L{KubeStandin.forbidden}, where every request gets the
    403 C{Forbidden} Status RBAC gives a service account without a Role
    there (C{... is forbidden: User "..." cannot list resource "pods" ...}).
  - Scheduling and nodes (every pod is bound at once to one node,
    C{spec.nodeName} L{NODE}, or the one it names), quotas of anything but
    the five pod resources above (no scopes, no object counts), limit
    ranges, admission webhooks, pod security admission (the
    C{securityContext} is applied, not judged), evictions of its own (L{KubeStandin.evict} makes one: the
    container killed, the pod C{Failed} with reason C{Evicted} and a
    message, kept), restarts (C{restartPolicy} is taken as C{Never}),
    readiness and liveness probes, init and sidecar containers (only the
    first container of a pod runs), image pulls (an image must be on the
    local engine), C{imagePullPolicy}, C{valueFrom} in C{env} other than
    C{secretKeyRef} (a pod with one waits with C{CreateContainerConfigError}),
    C{envFrom}, Secrets as volumes, ConfigMaps, a retry of a container the
    kubelet could not make (a Secret made after its pod does not start
    it), a per-pod process limit, C{ephemeral-storage}
    limits (accepted, not enforced), C{resources.requests.memory}.
  - Namespaces are not objects: every namespace exists.
  - No garbage collector: C{ownerReferences} are stored, and an object
    whose owner is deleted stays.
  - Updates: no JSON patch (C{application/json-patch+json}: 415), no
    update of a pod's spec, no subresources other than exec (no
    C{status}, C{log}, C{attach}, C{portforward}, C{resize}); no
    C{deletecollection}; no C{resourceVersionMatch}, pagination
    (C{limit}/C{continue}), C{allowWatchBookmarks} (accepted, no
    BOOKMARK events are sent), protobuf, server-side apply, dry runs.
  - The exec protocols before v4 (C{channel.k8s.io}, C{v2}, C{v3},
    C{base64.channel.k8s.io}) and SPDY.
  - PersistentVolumeClaims are bound at once (no provisioner, no storage
    class); their Docker volume is made when a pod first mounts them and
    removed with the claim; a claim in use is kept with a
    C{deletionTimestamp} (the C{pvc-protection} finalizer) until no pod
    uses it.  Sizes and access modes are not enforced (a C{ReadWriteOnce}
    claim mounts in any number of pods, as on a single node).
  - NetworkPolicies are stored, validated by name and listed, not enforced:
    pods join one Docker network (C{network}, C{none} by default).
"""

from __future__ import annotations

import itertools
import json
import random
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import docker
import docker.errors
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from capsule.engine.docker import DockerAPI
from tests.support import kube_standin_coord as coord
from tests.support import kube_standin_secrets as secrets

_log = Logger()

# How often Docker is asked about the pods' containers while a watch is open.
POLL = 0.5
# How many changes are kept for watches that start from a resourceVersion.
HISTORY = 1000
STANDIN_LABEL = "io.capsule.kube-standin"
# The one node: every pod is bound to it (spec.nodeName).
NODE = "standin-node"
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1123_SUBDOMAIN = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or"
    " '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex"
    " used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
_LABEL_MESSAGE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or"
    " '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or"
    " 'my_value',  or '12345', regex used for validation is"
    " '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def docker_time(text: str | None) -> str | None:
    """
    A Docker time (nanoseconds, or the zero time) as the API's RFC 3339.
    """
    if not text or text.startswith("0001-"):
        return None
    return text.split(".")[0].rstrip("Z") + "Z"


class ApiError(Exception):
    """
    An answer of the API server's as a C{Status}.
    """

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            status["details"] = self.details
        return status


def not_found(resource: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{resource} "{name}" not found',
                    {"name": name, "kind": resource})


def invalid(kind: str, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """
    A 422 Invalid for C{causes}: (field, value, why).
    """
    texts = [f'{f}: Invalid value: "{v}": {why}' for f, v, why in causes]
    message = f'{kind} "{name}" is invalid: ' + (
        texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]")
    return ApiError(422, "Invalid", message, {
        "name": name, "kind": kind,
        "causes": [{"reason": "FieldValueInvalid", "message": f'Invalid value: "{v}": {why}',
                    "field": f} for f, v, why in causes]})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# -- selectors -------------------------------------------------------------

def parse_label_selector(text: str) -> list:
    """
    A label selector's requirements: (key, operator, values).
    """
    requirements = []
    for part in _split_top(text):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", part)
        if m:
            values = {v.strip() for v in m.group(3).split(",") if v.strip()}
            requirements.append((m.group(1), m.group(2), values))
            continue
        m = re.fullmatch(r"(\S+?)\s*(==|!=|=)\s*(\S*)", part)
        if m:
            op = "!=" if m.group(2) == "!=" else "="
            requirements.append((m.group(1), op, {m.group(3)}))
            continue
        if part.startswith("!"):
            requirements.append((part[1:].strip(), "!exists", set()))
        elif re.fullmatch(r"\S+", part):
            requirements.append((part, "exists", set()))
        else:
            raise bad_request(f"unable to parse requirement: {part}")
    for key, _, values in requirements:
        if not _label_key_valid(key):
            raise bad_request(f"unable to parse requirement: invalid label key {key!r}")
    return requirements


def _split_top(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def label_selected(labels: dict, requirements: list) -> bool:
    for key, op, values in requirements:
        present = key in labels
        value = labels.get(key)
        if op == "=" and not (present and value in values):
            return False
        if op == "!=" and present and value in values:
            return False
        if op == "in" and not (present and value in values):
            return False
        if op == "notin" and present and value in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!exists" and present:
            return False
    return True


FIELDS = {
    "metadata.name": lambda o: o["metadata"]["name"],
    "metadata.namespace": lambda o: o["metadata"]["namespace"],
    "status.phase": lambda o: (o.get("status") or {}).get("phase", ""),
}


def parse_field_selector(text: str, kind: str) -> list:
    requirements = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([a-zA-Z.]+)\s*(==|!=|=)\s*(.*)", part)
        if not m or m.group(1) not in FIELDS or (
                m.group(1) == "status.phase" and kind != "Pod"):
            name = m.group(1) if m else part
            raise bad_request(f'"{name}" is not a known field selector: only'
                              ' "metadata.name", "metadata.namespace"')
        requirements.append((FIELDS[m.group(1)], m.group(2) != "!=", m.group(3)))
    return requirements


def field_selected(obj: dict, requirements: list) -> bool:
    return all((get(obj) == value) == equal for get, equal, value in requirements)


def _label_key_valid(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def validate_metadata(kind: str, metadata: dict, name: str) -> list:
    causes = []
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        causes.append(("metadata.name", name, _SUBDOMAIN_MESSAGE))
    for key, value in (metadata.get("labels") or {}).items():
        if not _label_key_valid(key):
            causes.append(("metadata.labels", key, "name part must consist of alphanumeric"
                           " characters, '-', '_' or '.', and must start and end with an"
                           " alphanumeric character"))
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            causes.append(("metadata.labels", str(value),
                           "must be no more than 63 characters" if isinstance(value, str)
                           and len(value) > 63 else _LABEL_MESSAGE))
    for key in (metadata.get("annotations") or {}):
        if not _label_key_valid(key):
            causes.append(("metadata.annotations", key, "name part must consist of"
                           " alphanumeric characters, '-', '_' or '.'"))
    return causes


# -- quantities ------------------------------------------------------------

_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
             "m": 0.001, "": 1}


def quantity(text) -> float:
    """
    A resource quantity (C{"512Mi"}, C{"250m"}, C{"2"}, C{"1e3"}) as a
    number.
    """
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m|)",
                     str(text).strip())
    if not m:
        raise ValueError(f"quantities must match the regular expression"
                         f" '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {text!r}")
    return float(m.group(1)) * _SUFFIXES[m.group(2)]


# -- the store -------------------------------------------------------------

@dataclass
class Watcher:
    kind: str
    namespace: str
    labels: list
    fields: list
    request: object
    done: Deferred = field(default_factory=Deferred)

    def send(self, event_type: str, obj: dict) -> None:
        if self.done.called:
            return
        if obj["metadata"].get("namespace") != self.namespace and self.namespace:
            return
        if not label_selected(obj["metadata"].get("labels") or {}, self.labels):
            return
        if not field_selected(obj, self.fields):
            return
        self.request.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")


class Store:
    """
    The stored objects of each kind, their resourceVersions, a bounded
    history of changes for watches, and the open watches.
    """

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}
        self._rv = itertools.count(1)
        self.version = 0
        self.history: list[tuple[int, str, str, dict]] = []
        self.oldest = 0
        self.watchers: list[Watcher] = []

    def put(self, kind: str, obj: dict, event: str) -> dict:
        self.version = next(self._rv)
        obj["metadata"]["resourceVersion"] = str(self.version)
        key = (kind, obj["metadata"]["namespace"], obj["metadata"]["name"])
        if event == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        snapshot = json.loads(json.dumps(obj))
        self.history.append((self.version, kind, event, snapshot))
        if len(self.history) > HISTORY:
            del self.history[: len(self.history) - HISTORY]
            self.oldest = self.history[0][0] - 1
        for watcher in list(self.watchers):
            if watcher.kind == kind:
                watcher.send(event, snapshot)
        return obj

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return self.objects.get((kind, namespace, name))

    def items(self, kind: str, namespace: str) -> list[dict]:
        return [o for (k, ns, _), o in sorted(self.objects.items())
                if k == kind and (ns == namespace or not namespace)]

    def compact(self) -> None:
        self.history.clear()
        self.oldest = self.version


# -- the server ------------------------------------------------------------

KINDS = {
    # (group path, plural): (kind, list kind, apiVersion)
    ("api/v1", "pods"): ("Pod", "PodList", "v1"),
    ("api/v1", "persistentvolumeclaims"): (
        "PersistentVolumeClaim", "PersistentVolumeClaimList", "v1"),
    ("apis/networking.k8s.io/v1", "networkpolicies"): (
        "NetworkPolicy", "NetworkPolicyList", "networking.k8s.io/v1"),
    ("api/v1", "resourcequotas"): ("ResourceQuota", "ResourceQuotaList", "v1"),
    ("api/v1", "secrets"): ("Secret", "SecretList", "v1"),
    ("apis/coordination.k8s.io/v1", "leases"): (
        "Lease", "LeaseList", "coordination.k8s.io/v1"),
}
_PATH = re.compile(
    r"/(?P<group>api/v1|apis/networking\.k8s\.io/v1|apis/coordination\.k8s\.io/v1)/namespaces/(?P<ns>[^/]+)/"
    r"(?P<plural>[a-z]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[a-z]+))?)?/?\Z")


class KubeStandin:
    """
    The server's state and behaviour; L{site} is what to listen with.

    @param docker_client: a C{docker.APIClient} of the engine that runs
        the pods.
    @param network: the Docker network the pods join (C{"none"}: none).
    @param runtime_classes: RuntimeClass name -> Docker runtime.
    """

    def __init__(self, reactor, docker_client: docker.APIClient | None = None,
                 network: str = "none", runtime_classes: dict[str, str] | None = None,
                 threads: int = 8) -> None:
        self.reactor = reactor
        self.docker = docker_client or docker.APIClient(version="auto", timeout=60)
        self.network = network
        self.runtime_classes = dict(runtime_classes or {})
        self.id = uuid.uuid4().hex[:12]
        self.store = Store()
        self.requests: list[tuple[str, str]] = []
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="kube-standin")
        self._containers: dict[str, str] = {}  # pod uid -> container id
        self._starting: dict[str, Deferred] = {}
        self._volumes: set[str] = set()
        self._subpaths: set[tuple[str, str]] = set()
        self._evicted: dict[str, str] = {}  # pod uid -> the eviction's message
        # Namespaces where every request is refused, as RBAC refuses a
        # service account without a Role there (403 Forbidden).
        self.forbidden: set[str] = set()
        self._poll = task.LoopingCall(self._refresh_watched)
        self._poll.clock = reactor
        self.exec_engine = DockerAPI(reactor, threads=4, export_threads=1, timeout=60)
        self.site = Site(_Root(self))
        self.site.noisy = False

    def start(self) -> None:
        self._pool.start()
        self.exec_engine.start()
        self._poll.start(POLL, now=False)

    async def stop(self) -> None:
        if self._poll.running:
            self._poll.stop()
        for watcher in list(self.store.watchers):
            self._end_watch(watcher)
        await self._thread(self._thd_remove_all)
        self.exec_engine.stop()
        self._pool.stop()

    def _thread(self, function, *args) -> Deferred:
        return deferToThreadPool(self.reactor, self._pool, function, *args)

    def _thd_remove_all(self) -> None:
        for c in self.docker.containers(all=True, filters={"label": f"{STANDIN_LABEL}={self.id}"}):
            try:
                self.docker.remove_container(c["Id"], force=True, v=True)
            except docker.errors.APIError:
                pass
        for v in self.docker.volumes(filters={"label": f"{STANDIN_LABEL}={self.id}"}).get(
                "Volumes") or []:
            try:
                self.docker.remove_volume(v["Name"], force=True)
            except docker.errors.APIError:
                pass

    # -- what tests use beside the API ------------------------------------

    def compact(self) -> None:
        """
        Forget the history of changes, as etcd's compaction does: a watch
        from an older resourceVersion is then told 410 Expired.
        """
        self.store.compact()

    async def evict(self, namespace: str, pod: str,
                    message: str = "The node was low on resource: memory.") -> None:
        """
        Evict a pod as a kubelet under pressure does: its container killed,
        the pod C{Failed} with reason C{Evicted} and C{message}, kept.
        """
        obj = self.store.get("Pod", namespace, pod)
        self._evicted[obj["metadata"]["uid"]] = message
        container_id = self._containers.get(obj["metadata"]["uid"])
        if container_id is not None:
            await self._thread(self.docker.kill, container_id)
        await self._refresh([obj])

    def container_of(self, namespace: str, pod: str) -> str | None:
        """
        The Docker container running the pod, if any.
        """
        obj = self.store.get("Pod", namespace, pod)
        return None if obj is None else self._containers.get(obj["metadata"]["uid"])

    # -- dispatch ----------------------------------------------------------

    async def handle(self, request) -> tuple[int, dict] | None:
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        self.requests.append((method, path))
        args = {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()}
        one = lambda name, default="": (args.get(name) or [default])[0]  # noqa: E731
        if path.rstrip("/") == "/version":
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-capsule-standin",
                         "gitCommit": "0" * 40, "gitTreeState": "clean",
                         "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
                         "compiler": "gc", "platform": "linux/amd64"}
        m = _PATH.match(path)
        if not m or (m.group("group"), m.group("plural")) not in KINDS:
            raise ApiError(404, "NotFound", "the server could not find the requested resource",
                           {})
        kind, list_kind, api_version = KINDS[(m.group("group"), m.group("plural"))]
        ns, name, sub, plural = m.group("ns"), m.group("name"), m.group("sub"), m.group("plural")
        if ns in self.forbidden:
            verb = ("create" if sub == "exec" or method == "POST" else "delete"
                    if method == "DELETE" else "watch" if one("watch") in ("1", "true")
                    else "get" if name else "list")
            resource = f"{plural}/{sub}" if sub else plural
            # api/v1 is the core group, named "".
            group = m.group("group").split("/")[1] if m.group("group").startswith("apis/") else ""
            raise ApiError(403, "Forbidden", (
                f'{resource}{f" {name!r}" if name else ""} is forbidden: User'
                f' "system:serviceaccount:capsule:capsule" cannot {verb} resource'
                f' "{resource}" in API group "{group}" in the namespace'
                f' "{ns}"').replace("'", '"'), {"kind": plural, "name": name or ""})
        if sub is not None:
            if kind == "Pod" and sub == "exec" and method in ("GET", "POST"):
                return await self.exec(request, ns, name, args)
            raise ApiError(404, "NotFound", "the server could not find the requested resource",
                           {})
        if name is None:
            if method == "GET":
                labels = parse_label_selector(one("labelSelector"))
                fields = parse_field_selector(one("fieldSelector"), kind)
                if one("watch") in ("1", "true", "True"):
                    await self.watch(request, kind, ns, labels, fields,
                                     one("resourceVersion"), one("timeoutSeconds"))
                    return None
                if kind in ("Pod", "ResourceQuota"):
                    await self._refresh(self.store.items("Pod", ns))
                items = [self._quota_status(o) if kind == "ResourceQuota" else o
                         for o in self.store.items(kind, ns)
                         if label_selected(o["metadata"].get("labels") or {}, labels)
                         and field_selected(o, fields)]
                return 200, {"kind": list_kind, "apiVersion": api_version,
                             "metadata": {"resourceVersion": str(self.store.version)},
                             "items": items}
            if method == "POST":
                body = _json_body(request)
                return 201, await self.create(kind, api_version, plural, ns, body)
            raise ApiError(405, "MethodNotAllowed",
                           "the server does not allow this method on the requested resource")
        obj = self.store.get(kind, ns, name)
        if method == "GET":
            if obj is None:
                raise not_found(plural, name)
            if kind == "Pod":
                await self._refresh([obj])
            if kind == "ResourceQuota":
                await self._refresh(self.store.items("Pod", ns))
                return 200, self._quota_status(obj)
            return 200, obj
        if method in ("PUT", "PATCH"):
            if obj is None:
                raise not_found(plural, name)
            return 200, self.update(kind, plural, m.group("group"), obj, request, method)
        if method == "DELETE":
            if obj is None:
                raise not_found(plural, name)
            options = _json_body(request) if request.content.getvalue().strip() else {}
            grace = one("gracePeriodSeconds", None)
            if grace is None:
                grace = options.get("gracePeriodSeconds")
            preconditions = options.get("preconditions") or {}
            for key in ("uid", "resourceVersion"):
                if preconditions.get(key) and preconditions[key] != obj["metadata"][key]:
                    raise ApiError(409, "Conflict", (
                        f'Operation cannot be fulfilled on {plural} "{name}": Precondition'
                        f' failed: {key.upper() if key == "uid" else "ResourceVersion"}'
                        f' in precondition: {preconditions[key]},'
                        f' {key.upper() if key == "uid" else "ResourceVersion"} in object'
                        f' meta: {obj["metadata"][key]}'),
                        {"name": name, "kind": plural})
            return 200, await self.delete(kind, obj, None if grace is None else int(grace))
        raise ApiError(405, "MethodNotAllowed",
                       "the server does not allow this method on the requested resource")

    # -- create ------------------------------------------------------------

    async def create(self, kind: str, api_version: str, plural: str, ns: str,
                     body: dict) -> dict:
        if not isinstance(body, dict):
            raise bad_request("the body of the request was in an unknown format")
        if body.get("kind") not in (None, kind):
            raise bad_request(f"the API version in the data ({body.get('apiVersion')}) does not"
                              f" match the expected API version ({api_version})")
        metadata = dict(body.get("metadata") or {})
        name = metadata.get("name") or ""
        if not name and metadata.get("generateName"):
            name = metadata["generateName"] + "".join(
                random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        if not name:
            raise invalid(kind, "", [("metadata.name", "", "name or generateName is required")])
        if metadata.get("namespace") not in (None, ns):
            raise bad_request("the namespace of the provided object does not match the"
                              " namespace sent on the request")
        causes = validate_metadata(kind, metadata, name)
        spec = body.get("spec") or {}
        if kind == "Pod":
            causes += self._validate_pod(spec)
        elif kind == "NetworkPolicy" and not isinstance(spec.get("podSelector"), dict):
            causes.append(("spec.podSelector", "", "Required value"))
        if kind == "Secret":
            try:
                body, more = secrets.stored_secret(name, body)
            except coord.Refusal as e:
                raise ApiError(e.code, e.reason, e.message, e.details) from None
            causes += more
        if causes:
            raise invalid(kind, name, causes)
        if self.store.get(kind, ns, name) is not None:
            raise ApiError(409, "AlreadyExists", f'{plural} "{name}" already exists',
                           {"name": name, "kind": plural})
        if kind == "Pod" and spec.get("runtimeClassName") and (
                spec["runtimeClassName"] not in self.runtime_classes):
            raise ApiError(403, "Forbidden", f'pods "{name}" is forbidden: pod rejected:'
                           f' RuntimeClass "{spec["runtimeClassName"]}" not found',
                           {"name": name, "kind": "pods"})
        if kind == "Pod":
            await self._refresh(self.store.items("Pod", ns))
            try:
                coord.admit(name, body, self.store.items("ResourceQuota", ns),
                            self.store.items("Pod", ns), quantity)
            except coord.Refusal as e:
                raise ApiError(e.code, e.reason, e.message, e.details) from None
        elif kind == "ResourceQuota":
            for resource, value in (spec.get("hard") or {}).items():
                try:
                    quantity(value)
                except ValueError as e:
                    raise invalid(kind, name, [(f"spec.hard[{resource}]", str(value), str(e))]
                                  ) from None
        metadata.update(name=name, namespace=ns, uid=str(uuid.uuid4()),
                        creationTimestamp=now_rfc3339())
        metadata.setdefault("labels", {})
        obj = {"kind": kind, "apiVersion": api_version, "metadata": metadata, "spec": spec}
        if kind == "Secret":
            # A Secret has no spec: its type and data.
            obj = {"kind": kind, "apiVersion": api_version, "metadata": metadata,
                   "type": body["type"], "data": body["data"]}
        if kind == "Pod":
            # Scheduled at once, on the one node there is.
            spec.setdefault("nodeName", NODE)
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            obj["status"] = {"phase": "Pending", "qosClass": _qos(spec)}
        elif kind == "PersistentVolumeClaim":
            obj["status"] = {"phase": "Bound", "accessModes": spec.get("accessModes") or [],
                             "capacity": (spec.get("resources") or {}).get("requests") or {}}
            spec.setdefault("volumeName", f"pvc-{metadata['uid']}")
        self.store.put(kind, obj, "ADDED")
        if kind == "Pod":
            self._starting[metadata["uid"]] = self._thread(self._thd_run_pod, obj)
            self._starting[metadata["uid"]].addBoth(self._started, obj)
        return obj

    @staticmethod
    def _validate_pod(spec: dict) -> list:
        causes = []
        containers = spec.get("containers")
        if not isinstance(containers, list) or not containers:
            return [("spec.containers", "", "Required value")]
        for i, c in enumerate(containers):
            if not _DNS1123_LABEL.match(str(c.get("name") or "")):
                causes.append((f"spec.containers[{i}].name", str(c.get("name") or ""),
                               "a lowercase RFC 1123 label must consist of lower case"
                               " alphanumeric characters or '-'"))
            if not c.get("image"):
                causes.append((f"spec.containers[{i}].image", "", "Required value"))
            for kind in ("limits", "requests"):
                for resource, value in ((c.get("resources") or {}).get(kind) or {}).items():
                    try:
                        quantity(value)
                    except ValueError as e:
                        causes.append((f"spec.containers[{i}].resources.{kind}[{resource}]",
                                       str(value), str(e)))
        return causes

    def _started(self, result, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        self._starting.pop(uid, None)
        current = self.store.get("Pod", pod["metadata"]["namespace"], pod["metadata"]["name"])
        if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
            message = result.getErrorMessage() if hasattr(result, "getErrorMessage") else str(
                result)
            _log.warn("stand-in: pod {name} did not start: {error}",
                      name=pod["metadata"]["name"], error=message)
            return
        container_id, waiting = result
        if current is None or current["metadata"]["uid"] != uid:
            # Deleted while it was being made.
            if container_id:
                self._thread(self._thd_remove, container_id)
            return
        if container_id:
            self._containers[uid] = container_id
        if waiting:
            self._set_status(current, {**current["status"], "containerStatuses": [
                {"name": current["spec"]["containers"][0]["name"], "ready": False,
                 "restartCount": 0, "image": current["spec"]["containers"][0]["image"],
                 "imageID": "", "started": False, "state": {"waiting": waiting}}]})
            return
        ensureDeferred(self._refresh([current]))

    # -- the kubelet's part: a pod as a Docker container -------------------

    def _thd_run_pod(self, pod: dict):
        spec, metadata = pod["spec"], pod["metadata"]
        c = spec["containers"][0]
        pod_sc, sc = spec.get("securityContext") or {}, c.get("securityContext") or {}
        pick = lambda key: sc.get(key, pod_sc.get(key))  # noqa: E731
        try:
            image = self.docker.inspect_image(c["image"])
        except docker.errors.ImageNotFound:
            return None, {"reason": "ErrImagePull", "message": (
                f'rpc error: code = NotFound desc = failed to pull and unpack image'
                f' "{c["image"]}": not found on the stand-in\'s engine (it pulls nothing)')}
        run_as = pick("runAsUser")
        if pick("runAsNonRoot"):
            image_user = (image.get("Config") or {}).get("User") or "0"
            if run_as == 0 or (run_as is None and image_user.split(":")[0] in ("0", "root")):
                return None, {"reason": "CreateContainerConfigError",
                              "message": "container has runAsNonRoot and image will run as root"}
        user = None
        if run_as is not None:
            user = str(run_as)
            if pick("runAsGroup") is not None:
                user += f":{pick('runAsGroup')}"
        resources = c.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        memory = int(quantity(limits["memory"])) if "memory" in limits else None
        cpus = quantity(limits["cpu"]) if "cpu" in limits else None
        request_cpu = requests.get("cpu", limits.get("cpu"))
        shares = max(2, int(quantity(request_cpu) * 1024)) if request_cpu is not None else 2
        caps = sc.get("capabilities") or {}
        security_opt = []
        if sc.get("allowPrivilegeEscalation") is False:
            security_opt.append("no-new-privileges:true")
        seccomp = (pick("seccompProfile") or {}).get("type")
        if seccomp == "Unconfined":
            security_opt.append("seccomp=unconfined")
        mounts, tmpfs = [], {}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for mount in c.get("volumeMounts") or []:
            volume = volumes.get(mount["name"]) or {}
            read_only = bool(mount.get("readOnly"))
            if "emptyDir" in volume:
                empty = volume["emptyDir"] or {}
                if empty.get("medium") == "Memory":
                    options = "rw,nosuid,nodev"
                    if empty.get("sizeLimit"):
                        options += f",size={int(quantity(empty['sizeLimit']))}"
                    tmpfs[mount["mountPath"]] = options
                else:
                    mounts.append(docker.types.Mount(
                        mount["mountPath"], None, type="volume", read_only=read_only,
                        labels={STANDIN_LABEL: self.id}))
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                found = self.store.get("PersistentVolumeClaim", metadata["namespace"], claim)
                if found is None:
                    return None, {"reason": "ContainerCreating", "message": (
                        f'persistentvolumeclaim "{claim}" not found')}
                volume_name = self._volume_name(found)
                sub = mount.get("subPath") or ""
                if sub and not _subpath_valid(sub):
                    return None, {"reason": "CreateContainerConfigError", "message": (
                        f"failed to prepare subPath for volumeMount \"{mount['name']}\" of"
                        f" container \"{c['name']}\"")}
                # (Every subPath of the claim this pod mounts, at once.)
                self._thd_claim_volume(volume_name, found, c["image"],
                                       pod_sc.get("fsGroup"), *[
                                           m.get("subPath") for m in c.get("volumeMounts") or []
                                           if m["name"] == mount["name"] and m.get("subPath")])
                if sub:
                    # The volume's directory, bound (the engine's API has no
                    # subpath of a volume before 1.45).
                    source = self.docker.inspect_volume(volume_name)["Mountpoint"]
                    mounts.append(docker.types.Mount(mount["mountPath"], f"{source}/{sub}",
                                                     type="bind", read_only=read_only))
                else:
                    mounts.append(docker.types.Mount(mount["mountPath"], volume_name,
                                                     type="volume", read_only=read_only))
        runtime = self.runtime_classes.get(spec.get("runtimeClassName") or "") or None
        labels = {**(metadata.get("labels") or {}), STANDIN_LABEL: self.id,
                  "io.kubernetes.pod.name": metadata["name"],
                  "io.kubernetes.pod.namespace": metadata["namespace"],
                  "io.kubernetes.pod.uid": metadata["uid"],
                  "io.kubernetes.container.name": c["name"]}
        host_config = self.docker.create_host_config(
            mem_limit=memory, memswap_limit=memory,
            nano_cpus=int(cpus * 1e9) if cpus else None, cpu_shares=shares,
            init=bool(spec.get("shareProcessNamespace")),
            cap_drop=list(caps.get("drop") or []) or None,
            cap_add=list(caps.get("add") or []) or None,
            security_opt=security_opt or None, read_only=bool(sc.get("readOnlyRootFilesystem")),
            tmpfs=tmpfs or None, mounts=mounts or None, network_mode=self.network,
            runtime=runtime)
        # (As the kubelet: a missing Secret or key fails the container's
        # making; the pod stays Pending.)
        env, waiting = secrets.resolved_env(
            c.get("env") or [], metadata["namespace"],
            lambda namespace, name: self.store.get("Secret", namespace, name))
        if waiting is not None:
            return None, waiting
        created = self.docker.create_container(
            c["image"], entrypoint=c.get("command"), command=c.get("args"),
            name=f"k8s_{c['name']}_{metadata['name']}_{metadata['namespace']}"
                 f"_{metadata['uid'][:8]}_0",
            hostname=spec.get("hostname") or metadata["name"][:63], user=user,
            working_dir=c.get("workingDir"), environment=env, labels=labels,
            host_config=host_config, detach=True, stdin_open=bool(c.get("stdin")),
            tty=bool(c.get("tty")))
        self.docker.start(created["Id"])
        return created["Id"], None

    def _thd_claim_volume(self, name: str, claim: dict, image: str, fs_group,
                          *subs: str) -> None:
        """
        Make the Docker volume of a claim, the first time a pod mounts it;
        with an C{fsGroup}, give it to that group as the kubelet does
        (group-owned, group-writable, set-gid), with a throwaway container.
        A C{subPath} not there yet is made as the kubelet makes it: a
        directory with the owner and mode of the volume's root.
        """
        script = []
        if name not in self._volumes:
            self.docker.create_volume(name, labels={**(claim["metadata"].get("labels") or {}),
                                                    STANDIN_LABEL: self.id})
            if fs_group is not None:
                script.append('chgrp -R "$1" /v && chmod -R g+rwX /v && chmod g+s /v')
        missing = [sub for sub in subs if (name, sub) not in self._subpaths]
        if missing:
            script.append('shift; for s; do mkdir -p "/v/$s" && chown --reference=/v "/v/$s"'
                          ' && chmod --reference=/v "/v/$s" || exit 1; done')
        if script:
            helper = self.docker.create_container(
                image, entrypoint=["sh", "-c", " && ".join(script), "sh",
                                   str(int(fs_group or 0)), *missing],
                user="0", labels={STANDIN_LABEL: self.id},
                host_config=self.docker.create_host_config(
                    binds={name: {"bind": "/v", "mode": "rw"}}, network_mode="none"))
            try:
                self.docker.start(helper["Id"])
                self.docker.wait(helper["Id"], timeout=60)
            finally:
                self.docker.remove_container(helper["Id"], force=True)
        self._volumes.add(name)
        self._subpaths.update((name, sub) for sub in subs)

    def _volume_name(self, claim: dict) -> str:
        return f"kube-{self.id}-{claim['metadata']['namespace']}-{claim['metadata']['name']}"

    def _thd_inspect(self, container_id: str) -> dict | None:
        try:
            return self.docker.inspect_container(container_id)
        except docker.errors.NotFound:
            return None

    def _thd_remove(self, container_id: str, grace: int = 0) -> None:
        try:
            if grace:
                self.docker.stop(container_id, timeout=grace)
            self.docker.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if "already in progress" not in str(e):
                raise

    async def _refresh(self, pods: list[dict]) -> None:
        """
        Bring the status of C{pods} up to date with their containers.
        """
        for pod in pods:
            uid = pod["metadata"]["uid"]
            container_id = self._containers.get(uid)
            if container_id is None:
                continue
            info = await self._thread(self._thd_inspect, container_id)
            current = self.store.get("Pod", pod["metadata"]["namespace"], pod["metadata"]["name"])
            if current is None or current["metadata"]["uid"] != uid:
                continue
            self._set_status(current, self._status(current, info))

    async def _refresh_watched(self) -> None:
        if any(w.kind == "Pod" for w in self.store.watchers):
            await self._refresh(self.store.items("Pod", ""))

    def _set_status(self, pod: dict, status: dict) -> None:
        if status != pod.get("status"):
            pod["status"] = status
            self.store.put("Pod", pod, "MODIFIED")

    def _status(self, pod: dict, info: dict | None) -> dict:
        c = pod["spec"]["containers"][0]
        status = {"phase": "Pending", "qosClass": pod["status"].get("qosClass"),
                  "hostIP": "127.0.0.1", "startTime": pod["status"].get("startTime")
                  or pod["metadata"]["creationTimestamp"]}
        container = {"name": c["name"], "image": c["image"], "restartCount": 0,
                     "ready": False, "started": False}
        if info is None:
            container["state"] = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                                 "message": "The container could not be located"
                                                 " when the pod was deleted."}}
            status["phase"] = "Failed"
        else:
            state = info["State"]
            container["imageID"] = info.get("Image", "")
            container["containerID"] = f"docker://{info['Id']}"
            networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
            ip = next((n.get("IPAddress") for n in networks.values() if n.get("IPAddress")), None)
            if ip:
                status["podIP"] = ip
                status["podIPs"] = [{"ip": ip}]
            if state.get("Running"):
                status["phase"] = "Running"
                container.update(ready=True, started=True, state={
                    "running": {"startedAt": docker_time(state.get("StartedAt"))}})
            elif state.get("Status") == "created":
                container["state"] = {"waiting": {"reason": "ContainerCreating"}}
            else:
                code = state.get("ExitCode", 0)
                reason = "OOMKilled" if state.get("OOMKilled") else (
                    "Completed" if code == 0 else "Error")
                container["state"] = {"terminated": {
                    "exitCode": code, "reason": reason,
                    "startedAt": docker_time(state.get("StartedAt")),
                    "finishedAt": docker_time(state.get("FinishedAt")),
                    "containerID": f"docker://{info['Id']}"}}
                status["phase"] = "Succeeded" if code == 0 else "Failed"
        evicted = self._evicted.get(pod["metadata"]["uid"])
        if evicted is not None:
            status.update(phase="Failed", reason="Evicted", message=evicted)
            status.pop("podIP", None)
            status.pop("podIPs", None)
        ready = "True" if status["phase"] == "Running" else "False"
        status["conditions"] = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": ready},
            {"type": "Ready", "status": ready}]
        status["containerStatuses"] = [container]
        return status

    # -- update ------------------------------------------------------------

    def update(self, kind: str, plural: str, group: str, obj: dict, request,
               method: str) -> dict:
        """
        A C{PUT} (the whole object) or a merge C{PATCH}, the body's
        C{metadata.resourceVersion} a precondition (409 C{Conflict}); the
        change is sent to watchers as a C{MODIFIED} event.
        """
        body = _json_body(request)
        content_type = (request.getHeader(b"content-type") or b"").decode("ascii", "replace")
        try:
            if method == "PUT":
                if not isinstance(body, dict):
                    raise coord.Refusal(400, "BadRequest",
                                        "the body of the request was in an unknown format", {})
                changed = coord.replaced(obj, body, plural, group)
            else:
                changed = coord.patched(obj, body, content_type, plural, group)
        except coord.Refusal as e:
            raise ApiError(e.code, e.reason, e.message, e.details) from None
        causes = validate_metadata(kind, changed["metadata"], obj["metadata"]["name"])
        if causes:
            raise invalid(kind, obj["metadata"]["name"], causes)
        if kind == "Pod":
            # The stored pod is the one the kubelet's side updates.
            obj["metadata"] = changed["metadata"]
            changed = obj
        return self.store.put(kind, changed, "MODIFIED")

    def _quota_status(self, quota: dict) -> dict:
        answer = json.loads(json.dumps(quota))
        answer["status"] = coord.quota_status(
            quota, self.store.items("Pod", quota["metadata"]["namespace"]), quantity)
        return answer

    # -- delete ------------------------------------------------------------

    async def delete(self, kind: str, obj: dict, grace: int | None) -> dict:
        if kind == "Pod":
            return await self._delete_pod(obj, grace)
        if kind == "PersistentVolumeClaim":
            users = [p for p in self.store.items("Pod", obj["metadata"]["namespace"])
                     if any((v.get("persistentVolumeClaim") or {}).get("claimName")
                            == obj["metadata"]["name"] for v in p["spec"].get("volumes") or [])]
            if users:
                obj["metadata"].setdefault("deletionTimestamp", now_rfc3339())
                obj["metadata"]["finalizers"] = ["kubernetes.io/pvc-protection"]
                return self.store.put(kind, obj, "MODIFIED")
            await self._thread(self._thd_remove_volume, self._volume_name(obj))
        return self.store.put(kind, obj, "DELETED")

    def _thd_remove_volume(self, name: str) -> None:
        self._volumes.discard(name)
        self._subpaths = {(v, sub) for v, sub in self._subpaths if v != name}
        try:
            self.docker.remove_volume(name, force=True)
        except docker.errors.NotFound:
            pass

    async def _delete_pod(self, pod: dict, grace: int | None) -> dict:
        uid = pod["metadata"]["uid"]
        if grace is None:
            grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        starting = self._starting.get(uid)
        if starting is not None:
            await starting
        container_id = self._containers.get(uid)
        if grace > 0 and container_id is not None and "deletionTimestamp" not in pod["metadata"]:
            pod["metadata"]["deletionTimestamp"] = now_rfc3339()
            pod["metadata"]["deletionGracePeriodSeconds"] = grace
            answer = json.loads(json.dumps(self.store.put("Pod", pod, "MODIFIED")))
            d = self._thread(self._thd_remove, container_id, grace)
            d.addBoth(lambda _: self._forget_pod(pod))
            return answer
        # At once (a force deletion): the object goes first, then the
        # kubelet kills what ran, as the API server and the kubelet do.
        answer = self._forget_pod(pod)
        if container_id is not None:
            # The API server forgets a pod deleted with no grace at once (its
            # kubelet kills the container after): a read while the container
            # is removed here finds it being deleted, not as it was (and no
            # watch is told of that as a change).
            pod["metadata"].setdefault("deletionTimestamp", now_rfc3339())
            pod["metadata"]["deletionGracePeriodSeconds"] = 0
            await self._thread(self._thd_remove, container_id)
        return answer

    def _forget_pod(self, pod: dict) -> dict:
        uid = pod["metadata"]["uid"]
        self._containers.pop(uid, None)
        current = self.store.get("Pod", pod["metadata"]["namespace"], pod["metadata"]["name"])
        if current is None or current["metadata"]["uid"] != uid:
            return pod
        answer = self.store.put("Pod", pod, "DELETED")
        # Claims kept by pvc-protection go with their last pod.
        for claim in self.store.items("PersistentVolumeClaim", pod["metadata"]["namespace"]):
            if "deletionTimestamp" in claim["metadata"]:
                self.reactor.callLater(0, ensureDeferred,
                                       self.delete("PersistentVolumeClaim", claim, None))
        return answer

    # -- watch -------------------------------------------------------------

    async def watch(self, request, kind: str, ns: str, labels, fields, since: str,
                    timeout: str) -> None:
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        watcher = Watcher(kind, ns, labels, fields, request)
        if kind == "Pod":
            await self._refresh(self.store.items("Pod", ns))
        if since in ("", "0"):
            for obj in self.store.items(kind, ns):
                watcher.send("ADDED", obj)
        else:
            if not since.isdigit():
                raise bad_request(f"invalid resource version: {since}")
            start = int(since)
            if start < self.store.oldest:
                request.write(json.dumps({"type": "ERROR", "object": ApiError(
                    410, "Expired",
                    f"too old resource version: {start} ({self.store.oldest + 1})").status()}
                ).encode() + b"\n")
                request.finish()
                return
            for version, k, event, obj in self.store.history:
                if version > start and k == kind:
                    watcher.send(event, obj)
        self.store.watchers.append(watcher)
        seconds = int(timeout) if timeout.isdigit() else 1800
        timer = self.reactor.callLater(seconds, self._end_watch, watcher)
        request.notifyFinish().addBoth(lambda _: (
            timer.cancel() if timer.active() else None, self._drop_watch(watcher)))

    def _drop_watch(self, watcher: Watcher) -> None:
        if watcher in self.store.watchers:
            self.store.watchers.remove(watcher)
        if not watcher.done.called:
            watcher.done.callback(None)

    def _end_watch(self, watcher: Watcher) -> None:
        done = watcher.done.called
        self._drop_watch(watcher)
        if not done:
            try:
                watcher.request.finish()
            except RuntimeError:
                pass

    # -- exec --------------------------------------------------------------

    async def exec(self, request, ns: str, name: str, args: dict):
        pod = self.store.get("Pod", ns, name)
        if pod is None:
            raise not_found("pods", name)
        await self._refresh([pod])
        containers = [c["name"] for c in pod["spec"]["containers"]]
        container = (args.get("container") or [""])[0]
        if not container:
            if len(containers) > 1:
                raise bad_request(f"a container name must be specified for pod {name},"
                                  f" choose one of: [{' '.join(containers)}]")
            container = containers[0]
        if container not in containers:
            raise bad_request(f"container {container} is not valid for pod {name}")
        phase = pod["status"].get("phase")
        if phase in ("Succeeded", "Failed"):
            raise bad_request("cannot exec into a container in a completed pod;"
                              f" current phase is {phase}")
        container_id = self._containers.get(pod["metadata"]["uid"])
        if phase != "Running" or container_id is None:
            raise bad_request(f'unable to upgrade connection: container not found ("{container}")')
        command = args.get("command") or []
        if not command:
            raise bad_request("you must specify at least one command for the container")
        flag = lambda key: (args.get(key) or ["false"])[0] in ("1", "true", "True")  # noqa
        options = {k: flag(k) for k in ("stdin", "stdout", "stderr", "tty")}
        if options["tty"] and options["stderr"]:
            raise bad_request("tty and stderr cannot both be true")
        if not any(options[k] for k in ("stdin", "stdout", "stderr")):
            raise bad_request("you must specify at least 1 of stdin, stdout, stderr")
        offered = [p.strip() for p in (request.getHeader("sec-websocket-protocol") or "").split(",")]
        if not request.getHeader("upgrade") or not any(p in EXEC_PROTOCOLS for p in offered):
            raise bad_request("Upgrade request required" if not request.getHeader("upgrade")
                              else "unable to upgrade: no subprotocol of the stand-in's"
                              f" ({', '.join(EXEC_PROTOCOLS)}) was offered")
        factory = WebSocketServerFactory()
        factory.protocol = ExecServerProtocol
        factory.setProtocolOptions(maxMessagePayloadSize=16 * 1024 * 1024, autoFragmentSize=0,
                                   openHandshakeTimeout=30, closeHandshakeTimeout=2)
        factory.standin = self
        factory.exec_target = (container_id, command, options)
        WebSocketResource(factory).render(request)
        return None


class ExecServerProtocol(WebSocketServerProtocol):
    """
    One pods/exec stream: the kubelet's side, relaying a real
    C{docker exec}.
    """

    process = None
    ended = False

    def onConnect(self, request):
        for p in request.protocols:
            if p in EXEC_PROTOCOLS:
                self.subprotocol = p
                return p
        raise ValueError("no subprotocol")

    def onOpen(self):
        standin = self.factory.standin
        container_id, command, options = self.factory.exec_target
        self.options = options
        self._pending: list[bytes] = []
        relay = _ExecRelay(self)
        d = standin.exec_engine.spawn_exec(relay, container_id, command, "", "", {}, None,
                                           tty=options["tty"])
        d.addCallbacks(self._spawned, self._failed)

    def _spawned(self, process) -> None:
        self.process = process
        if self.state != self.STATE_OPEN:
            process.loseConnection()
            return
        # The output flows to the client only as fast as it takes it in
        # (the HTTP channel that had the connection lets go of it).
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()
        self.transport.registerProducer(process, True)
        # The streams are set up: an empty message on the lowest writable
        # channel says so.
        first = STDOUT if self.options["stdout"] else STDERR if self.options["stderr"] else ERROR
        self.sendMessage(bytes([first]), isBinary=True)
        pending, self._pending = self._pending, []
        for message in pending:
            self.onMessage(message, True)

    def _failed(self, failure) -> None:
        self.send_status(None, failure.getErrorMessage())

    def output(self, fd: int, data: bytes) -> None:
        if self.state == self.STATE_OPEN and (
                (fd == 1 and self.options["stdout"]) or (fd == 2 and self.options["stderr"])):
            self.sendMessage(bytes([fd]) + data, isBinary=True)

    def send_status(self, code: int | None, message: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if self.state != self.STATE_OPEN:
            return
        if code == 0:
            status = {"metadata": {}, "status": "Success"}
        elif code is not None:
            status = {"metadata": {}, "status": "Failure",
                      "message": f"command terminated with non-zero exit code: error executing"
                                 f" command, exit code {code}",
                      "reason": "NonZeroExitCode",
                      "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
        else:
            status = {"metadata": {}, "status": "Failure", "reason": "InternalError",
                      "message": f"error executing command: {message or 'exit code unknown'}"}
        self.sendMessage(bytes([ERROR]) + json.dumps(status).encode(), isBinary=True)
        self.sendClose(1000)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.process is None:
            self._pending.append(payload)
            return
        if not payload:
            return
        channel, data = payload[0], payload[1:]
        if channel == STDIN and self.options["stdin"]:
            self.process.write(data)
        elif channel == RESIZE and self.options["tty"]:
            try:
                size = json.loads(data)
                self.process.resize(int(size["Width"]), int(size["Height"]))
            except (ValueError, KeyError, TypeError):
                _log.warn("stand-in: a resize message that is not one: {data!r}", data=data[:100])
        elif channel == CLOSE and self.subprotocol == "v5.channel.k8s.io" and data[:1] == b"\0":
            transport = getattr(self.process, "transport", None)
            if transport is not None and not self.ended:
                transport.loseWriteConnection()

    def onClose(self, wasClean, code, reason):
        if self.process is not None and not self.ended:
            self.ended = True
            self.process.loseConnection()


class _ExecRelay(ProcessProtocol):
    def __init__(self, server: ExecServerProtocol) -> None:
        self.server = server

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.server.output(fd, data)

    def processEnded(self, reason) -> None:
        self.server.send_status(getattr(reason.value, "exitCode", None))


def _subpath_valid(sub: str) -> bool:
    """
    A C{subPath} the API server accepts: relative, without C{..}.
    """
    return not sub.startswith("/") and ".." not in sub.split("/")


def _qos(spec: dict) -> str:
    resources = [c.get("resources") or {} for c in spec.get("containers") or []]
    if not any(r.get("limits") or r.get("requests") for r in resources):
        return "BestEffort"
    guaranteed = all(
        (r.get("limits") or {}).get(k) is not None
        and (r.get("requests") or {}).get(k, (r.get("limits") or {}).get(k))
        == (r.get("limits") or {}).get(k) for r in resources for k in ("cpu", "memory"))
    return "Guaranteed" if guaranteed else "Burstable"


def _json_body(request) -> dict:
    raw = request.content.getvalue()
    try:
        return json.loads(raw or b"{}")
    except ValueError:
        raise bad_request("the body of the request was in an unknown format") from None


class _Root(Resource):
    isLeaf = True

    def __init__(self, standin: KubeStandin) -> None:
        super().__init__()
        self._standin = standin

    def render(self, request):
        d = ensureDeferred(self._standin.handle(request))

        def answer(result):
            if result is None:
                return
            code, body = result
            _write_json(request, code, body)

        def failed(failure):
            if failure.check(ApiError):
                _write_json(request, failure.value.code, failure.value.status())
            else:
                _log.failure("stand-in: {method} {path} failed", failure,
                             method=request.method, path=request.path)
                _write_json(request, 500, ApiError(500, "InternalError",
                                                   failure.getErrorMessage()).status())
        d.addCallbacks(answer, failed)
        return NOT_DONE_YET


def _write_json(request, code: int, body: dict) -> None:
    if request.finished or getattr(request, "_disconnected", False):
        return
    if request.startedWriting:
        request.finish()
        return
    data = json.dumps(body).encode()
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(data)).encode())
    request.write(data)
    request.finish()
