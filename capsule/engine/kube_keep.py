"""
Kept sessions on the Kubernetes engine (L{capsule.engine.kubernetes}): the
pod deleted, a volume claim of the session's own kept, the pod made again
under the same name on resume.

Every session pod is made with a PersistentVolumeClaim of its own, named
like the pod and labelled like it (and C{io.capsule.claim: session}), which
it mounts twice by C{subPath}: C{workspace} at C{/workspace} and C{screen}
at L{capsule.core.kept.SCREEN_DIRECTORY}, where capsule saves the keeper's
screen as a session is put away.  The claim carries, in annotations, what
is needed to list it as a kept session and to make its pod again: the
pod's manifest (C{io.capsule.pod}, written with the claim), capsule's
labels exactly (C{io.capsule.labels}), when it was kept (C{io.capsule.kept},
written as the pod is stopped) and, where capsule said it, whose it is and
why it was put away (C{io.capsule.kept-record}, L{KeptPods.note_kept}): a
replica that never saw the session finds all of it in the cluster.

What is kept, and what is not: on Docker a kept session is its stopped
container, its whole writable layer and its volumes.  On Kubernetes it is
the claim: the files under C{/workspace} and the saved screen, and the
named volumes (agent claims) its profile mounts, which are shared claims of
their own.  Everything else the session wrote (files elsewhere in its home,
packages installed in its root, C{/tmp}) was the pod's and is lost when the
session is put away.  Its secrets are not in the stored manifest (nor in the
pod's spec): the manifest refers to the session's Secret
(L{capsule.engine.kube_secrets}), which is kept with the claim, for the
resumed pod, and removed with it.

A kept session's files are read and written (C{put_file}, C{read_file}, the
workspace's export) by a short-lived pod of the session's image mounting
the claim (C{sleep}, labelled C{io.capsule.files-of: POD}, removed at
once, or with the session if it was left); with a ReadWriteOnce claim
it must run on the node that has it mounted: that of the session's pod
where it ended but is still there (C{nodeName}), else any.  A pod whose container
ended (a node that evicted it, a kill) with its claim is kept too, as
Docker keeps a stopped container: its resume deletes it and makes it anew.

Sizes: a claim's used bytes are not in the API (its capacity is what was
asked for): C{size} is C{None}.  Snapshots and forks stay L{Unsupported}
(they would be VolumeSnapshots of the claim, which the tests' stand-in API
server does not have).
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from datetime import datetime, timezone

from kubernetes.client.exceptions import ApiException
from twisted.internet import task
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from capsule.core.errors import ContainerGone, DockerError
from capsule.core.kept import SCREEN_DIRECTORY
from capsule.engine.container_files import absolute_path, path_parts
from capsule.engine.kube_pods import (LABELS_ANNOTATION, RUN_AS_USER, Unsupported, api_status,
                                      capsule_labels, label_value_valid, pod_state)

_log = Logger()

# The label of a session's own claim (beside the pod's labels).
CLAIM_LABEL = "io.capsule.claim"
SESSION_CLAIM = "session"
# The claim's annotations: the pod's manifest, when it was kept, and
# capsule's record of it (owner, reason, when).
POD_ANNOTATION = "io.capsule.pod"
KEPT_ANNOTATION = "io.capsule.kept"
RECORD_ANNOTATION = "io.capsule.kept-record"
# A short-lived pod reading or writing a kept session's files: its label.
FILES_LABEL = "io.capsule.files-of"
# What the session's claim holds, by mount point: its subPath.
KEPT_PATHS = {"/workspace": "workspace", SCREEN_DIRECTORY: "screen"}
CLAIM_VOLUME = "kept"
# The files pod's resources: reading and writing files, tar.
FILES_RESOURCES = {"limits": {"memory": str(256 * 2**20), "cpu": "500m"},
                   "requests": {"memory": str(64 * 2**20), "cpu": "50m"}}
MERGE_PATCH = "application/merge-patch+json"

# put_file and read_file in a pod, by an exec: C{$1} the mode (put) or the
# most bytes (read), then every prefix of the path (C{/a}, C{/a/b}, ...),
# none of which may be a symbolic link.  (The exec runs as the pod's user:
# a link made between the check and the use reaches only what that user
# reaches anyway.)
LINK_EXIT = 65
NO_FILE_EXIT = 66
PUT_SCRIPT = (
    'm=$1; shift; for p; do [ -L "$p" ] && exit 65; done; [ -d "$p" ] && exit 65;'
    ' d=$(dirname "$p") && mkdir -p "$d" && t=$(mktemp "$d/.capsule-put.XXXXXX") || exit 1;'
    ' if cat > "$t" && chmod "$m" "$t" && mv -f "$t" "$p"; then exit 0; fi; rm -f "$t"; exit 1')
READ_SCRIPT = (
    'n=$1; shift; for p; do [ -L "$p" ] && exit 66; done;'
    ' [ -f "$p" ] || exit 66; exec tail -c "$n" "$p"')

# How long a files pod lives at most (a capsule that stopped while it worked
# cannot remove it).
FILES_SECONDS = 3600


def session_claim_name(pod: str) -> str:
    """
    The claim of the session whose pod is C{pod}: named like it.
    """
    return pod


def with_session_claim(manifest: dict, claim: str) -> dict:
    """
    C{manifest} with the session's claim C{claim} mounted by C{subPath} at
    each of L{KEPT_PATHS} (an C{emptyDir} a read-only root gave
    C{/workspace} is replaced; a place a named volume of the spec takes is
    left to it).
    """
    pod = copy.deepcopy(manifest)
    spec = pod["spec"]
    container = spec["containers"][0]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    mounts = []
    taken = set()
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"]) or {}
        if mount["mountPath"] in KEPT_PATHS and "emptyDir" in volume:
            spec["volumes"] = [v for v in spec["volumes"] if v["name"] != mount["name"]]
            continue
        taken.add(mount["mountPath"])
        mounts.append(mount)
    for path, sub in KEPT_PATHS.items():
        if path not in taken:
            mounts.append({"name": CLAIM_VOLUME, "mountPath": path, "subPath": sub})
    container["volumeMounts"] = mounts
    spec.setdefault("volumes", []).append(
        {"name": CLAIM_VOLUME, "persistentVolumeClaim": {"claimName": claim}})
    return pod


def claim_manifest(name: str, pod: dict, size: str, storage_class: str | None) -> dict:
    """
    The session's claim for the pod manifest C{pod}: labelled like it, and
    carrying it (L{POD_ANNOTATION}).
    """
    metadata = pod["metadata"]
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": name,
                          "labels": {**metadata.get("labels", {}),
                                     CLAIM_LABEL: SESSION_CLAIM},
                          "annotations": {
                              LABELS_ANNOTATION: metadata["annotations"][LABELS_ANNOTATION],
                              POD_ANNOTATION: json.dumps(pod, sort_keys=True)}},
             "spec": {"accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": size}}}}
    if storage_class:
        claim["spec"]["storageClassName"] = storage_class
    return claim


def files_manifest(name: str, pod: dict) -> dict:
    """
    A short-lived pod C{name} of the kept pod C{pod}'s image that mounts
    its volumes where it did and sleeps: its files are read and written
    there by execs.  It carries none of capsule's labels (no listing of
    sessions sees it, and no sweep of leftovers removes it while it works),
    only L{FILES_LABEL}: the kept session's removal removes it if it was
    left; it ends by itself within L{FILES_SECONDS} seconds anyway.
    """
    files = copy.deepcopy(pod)
    files["metadata"] = {"name": name, "labels": {FILES_LABEL: pod["metadata"]["name"]}}
    spec = files["spec"]
    spec.pop("hostname", None)
    spec["activeDeadlineSeconds"] = FILES_SECONDS
    container = spec["containers"][0]
    container.update(command=["sleep", str(FILES_SECONDS)], env=[], resources=FILES_RESOURCES)
    container.pop("args", None)
    return files


def rfc3339_seconds(text: str | None) -> float:
    """
    An API time (C{2026-12-07T10:00:00Z}) as a Unix time; 0.0 for none.
    """
    if not text:
        return 0.0
    try:
        return datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(
            tzinfo=timezone.utc).timestamp()
    except ValueError:
        return 0.0


def _annotation(obj: dict, key: str) -> dict:
    try:
        value = json.loads(((obj.get("metadata") or {}).get("annotations") or {}).get(key)
                           or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _deleting(obj: dict) -> bool:
    return "deletionTimestamp" in (obj.get("metadata") or {})


def _ended(pod: dict) -> bool:
    return pod_state(pod)["Status"] == "exited"


class KeptPods:
    """
    The kept-session calls of L{capsule.engine.kubernetes.KubernetesAPI}
    (a base of it, before L{capsule.engine.kube_execs.PodExecs}), a pod's
    files (C{put_file}, C{read_file}) among them: needs its
    C{_core}, C{_call}, C{_thd_request}, C{_get_pod}, C{_list_pods},
    C{_running}, C{_delete_pod}, C{_gone}, C{namespace} and C{_reactor}.
    """

    # -- the claim, with the pod ------------------------------------------------

    async def _make_session_claim(self, name: str, manifest: dict) -> tuple[dict, dict]:
        """
        Make the session's claim for the pod C{manifest} (before the pod);
        return the manifest that mounts it, and the claim as the API made
        it (its C{uid}: what owns the session's Secret).
        """
        pod = with_session_claim(manifest, session_claim_name(name))
        claim = claim_manifest(session_claim_name(name), pod, self._volume_size,
                               self._storage_class)
        try:
            made = await self._core("create_namespaced_persistent_volume_claim",
                                    self.namespace, claim)
        except ApiException as e:
            raise DockerError(f"Kubernetes could not create the session's volume claim:"
                              f" {api_status(e)}") from None
        return pod, made

    async def _remove_files_pods(self, name: str) -> None:
        """
        Remove what files pods of the session C{name} were left (by a
        capsule that stopped while one worked).
        """
        found = await self._core("list_namespaced_pod", self.namespace,
                                 label_selector=f"{FILES_LABEL}={name}")
        for pod in found.get("items") or []:
            await self._delete_pod(pod["metadata"]["name"])

    async def _get_claim(self, name: str) -> dict | None:
        try:
            claim = await self._core("read_namespaced_persistent_volume_claim",
                                     session_claim_name(name), self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise DockerError(f"Kubernetes could not read the volume claim {name}:"
                              f" {api_status(e)}") from None
        if _deleting(claim) or (claim["metadata"].get("labels") or {}).get(
                CLAIM_LABEL) != SESSION_CLAIM:
            return None
        return claim

    async def _delete_claim(self, name: str) -> bool:
        try:
            await self._core("delete_namespaced_persistent_volume_claim",
                             session_claim_name(name), self.namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            raise DockerError(f"Kubernetes could not delete the volume claim {name}:"
                              f" {api_status(e)}") from None
        return True

    async def _annotate_claim(self, name: str, annotations: dict) -> None:
        """
        Merge C{annotations} into the claim's (a value C{None} removes one).
        """
        patch = {"metadata": {"annotations": annotations}}
        try:
            await self._call(lambda: self._thd_request(
                "CoreV1Api", "patch_namespaced_persistent_volume_claim",
                session_claim_name(name), self.namespace, patch, _content_type=MERGE_PATCH))
        except ApiException as e:
            if e.status == 404:
                raise ContainerGone(f"the session's volume claim {name} is gone") from None
            raise DockerError(f"Kubernetes could not annotate the volume claim {name}:"
                              f" {api_status(e)}") from None

    async def _list_claims(self, labels: dict[str, str]) -> list[dict]:
        selector = ",".join([f"{CLAIM_LABEL}={SESSION_CLAIM}"] + [
            f"{k}={v}" for k, v in sorted(labels.items()) if label_value_valid(v)])
        found = await self._core("list_namespaced_persistent_volume_claim", self.namespace,
                                 label_selector=selector)
        return [c for c in found.get("items") or [] if not _deleting(c)
                and all(capsule_labels(c).get(k) == v for k, v in labels.items())]

    # -- IDockerAPI: stop, start, the kept ones ----------------------------------

    def stop_container(self, container_id: str, timeout: float = 10) -> Deferred:
        """
        Keep the session: when it was kept goes on its claim, its pod is
        deleted (SIGTERM, SIGKILL after C{timeout} seconds) and gone once
        this fires.  C{True} if it existed (a kept one: stopped already).
        """
        return Deferred.fromCoroutine(self._stop(container_id, timeout))

    async def _stop(self, name: str, timeout: float) -> bool:
        pod = await self._get_pod(name)
        claim = await self._get_claim(name)
        if pod is None:
            return claim is not None
        if claim is None:
            raise Unsupported(f"the pod {name} has no volume claim of its own to keep its files"
                              " in: it cannot be kept, only removed")
        if not _annotation(claim, KEPT_ANNOTATION):
            await self._annotate_claim(name, {KEPT_ANNOTATION: json.dumps({
                "at": time.time(),
                "created": rfc3339_seconds(pod["metadata"].get("creationTimestamp"))})})
        await self._delete_pod(name, grace=max(0, int(timeout)))
        await self._gone(name, self._timeout + timeout)
        return True

    def start_container(self, container_id: str) -> Deferred:
        """
        Resume a kept session: its pod made again, under the same name, from
        the manifest its claim carries, mounting the claim; fire once it
        runs.  Fail with L{ContainerGone} if the claim is gone.
        """
        return Deferred.fromCoroutine(self._start(container_id))

    async def _start(self, name: str) -> None:
        claim = await self._get_claim(name)
        pod = await self._get_pod(name)
        if pod is not None and not _ended(pod) and not _deleting(pod):
            return      # runs (or starts) already
        if claim is None:
            raise ContainerGone("the session's pod and volume claim no longer exist")
        # The new pod is held by the replica that resumes it.
        manifest = self.annotate_replica(_annotation(claim, POD_ANNOTATION))
        if not manifest.get("spec"):
            raise DockerError(f"the volume claim {name} does not say what its pod was"
                              f" ({POD_ANNOTATION}): it cannot be resumed")
        if pod is not None:
            # Ended (evicted, killed): a pod cannot run again, a new one can.
            await self._delete_pod(name)
            await self._gone(name, self._timeout)
        try:
            created = await self._core("create_namespaced_pod", self.namespace, manifest)
        except ApiException as e:
            raise DockerError(f"Kubernetes could not make the session's pod again:"
                              f" {api_status(e)}") from None
        await self._running(name, created["metadata"]["resourceVersion"])
        await self._annotate_claim(name, {KEPT_ANNOTATION: None, RECORD_ANNOTATION: None})

    def note_kept(self, container_id: str, record: dict) -> Deferred:
        """
        Write capsule's C{record} of a kept session (C{user}, C{reason},
        C{kept_at}) on its claim, where L{kept_containers} reads it back
        (C{record}): whose it is and why it was kept are in the cluster,
        not in one replica's state file.
        """
        return Deferred.fromCoroutine(self._annotate_claim(
            container_id, {RECORD_ANNOTATION: json.dumps(record, sort_keys=True)}))

    def kept_containers(self, labels: dict[str, str]) -> Deferred:
        """
        The kept sessions carrying C{labels}: their claims, whose pod is gone
        or ended, in the Docker engine's shape (C{state} C{exited}; C{created}
        the claim's; C{finished} when it was kept, else when its pod ended,
        else 0.0; C{size} C{None}), and C{record}: capsule's record on the
        claim (L{note_kept}), C{{}} where none.
        """
        return Deferred.fromCoroutine(self._kept(labels))

    async def _kept(self, labels: dict[str, str]) -> list[dict]:
        claims = await self._list_claims(labels)
        pods = {p["metadata"]["name"]: p for p in await self._list_pods(labels)}
        kept = []
        for claim in claims:
            name = claim["metadata"]["name"]
            pod = pods.get(name)
            if pod is not None and not _ended(pod):
                continue
            when = _annotation(claim, KEPT_ANNOTATION)
            finished = when.get("at")
            if not isinstance(finished, (int, float)):
                finished = rfc3339_seconds(pod_state(pod)["FinishedAt"]) if pod else 0.0
            kept.append({"id": name, "name": name, "labels": _claim_labels(claim),
                         "state": "exited",
                         "created": rfc3339_seconds(claim["metadata"].get("creationTimestamp")),
                         "finished": float(finished), "size": None,
                         "record": _annotation(claim, RECORD_ANNOTATION)})
        return kept

    async def _kept_listed(self, labels: dict[str, str], pods: list[dict]) -> list[dict]:
        """
        (L{list_containers}'.)  The kept sessions whose pod is gone, as
        stopped containers.
        """
        names = {p["metadata"]["name"] for p in pods}
        return [{"id": c["metadata"]["name"], "name": c["metadata"]["name"],
                 "labels": _claim_labels(c), "state": "exited"}
                for c in await self._list_claims(labels) if c["metadata"]["name"] not in names]

    async def _kept_state(self, name: str) -> dict | None:
        """
        (L{container_state}'s, for a pod that is not there.)  A kept
        session's State: a stopped container's, C{Reason} C{Kept}; or, where
        capsule did not delete the pod (the cluster or someone else did: a
        node lost, an eviction's pod removed), C{Deleted}, saying so, as a
        container killed (exit code 137): its files are kept all the same.
        C{None} if it has no claim.
        """
        claim = await self._get_claim(name)
        if claim is None:
            return None
        at = _annotation(claim, KEPT_ANNOTATION).get("at")
        kept = isinstance(at, (int, float))
        return {"Status": "exited", "Running": False, "Paused": False, "Restarting": False,
                "OOMKilled": False, "Dead": False, "Pid": 0, "ExitCode": 0 if kept else 137,
                "Error": "" if kept else ("the session's pod was deleted, not by capsule; its"
                                          " volume claim is kept"),
                "StartedAt": "", "FinishedAt": datetime.fromtimestamp(
                    at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if kept else "",
                "Reason": "Kept" if kept else "Deleted", "Phase": None}

    # -- a kept session's files ---------------------------------------------

    async def _in_files(self, name: str, work):
        """
        C{work(pod)} (a Deferred) in the pod C{name}; where that pod is gone
        or ended and its claim kept, in a short-lived pod mounting the
        claim (L{files_manifest}), removed afterwards.
        """
        try:
            return await work(name)
        except ContainerGone:
            claim = await self._get_claim(name)
            if claim is None:
                raise
            manifest = _annotation(claim, POD_ANNOTATION)
            if not manifest.get("spec"):
                raise
        files = f"{name}-files-{uuid.uuid4().hex[:6]}"
        body = files_manifest(files, manifest)
        ended = await self._get_pod(name)
        node = ((ended or {}).get("spec") or {}).get("nodeName")
        if node:
            # A ReadWriteOnce claim may still be attached to the node of
            # the session's ended pod: the files pod goes there.
            body["spec"]["nodeName"] = node
        try:
            created = await self._core("create_namespaced_pod", self.namespace, body)
        except ApiException as e:
            raise DockerError(f"Kubernetes could not make a pod to reach the kept session's"
                              f" files: {api_status(e)}") from None
        try:
            await self._running(files, created["metadata"]["resourceVersion"])
            return await work(files)
        finally:
            try:
                await self._delete_pod(files)
                await self._gone(files, self._timeout)
            except DockerError as e:
                _log.warn("could not remove the pod {name} that read a kept session's"
                          " files: {error}", name=files, error=str(e))

    # -- files: a pod's, by an exec; a kept session's in a files pod ------------

    def put_file(self, container_id: str, path: str, data: bytes, mode: int = 0o600,
                 uid: int = 1000, gid: int = 1000) -> Deferred:
        """
        Write the file by an exec (as the pod's user: what it writes, the
        pod's user could); a symbolic link on the path is refused, as the
        Docker engine refuses it, not followed.
        """
        try:
            parts = path_parts(absolute_path(path))
        except ValueError:
            return fail()

        async def put():
            if (uid, gid) != (RUN_AS_USER, RUN_AS_USER):
                raise Unsupported(f"a file owned by {uid}:{gid}: a pod's execs run as"
                                  f" {RUN_AS_USER}")
            result = await self._in_files(container_id, lambda pod: self.run_command(
                pod, ["sh", "-c", PUT_SCRIPT, "put", f"{mode:o}", *parts],
                "", "", {}, bytes(data)))
            if result.exit_code == LINK_EXIT:
                raise DockerError(f"could not write {path} in the pod: a symbolic link or a"
                                  " directory is in the way")
            if result.exit_code != 0:
                raise DockerError(f"could not write {path} in the pod:"
                                  f" {result.stderr[:300].decode('utf-8', 'replace')}")
        return Deferred.fromCoroutine(put())

    def read_file(self, container_id: str, path: str, max_bytes: int) -> Deferred:
        """
        Read the file by an exec; a path through a symbolic link is taken
        for no file, as the Docker engine takes it.
        """
        try:
            parts = path_parts(absolute_path(path))
        except ValueError:
            return fail()

        async def read():
            result = await self._in_files(container_id, lambda pod: self.run_command(
                pod, ["sh", "-c", READ_SCRIPT, "read", str(max(0, int(max_bytes))), *parts],
                "", "", {}, b"", max_output=max_bytes))
            if result.exit_code == NO_FILE_EXIT:
                return None
            if result.exit_code != 0:
                raise DockerError(f"could not read {path} in the pod:"
                                  f" {result.stderr[:300].decode('utf-8', 'replace')}")
            return result.stdout
        return Deferred.fromCoroutine(read())

    def export_workspace(self, container_id: str, path: str, write) -> Deferred:
        """
        As L{capsule.engine.kube_execs.PodExecs.export_workspace}; a kept
        session's from its claim (L{_in_files}).
        """
        base = super().export_workspace
        return Deferred.fromCoroutine(self._in_files(
            container_id, lambda pod: base(pod, path, write)))

    async def _gone(self, name: str, timeout: float) -> bool:
        """
        Wait until the pod C{name} is gone (deleting is asynchronous);
        C{False} if it is still there after C{timeout} seconds.
        """
        deadline = self._reactor.seconds() + timeout
        delay = 0.05
        while self._reactor.seconds() < deadline:
            if await self._get_pod(name) is None:
                return True
            await task.deferLater(self._reactor, delay, lambda: None)
            delay = min(delay * 2, 1.0)
        _log.warn("the pod {name} was still there {timeout} s after its deletion",
                  name=name, timeout=timeout)
        return False


def _claim_labels(claim: dict) -> dict[str, str]:
    # (The pod's labels: the claim's own is not one of them.)
    labels = capsule_labels(claim)
    labels.pop(CLAIM_LABEL, None)
    return labels

