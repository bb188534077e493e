"""
The pods of the Kubernetes engine (L{capsule.engine.kubernetes}), as data:
a session's pod manifest made from its L{ContainerSpec} (security context,
resources, volumes as PersistentVolumeClaims, capsule's labels kept whole in
an annotation, the secrets by reference to the session's Secret:
L{capsule.engine.kube_secrets}), and what a pod read from the API says (its labels, Docker's
C{State} of its container, whether it started or cannot).  Pure: no I/O.
"""

from __future__ import annotations

import json
import re
import uuid

from capsule.core.errors import DockerError, ImageMissing
from capsule.core.keeper import SECRET_LABEL
from capsule.core.spec import ContainerSpec
from capsule.engine.kube_policies import pod_labels

# The uid (and gid) session pods run as: the session image's user.
RUN_AS_USER = 1000
# The one container of a session's pod.
CONTAINER = "session"
# All of capsule's labels, exactly, as JSON: label values are limited (63
# characters of [A-Za-z0-9._-]); annotations are not.
LABELS_ANNOTATION = "io.capsule.labels"
# Waiting reasons of a container whose image cannot be had.
IMAGE_ERRORS = {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"}
# Waiting reasons that do not pass by themselves.
STUCK = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError",
         "CrashLoopBackOff"}
# Where a read-only root's writable places are (as capsule.engine.docker).
READ_ONLY_VOLUMES = ("/workspace", "/home/developer")
READ_ONLY_TMPFS = {"/tmp": "512Mi", "/run": "16Mi"}

_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
_DOCKER_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([bkmgt]?)b?\Z", re.IGNORECASE)


class Unsupported(DockerError):
    """
    What Docker does and a Kubernetes cluster cannot.
    """


def pod_name() -> str:
    """
    A new session pod's name: random, unrelated to its session's id.
    """
    return f"capsule-{uuid.uuid4().hex}"


# What a Secret's key may be (the API server's "valid config key").
_KEY = re.compile(r"[-._a-zA-Z0-9]+\Z")


def secret_name(pod: str) -> str:
    """
    The Secret of the session whose pod is C{pod}.
    """
    return f"{pod}-env"


def secret_refs(pod: str, secrets: dict[str, str]) -> list[dict]:
    """
    The pod's C{env} entries taking each of C{secrets} (variable -> value)
    from the session's Secret: names only, no value.

    @raise ValueError: a variable that cannot be a Secret's key.
    """
    refs = []
    for variable in secrets:
        if not isinstance(variable, str) or not _KEY.match(variable):
            raise ValueError(f"a secret's variable name that cannot be a Kubernetes Secret's"
                             f" key: {str(variable)[:64]!r}")
        refs.append({"name": variable, "valueFrom": {"secretKeyRef": {
            "name": secret_name(pod), "key": variable}}})
    return refs


