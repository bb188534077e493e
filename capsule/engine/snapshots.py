"""
The Docker engine's side of kept sessions, forks and snapshots
(docs/keeping.md): stopping and starting a container while its file system
stays, reading and writing one file of a container (running or stopped),
the CPU its processes used, and copies of its file system.

L{KeptContainers} is a base of L{capsule.engine.docker.DockerAPI}: its
calls run on that class's Docker thread pool (C{_call}), with its error
mapping (an unreachable engine is L{DockerUnavailable}).

A snapshot is a C{docker commit} of the container's writable layer (not
paused) and, for each of its anonymous volumes (a 64-hex name: not an
agent's named volume), a new volume filled by a throwaway container of the
source's own image that runs C{cp -a} as root with no network, a read-only
root, and only the capabilities copying with owners and modes needs.  The
copies are named like anonymous volumes, so that a snapshot of a container
made from a snapshot copies them again, and they are labelled
C{io.capsule.volume=copy} with the snapshot's labels.  The image lists its
volumes in the label C{io.capsule.snapshot.volumes}, which is how
L{KeptContainers.list_snapshots} finds them again.

Files: L{KeptContainers.put_file} and L{KeptContainers.read_file} go
through the engine's archive API, which resolves paths inside the
container's root, never the host's.  Inside the container, a symbolic link
anywhere on the path is never followed: each part of the path is looked at
first (a C{HEAD} of the archive API, which does not follow the last part),
and a link is refused (writing) or taken for no file (reading).  A program
in a running container could swap a directory for a link between that look
and the copy; what it could reach that way is its own container's files,
under the name asked for: write to a stopped container where that matters
(a kept session's screen is written after its container stopped).  The
paths, the stat and the archive's bytes are L{capsule.engine.container_files}'s.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import secrets
import tarfile
import time
import uuid
from datetime import datetime
from urllib.parse import urlsplit

import docker
import docker.errors
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from capsule.core.errors import ContainerGone, DockerError
from capsule.core.keeper import SECRET_LABEL
from capsule.core.kept import Snapshot
# (Imported under the names the calls below have always used.)
from capsule.engine.container_files import (DIRECTORY_MODE, READ_SCAN_LIMIT,
                                           Chunks as _Chunks, GO_DIR as _GO_DIR,
                                           GO_SYMLINK as _GO_SYMLINK, GO_TYPE as _GO_TYPE,
                                           absolute_path as _absolute,
                                           last_bytes as _last_bytes,
                                           path_parts as _parts, thd_exists as _thd_exists,
                                           thd_stat as _thd_stat)

_log = Logger()

# The labels of a snapshot's image and volumes.
LABEL_SNAPSHOT = "io.capsule.snapshot"
LABEL_SNAPSHOT_VOLUMES = "io.capsule.snapshot.volumes"
LABEL_VOLUME = "io.capsule.volume"
COPY = "copy"
# A copier's label (its value: the instance's): not the instance's own
# labels, so that no listing of the instance's sessions sees it.
LABEL_COPIER = "io.capsule.copier"
# Seconds a copier that is not running is left alone by a prune: another
# capsule call may have just made it.
COPIER_GRACE = 600.0
LABEL_INSTANCE = "io.capsule.instance"
# A volume Docker named itself: a container's anonymous volume.
ANONYMOUS_VOLUME = re.compile(r"[0-9a-f]{64}")
CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
# How long a commit or a volume's copy may take (they grow with the data).
SNAPSHOT_TIMEOUT = 3600.0
# The copier's limits: it needs little memory (the page cache is the
# kernel's) and few processes.
COPIER_MEMORY = "256m"
COPIER_PIDS = 32
COPIER_CAPABILITIES = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID"]
COPIER_MOUNT_FROM = "/capsule-copy-from"
COPIER_MOUNT_TO = "/capsule-copy-to"
# Docker's states of a container that is (or is about to be) running.
_LIVE_STATES = ("running", "paused", "restarting")

# Where the kernel counts a container's CPU time, by its id: cgroup v1
# (cgroupfs and systemd drivers) in nanoseconds, then cgroup v2 (usage_usec
# in cpu.stat).
CGROUP_V1 = ("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage",
             "/sys/fs/cgroup/cpu,cpuacct/docker/{id}/cpuacct.usage",
             "/sys/fs/cgroup/cpuacct/system.slice/docker-{id}.scope/cpuacct.usage",
             "/sys/fs/cgroup/cpu,cpuacct/system.slice/docker-{id}.scope/cpuacct.usage")
CGROUP_V2 = ("/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat",
             "/sys/fs/cgroup/docker/{id}/cpu.stat")


class KeptContainers:
    """
    The kept-session calls of L{IDockerAPI}, for L{DockerAPI}: needs its
    C{_call}, C{_thd_call} and C{host}.
    """

    _cgroup_path: str | None = None

    # -- stop, start, find -------------------------------------------------

    def stop_container(self, container_id: str, timeout: float = 10) -> Deferred:
        def _thd(client):
            try:
                client.stop(container_id, timeout=int(timeout))
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as e:
                raise DockerError(f"Docker could not stop the container: {_short(e)}") from None
            return True
        return self._call(_thd)

    def start_container(self, container_id: str) -> Deferred:
        def _thd(client):
            try:
                client.start(container_id)
            except docker.errors.NotFound:
                raise ContainerGone("the session's container no longer exists") from None
            except docker.errors.APIError as e:
                raise DockerError(
                    f"Docker could not start the container again: {_short(e)}") from None
        return self._call(_thd)

    def kept_containers(self, labels: dict[str, str]) -> Deferred:
        def _thd(client):
            found = client.containers(all=True, size=True, filters=_label_filter(labels))
            kept = []
            for c in found:
                if c.get("State") in _LIVE_STATES:
                    continue
                try:
                    state = client.inspect_container(c["Id"]).get("State") or {}
                except docker.errors.NotFound:
                    continue        # removed since it was listed
                size = c.get("SizeRw")
                kept.append({
                    "id": c["Id"],
                    "name": (c.get("Names") or ["?"])[0].lstrip("/"),
                    "labels": c.get("Labels") or {},
                    "state": c.get("State"),
                    "created": float(c.get("Created") or 0),
                    "finished": docker_time(state.get("FinishedAt")),
                    "size": int(size) if isinstance(size, int) and size >= 0 else None,
                })
            return kept
        return self._call(_thd)

    # -- one file ----------------------------------------------------------

    def put_file(self, container_id: str, path: str, data: bytes, mode: int = 0o600,
                 uid: int = 1000, gid: int = 1000) -> Deferred:
        try:
            path = _absolute(path)
        except ValueError:
            return fail()
        data = bytes(data)

        def _thd(client):
            _thd_exists(client, container_id)
            parts = _parts(path)
            existing = "/"
            for at, part in enumerate(parts):
                found = _thd_stat(client, container_id, part)
                if found is None:
                    missing = parts[at:]
                    break
                kind = found["mode"]
                if kind & _GO_SYMLINK:
                    _log.warn("refused to write {path} in container {container}: {part} is a"
                              " symbolic link", path=path, container=container_id[:12],
                              part=part)
                    raise DockerError(f"refused to write {path} in the container: {part} is a"
                                      " symbolic link")
                if part != path and not kind & _GO_DIR:
                    raise DockerError(f"cannot write {path} in the container: {part} is not a"
                                      " directory")
                if part == path and kind & _GO_TYPE:
                    raise DockerError(f"cannot write {path} in the container: it is not a"
                                      " regular file")
                if part != path:
                    existing = part
            else:
                missing = [path]
            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for made in missing:
                    name = posixpath.relpath(made, existing)
                    entry = tarfile.TarInfo(name)
                    entry.uid, entry.gid, entry.mtime = uid, gid, int(time.time())
                    if made == path:
                        entry.size, entry.mode = len(data), mode
                        tar.addfile(entry, io.BytesIO(data))
                    else:
                        entry.type, entry.mode = tarfile.DIRTYPE, DIRECTORY_MODE
                        tar.addfile(entry)
            try:
                client.put_archive(container_id, existing, archive.getvalue())
            except docker.errors.NotFound:
                raise ContainerGone("the session's container no longer exists") from None
            except docker.errors.APIError as e:
                raise DockerError(f"Docker could not write {path} in the container:"
                                  f" {_short(e)}") from None
        return self._call(_thd)

    def read_file(self, container_id: str, path: str, max_bytes: int) -> Deferred:
        try:
            path = _absolute(path)
        except ValueError:
            return fail()

        def _thd(client):
            _thd_exists(client, container_id)
            for part in _parts(path):
                found = _thd_stat(client, container_id, part)
                if found is None:
                    return None
                if found["mode"] & _GO_SYMLINK:
                    _log.info("{path} of container {container} not read: {part} is a symbolic"
                              " link", path=path, container=container_id[:12], part=part)
                    return None
                if part != path and not found["mode"] & _GO_DIR:
                    return None
            if found["mode"] & _GO_TYPE:
                return None             # a directory, a device, a pipe...
            if found.get("size", 0) > READ_SCAN_LIMIT:
                _log.warn("{path} of container {container} is {size} bytes: not read",
                          path=path, container=container_id[:12], size=found.get("size"))
                return None
            try:
                response = client._get(client._url("/containers/{0}/archive", container_id),
                                       params={"path": path}, stream=True)
                client._raise_for_status(response)
            except docker.errors.NotFound:
                return None             # gone since it was looked at
            try:
                return _last_bytes(_Chunks(response.iter_content(256 * 1024)), max_bytes)
            finally:
                response.close()
        return self._call(_thd)

    # -- CPU ---------------------------------------------------------------

    def container_cpu(self, container_id: str) -> Deferred:
        """
        From the container's cgroup where capsule shares the engine's host
        (a local socket) and can read it; else a one-shot C{docker stats};
        C{None} when neither says.
        """
        if urlsplit(self.host).scheme == "unix" and CONTAINER_ID.fullmatch(container_id):
            used = self._cgroup_cpu(container_id)
            if used is not None:
                return succeed(used)

        def _thd(client):
            try:
                found = client.stats(container_id, stream=False, one_shot=True)
            except docker.errors.InvalidVersion:
                found = client.stats(container_id, stream=False)
            except docker.errors.NotFound:
                return None
            usage = ((found.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
            if not isinstance(usage, int) or not found.get("pids_stats"):
                return None             # not running: Docker answers zeros
            return usage / 1e9
        d = self._call(_thd)
        d.addErrback(lambda failure: None)
        return d

    def _cgroup_cpu(self, container_id: str) -> float | None:
        candidates = [self._cgroup_path] if self._cgroup_path else list(CGROUP_V1 + CGROUP_V2)
        for pattern in candidates:
            try:
                with open(pattern.format(id=container_id), "rb") as f:
                    text = f.read(4096).decode("ascii", "replace")
            except OSError:
                continue
            used = _cgroup_seconds(pattern, text)
            if used is not None:
                self._cgroup_path = pattern
                return used
        return None

    # -- snapshots ---------------------------------------------------------

    def snapshot_container(self, container_id: str, repository: str, tag: str,
                           labels: dict[str, str]) -> Deferred:
        return self._call(self._thd_snapshot, container_id, repository, tag, dict(labels))

    def _thd_snapshot(self, client, container_id, repository, tag, labels) -> Snapshot:
        try:
            info = client.inspect_container(container_id)
        except docker.errors.NotFound:
            raise ContainerGone("the session's container no longer exists") from None
        anonymous = [(m["Destination"], m["Name"]) for m in info.get("Mounts") or []
                     if m.get("Type") == "volume" and ANONYMOUS_VOLUME.fullmatch(m.get("Name") or "")]
        # New volumes named as Docker names anonymous ones, so that a
        # snapshot of a container made from this one copies them too.
        volumes = {destination: secrets.token_hex(32) for destination, _ in anonymous}
        image = f"{repository}:{tag}"
        image_labels = {**_blanked_labels(info), **labels,
                        LABEL_SNAPSHOT_VOLUMES: json.dumps(volumes, sort_keys=True)}
        conf = {"Labels": image_labels, "Env": _blanked_env(info, client)}
        try:
            committed = client._result(client._post_json(
                client._url("/commit"), data=conf, timeout=SNAPSHOT_TIMEOUT,
                params={"container": container_id, "repo": repository, "tag": tag,
                        "pause": False, "comment": "a snapshot of a capsule session"}),
                json=True)
        except docker.errors.NotFound:
            raise ContainerGone("the session's container no longer exists") from None
        except docker.errors.APIError as e:
            raise DockerError(f"Docker could not copy the container's files: {_short(e)}") from None
        try:
            for destination, source in anonymous:
                try:
                    self._thd_copy_volume(client, info["Image"], source, volumes[destination],
                                          {**labels, LABEL_VOLUME: COPY})
                except docker.errors.ImageNotFound:
                    raise DockerError("the container's image, which copies its volumes, is"
                                      " gone") from None
        except BaseException:
            try:
                _thd_remove_snapshot(client, image, volumes)
            except Exception as e:
                _log.warn("could not remove the failed snapshot {image}: {error}",
                          image=image, error=_short(e))
            raise
        found = client.inspect_image(committed["Id"])
        return Snapshot(image=image, volumes=volumes, labels=labels,
                        created=docker_time(found.get("Created")) or time.time(),
                        size=_thd_own_size(client, found.get("Size"), found.get("Parent")))

    def _thd_copy_volume(self, client, image: str, source: str, target: str,
                         labels: dict[str, str]) -> None:
        """
        Fill the new volume C{target} with a copy of the volume C{source}
        (owners, modes, times, links as they are), by a throwaway container
        of C{image} (which has C{cp}).
        """
        try:
            client.inspect_volume(source)
        except docker.errors.NotFound:
            # Mounting it would make it anew, empty: no copy at all.
            raise DockerError(f"the volume {source} to copy is gone") from None
        client.create_volume(target, labels=labels)
        host_config = client.create_host_config(
            mounts=[docker.types.Mount(COPIER_MOUNT_FROM, source, type="volume",
                                       read_only=True),
                    docker.types.Mount(COPIER_MOUNT_TO, target, type="volume")],
            network_mode="none", read_only=True, cap_drop=["ALL"],
            cap_add=COPIER_CAPABILITIES, security_opt=["no-new-privileges:true"],
            mem_limit=COPIER_MEMORY, memswap_limit=COPIER_MEMORY, pids_limit=COPIER_PIDS,
        )
        try:
            copier = client.create_container(
                image, command=["cp", "-a", "--", f"{COPIER_MOUNT_FROM}/.", COPIER_MOUNT_TO],
                entrypoint=[], user="0:0", name=f"capsule-copy-{uuid.uuid4().hex}",
                labels={LABEL_COPIER: labels.get(LABEL_INSTANCE, "")},
                host_config=host_config,
                network_disabled=True, detach=True)
        except docker.errors.ImageNotFound:
            raise
        except docker.errors.APIError as e:
            raise DockerError(f"Docker could not copy a volume: {_short(e)}") from None
        try:
            client.start(copier["Id"])
            ended = client.wait(copier["Id"], timeout=SNAPSHOT_TIMEOUT)
            if ended.get("StatusCode") != 0:
                said = client.logs(copier["Id"], stdout=False, stderr=True, tail=5)
                raise DockerError(f"copying a volume failed ({ended.get('StatusCode')}):"
                                  f" {said.decode('utf-8', 'replace').strip()[:300]}")
        except docker.errors.APIError as e:
            raise DockerError(f"Docker could not copy a volume: {_short(e)}") from None
        finally:
            try:
                client.remove_container(copier["Id"], force=True, v=True)
            except docker.errors.DockerException:
                pass

    def list_snapshots(self, labels: dict[str, str]) -> Deferred:
        def _thd(client):
            found = client.images(filters=_label_filter(labels))
            snapshots = []
            for image in found:
                image_labels = image.get("Labels") or {}
                volumes = _snapshot_volumes(image_labels)
                for tag in image.get("RepoTags") or []:
                    if tag == "<none>:<none>":
                        continue
                    snapshots.append(Snapshot(
                        image=tag, volumes=volumes,
                        labels={k: v for k, v in image_labels.items()
                                if k != LABEL_SNAPSHOT_VOLUMES
                                and not (k == SECRET_LABEL and not v)},
                        created=float(image.get("Created") or 0),
                        size=_thd_own_size(client, image.get("Size"), image.get("ParentId"))))
            return sorted(snapshots, key=lambda s: (s.created, s.image))
        return self._call(_thd)

    def remove_snapshot(self, snapshot: Snapshot) -> Deferred:
        return self._call(lambda client: _thd_remove_snapshot(
            client, snapshot.image, snapshot.volumes))

    def copy_snapshot_volumes(self, snapshot: Snapshot, labels: dict[str, str]) -> Deferred:
        def _thd(client):
            copies = {mount: secrets.token_hex(32) for mount in snapshot.volumes}
            try:
                for mount, source in snapshot.volumes.items():
                    self._thd_copy_volume(client, snapshot.image, source, copies[mount],
                                          {**labels, LABEL_VOLUME: COPY})
            except docker.errors.ImageNotFound:
                _thd_remove_volumes(client, copies.values())
                raise DockerError(f"the snapshot {snapshot.image} is gone") from None
            except BaseException:
                _thd_remove_volumes(client, copies.values())
                raise
            return copies
        return self._call(_thd)

    def prune_snapshots(self, labels: dict[str, str], grace: float = 600.0) -> Deferred:
        def _thd(client):
            wanted = _label_filter(labels)
            removed = 0
            # Copiers a stopped capsule left (they hold the copies they filled).
            now = time.time()
            for copier in client.containers(all=True, filters={"label": [
                    f"{LABEL_COPIER}={labels.get(LABEL_INSTANCE, '')}"]}):
                # (However small C{grace}: a copier is only just made, or
                # still copying, for a while.)
                if (copier.get("State") in _LIVE_STATES
                        or now - (copier.get("Created") or 0) < max(grace, COPIER_GRACE)):
                    continue
                try:
                    client.remove_container(copier["Id"], force=True, v=True)
                    removed += 1
                except docker.errors.DockerException:
                    pass
            for image in client.images(filters={**wanted, "dangling": True}):
                try:
                    client.remove_image(image["Id"])
                    removed += 1
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as e:
                    if e.status_code != 409:        # a container uses it
                        raise DockerError(f"Docker could not remove a snapshot's image:"
                                          f" {_short(e)}") from None
            # Read after the images went: a snapshot made meanwhile names
            # its volumes before they exist.
            named = set()
            for image in client.images(filters=wanted):
                named.update(_snapshot_volumes(image.get("Labels") or {}).values())
            copies = client.volumes(filters={
                "label": [*wanted["label"], f"{LABEL_VOLUME}={COPY}"], "dangling": True})
            for volume in copies.get("Volumes") or []:
                # A copy just made waits for the container that mounts it.
                if volume["Name"] in named or now - docker_time(volume.get("CreatedAt")) < grace:
                    continue
                try:
                    client.remove_volume(volume["Name"])
                    removed += 1
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as e:
                    if e.status_code != 409:        # mounted since it was listed
                        raise DockerError(f"Docker could not remove a snapshot's volume:"
                                          f" {_short(e)}") from None
            if removed:
                _log.info("removed {count} images and volumes of removed snapshots' forks",
                          count=removed)
            return removed
        return self._call(_thd)


def _snapshot_volumes(labels: dict) -> dict[str, str]:
    """
    The volumes a snapshot's image names (its label), by mount point.
    """
    try:
        volumes = json.loads(labels.get(LABEL_SNAPSHOT_VOLUMES) or "{}")
    except ValueError:
        return {}
    if not isinstance(volumes, dict):
        return {}
    return {str(k): str(v) for k, v in volumes.items()}


def _thd_remove_snapshot(client, image: str, volumes: dict[str, str]) -> bool:
    """
    Untag the image (its layers stay while a container uses them) and
    remove the volumes no container uses (one a container made from the
    snapshot mounts is that container's now).
    """
    try:
        # Forced, a tag is removed even while a container made from the
        # image uses it; the image itself stays while it is used.
        client.remove_image(image, force=True)
        existed = True
    except docker.errors.NotFound:
        existed = False
    except docker.errors.APIError as e:
        raise DockerError(f"Docker could not remove the snapshot {image}: {_short(e)}") from None
    for name in volumes.values():
        try:
            client.remove_volume(name)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if e.status_code != 409:
                raise DockerError(f"Docker could not remove the volume {name}:"
                                  f" {_short(e)}") from None
    return existed


def _thd_own_size(client, size, parent: str | None) -> int | None:
    """
    The bytes of an image's own layer: its size less its parent's (the
    image its container was made from).
    """
    if not isinstance(size, int) or not parent:
        return None
    try:
        below = client.inspect_image(parent).get("Size")
    except docker.errors.NotFound:
        return None
    return max(0, size - below) if isinstance(below, int) else None


def _thd_remove_volumes(client, names) -> None:
    for name in names:
        try:
            client.remove_volume(name)
        except docker.errors.DockerException:
            pass


def _cgroup_seconds(pattern: str, text: str) -> float | None:
    if pattern.endswith("cpu.stat"):
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec" and value.strip().isdigit():
                return int(value) / 1e6
        return None
    text = text.strip()
    return int(text) / 1e9 if text.isdigit() else None


def _blanked_labels(info: dict) -> dict[str, str]:
    """
    The container's labels a commit would copy into the snapshot's image
    that must not be there (its keeper's secret), emptied.
    """
    labels = (info.get("Config") or {}).get("Labels") or {}
    return {SECRET_LABEL: ""} if SECRET_LABEL in labels else {}


def _blanked_env(info: dict, client) -> list[str]:
    """
    The container's environment as its image has it: variables of the
    container's own (a profile's secrets among them) are kept out of the
    snapshot's image (a commit cannot drop them; they are made empty).
    """
    image_env = dict(e.partition("=")[::2] for e in _image_config(client, info).get("Env") or [])
    names = [e.partition("=")[0] for e in (info.get("Config") or {}).get("Env") or []]
    return [f"{name}={image_env.get(name, '')}" for name in names]


def _image_config(client, info: dict) -> dict:
    try:
        return client.inspect_image(info["Image"]).get("Config") or {}
    except docker.errors.NotFound:
        return {}


def _label_filter(labels: dict[str, str]) -> dict:
    return {"label": [f"{k}={v}" for k, v in labels.items()]}


def docker_time(text) -> float:
    """
    A Unix time from Docker's RFC 3339 time with nanoseconds (0.0 for
    Docker's zero time, or nothing).
    """
    if not isinstance(text, str) or text.startswith("0001-"):
        return 0.0
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if match is None:
        return 0.0
    base, fraction, zone = match.groups()
    when = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone))
    return when.timestamp() + (float("0." + fraction) if fraction else 0.0)


def _short(error: Exception) -> str:
    if isinstance(error, docker.errors.APIError) and error.explanation:
        text = str(error.explanation)
    else:
        text = str(error) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