def docker_bytes(size: str) -> int:
    """
    A Docker size (C{"4g"}, C{"512m"}, C{"100000"}: powers of 1024) in bytes.
    """
    m = _DOCKER_SIZE.match(str(size).strip())
    if not m:
        raise ValueError(f"not a size: {size!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower()))


def label_value_valid(value: str) -> bool:
    return isinstance(value, str) and len(value) <= 63 and bool(_LABEL_VALUE.match(value))


def volume_claim_name(volume: str) -> str:
    """
    The PersistentVolumeClaim of a named volume: a DNS-1123 name.
    """
    name = re.sub(r"[^a-z0-9-]+", "-", volume.lower()).strip("-")[:200] or "volume"
    return name if name[0].isalnum() else f"v{name}"


def pod_manifest(name: str, spec: ContainerSpec, run_as: int = RUN_AS_USER,
                 memory_request: float = 1.0) -> dict:
    """
    The pod of a session made from C{spec}.

    @param memory_request: the memory request as a share of the limit.

    @raise Unsupported: for what a pod cannot be given (passwordless sudo).
    """
    if spec.allow_sudo:
        raise Unsupported("passwordless sudo (--allow-sudo) needs a set-uid program and"
                          " privilege escalation, which session pods never get")
    # The keeper's secret (for its direct port) is never a pod's: sessions
    # on Kubernetes have no Docker network (as --network none), so capsule
    # never reaches a keeper directly there and gives none; one given is
    # dropped rather than written where who may read pods reads it.
    kept = {k: v for k, v in spec.labels.items() if k != SECRET_LABEL}
    labels = {k: v for k, v in kept.items() if label_value_valid(v)}
    # What the session namespace's NetworkPolicies select it by (fenced).
    labels.update(pod_labels(spec))
    memory = docker_bytes(spec.memory)
    limits = {"memory": str(memory), "cpu": f"{int(round(spec.cpus * 1000))}m"}
    # The kubelet gives a container CPU shares of request * 1024: the
    # inverse of that is the request of capsule's weight.
    requests = {"memory": str(int(memory * memory_request)),
                "cpu": f"{max(1, int(spec.cpu_shares * 1000 / 1024))}m"}
    if spec.disk is not None:
        limits["ephemeral-storage"] = str(docker_bytes(spec.disk))
    security = {
        "runAsUser": run_as, "runAsGroup": run_as, "runAsNonRoot": True,
        "allowPrivilegeEscalation": False, "privileged": False,
        "capabilities": {"drop": ["ALL"], **({"add": list(spec.cap_add)} if spec.cap_add
                                             else {})},
        "seccompProfile": {"type": "RuntimeDefault"},
        "readOnlyRootFilesystem": bool(spec.read_only_root),
    }
    volumes, mounts = [], []
    for volume, target in spec.volumes:
        key = f"v{len(volumes)}"
        volumes.append({"name": key, "persistentVolumeClaim": {
            "claimName": volume_claim_name(volume)}})
        mounts.append({"name": key, "mountPath": target})
    if spec.read_only_root:
        for target in READ_ONLY_VOLUMES:
            key = f"v{len(volumes)}"
            volumes.append({"name": key, "emptyDir": {}})
            mounts.append({"name": key, "mountPath": target})
        for target, size in READ_ONLY_TMPFS.items():
            key = f"v{len(volumes)}"
            volumes.append({"name": key, "emptyDir": {"medium": "Memory", "sizeLimit": size}})
            mounts.append({"name": key, "mountPath": target})
    try:
        secrets = secret_refs(name, spec.secrets)
    except ValueError as e:
        raise Unsupported(str(e)) from None
    # Secrets by reference to the session's Secret, never by value.
    env = [{"name": k, "value": v} for k, v in spec.environment.items()
           if k not in spec.secrets] + secrets
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {LABELS_ANNOTATION: json.dumps(kept, sort_keys=True)}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            # A PID 1 that reaps zombies (the pause container), as Docker's
            # --init gives capsule's containers.
            "shareProcessNamespace": True,
            "hostname": spec.hostname,
            "terminationGracePeriodSeconds": 10,
            "securityContext": {"runAsUser": run_as, "runAsGroup": run_as, "fsGroup": run_as,
                                "runAsNonRoot": True,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": CONTAINER, "image": spec.image, "command": list(spec.command),
                "workingDir": spec.workdir,
                "env": env,
                "resources": {"limits": limits, "requests": requests},
                "securityContext": security,
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    }
    if spec.runtime:
        pod["spec"]["runtimeClassName"] = spec.runtime
    return pod


def capsule_labels(pod: dict) -> dict[str, str]:
    """
    capsule's labels of a pod, exactly as its spec gave them.
    """
    metadata = pod.get("metadata") or {}
    try:
        kept = json.loads((metadata.get("annotations") or {}).get(LABELS_ANNOTATION) or "{}")
    except ValueError:
        kept = {}
    labels = dict(metadata.get("labels") or {})
    if isinstance(kept, dict):
        labels.update({str(k): str(v) for k, v in kept.items()})
    return labels


def container_status(pod: dict) -> dict:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == CONTAINER), statuses[0] if statuses
                else {})


def pod_state(pod: dict) -> dict:
    """
    A pod as Docker's C{State} of its container: C{Status}, C{Running},
    C{OOMKilled}, C{ExitCode}..., and the cluster's C{Reason} (C{Evicted},
    C{OOMKilled}, C{ErrImagePull}...).
    """
    status = pod.get("status") or {}
    state = container_status(pod).get("state") or {}
    phase = status.get("phase")
    terminated, waiting = state.get("terminated"), state.get("waiting")
    running = "running" in state and phase == "Running"
    answer = {"Status": "running" if running else "exited" if terminated or phase in (
                  "Succeeded", "Failed") else "created",
              "Running": running, "Paused": False, "Restarting": False,
              "OOMKilled": bool(terminated and terminated.get("reason") == "OOMKilled"),
              "Dead": False, "Pid": 0,
              "ExitCode": int(terminated.get("exitCode", 0)) if terminated else 0,
              "Error": (terminated or waiting or {}).get("message") or status.get("message")
              or "",
              "StartedAt": (state.get("running") or terminated or {}).get("startedAt") or "",
              "FinishedAt": (terminated or {}).get("finishedAt") or "",
              "Reason": status.get("reason") or (terminated or waiting or {}).get("reason")
              or "",
              "Phase": phase}
    if "deletionTimestamp" in (pod.get("metadata") or {}):
        answer["Status"] = "removing"
    return answer


def pod_started(pod: dict) -> bool:
    """
    Whether the pod's container runs or ran (it started: as Docker's start).
    """
    state = container_status(pod).get("state") or {}
    return "running" in state or "terminated" in state or (pod.get("status") or {}).get(
        "phase") in ("Running", "Succeeded", "Failed")


def pod_failed(pod: dict) -> None:
    """
    Raise if the pod's container cannot start.
    """
    waiting = (container_status(pod).get("state") or {}).get("waiting") or {}
    reason, message = waiting.get("reason"), waiting.get("message") or ""
    image = ((pod.get("spec") or {}).get("containers") or [{}])[0].get("image")
    if reason in IMAGE_ERRORS:
        raise ImageMissing(f"the session image {image} cannot be had by the cluster ({reason}:"
                           f" {message[:200]}): push it to a registry its nodes pull from, or"
                           " name one that exists")
    if reason in STUCK:
        raise DockerError(f"the session's pod cannot start ({reason}: {message[:300]})")


def api_status(error) -> str:
    """
    What the API server said of a refused call (a C{kubernetes.client}
    C{ApiException}): its status and the Status object's message, at most
    300 characters.
    """
    try:
        message = json.loads(error.body).get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    text = f"{error.status} {message or error.reason}"
    return text if len(text) <= 300 else text[:297] + "..."
