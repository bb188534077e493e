"""
A fork of a session's container: a new container whose file system is a
copy of another's (docs/keeping.md).

L{Forks} is a base of L{capsule.engine.docker.DockerAPI}, next to
L{capsule.engine.snapshots.KeptContainers}; its calls run on that class's
Docker thread pool.

Two ways, the same result:

  - I{on the host}, where capsule runs as root beside a local engine (a
    unix socket) whose storage driver is overlay2: the new container is
    created (not started) from the source's very image (by its id, as the
    snapshot's image would lie on it, whatever the spec names), the source's writable layer (its overlay upper directory) is
    copied into the new one's with C{cp -a --reflink=auto} (owners, modes,
    times, extended attributes, among them overlay's marks of a directory
    that replaces the image's, the character devices 0/0 that mark a file
    deleted, links as links, hard links as hard links), each of its
    anonymous volumes into a new volume the same way, then it is started.
    A running source is paused while its files are copied: a program in it
    cannot swap a directory for a symbolic link under the copy (which runs
    on the host, where that link would lead to the host's files), and the
    copy is of one moment.  Both directories of every copy must be, as
    themselves and not through a link, under the engine's data root as the
    engine tells it; anything else is refused.
  - I{by a snapshot} everywhere else (another host's engine, capsule not
    root, another storage driver) and whenever the first
    way fails (what it made is removed first): a C{docker commit} of the
    source and copies of its volumes
    (L{capsule.engine.snapshots.KeptContainers.snapshot_container}), a
    container made from that image mounting those copies, and the image's
    tag removed (its layers stay while the container uses them).

The volume copies of either way are named like anonymous volumes (so that a
fork of the fork copies them again) and carry the new container's labels
and C{io.capsule.volume=copy}: they outlive the container, and
L{capsule.engine.snapshots.KeptContainers.prune_snapshots} removes them
once it is gone.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import time
from dataclasses import replace
from urllib.parse import urlsplit

import docker
import docker.errors
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from capsule.core.errors import ContainerGone, DockerError, DockerUnavailable, ImageMissing
from capsule.core.spec import ContainerSpec
from capsule.engine.snapshots import (ANONYMOUS_VOLUME, COPY, LABEL_INSTANCE, LABEL_SNAPSHOT,
                                      LABEL_VOLUME, SNAPSHOT_TIMEOUT, _short,
                                      _thd_remove_snapshot, _thd_remove_volumes)

_log = Logger()

# The image repository of a fork's passing snapshot, and the label that
# tells it from a named one.
SNAPSHOT_REPOSITORY = "capsule-snapshot"
LABEL_FORK = "io.capsule.fork"
# The label of a fork's container naming the volume copies it owns:
# "MOUNT=NAME,..." (capsule.sessions.keeping reads it).
LABEL_OWN_VOLUMES = "io.capsule.own-volumes"
# The copy program and its options: everything kept, links not followed,
# blocks shared where the file system can (btrfs, xfs).
COPY_COMMAND = ("cp", "-a", "--reflink=auto", "--")


class CopyRefused(Exception):
    """
    A copy on the host was refused or failed: the fork is made by a
    snapshot instead.
    """


class Forks:
    """
    L{IDockerAPI.fork_container} for L{DockerAPI}: needs its C{_call},
    C{host}, C{_thd_create_container}, C{_thd_start_new},
    C{_thd_create_session_container}, C{_thd_snapshot} and
    C{_thd_copy_volume}.
    """

    # (storage driver, data root) the engine told, once asked.
    _fork_engine: tuple[str, str] | None = None

    def fork_container(self, container_id: str, session_id: str, spec: ContainerSpec,
                       fast: bool = True) -> Deferred:
        return self._call(self._thd_fork, container_id, session_id, spec, fast)

    def _thd_fork(self, client, container_id: str, session_id: str, spec: ContainerSpec,
                  fast: bool) -> str:
        try:
            source = client.inspect_container(container_id)
        except docker.errors.NotFound:
            raise ContainerGone("the session's container no longer exists") from None
        started = time.monotonic()
        why = self._thd_why_not_on_host(client, source, spec) if fast else "asked to"
        if why is None:
            try:
                new = self._thd_fork_on_host(client, source, session_id, spec)
            except (DockerUnavailable, ImageMissing, ContainerGone):
                raise
            except Exception as e:
                why = f"copying on the host failed ({_error(e)})"
                _log.warn("fork of container {container}: {why}; by a snapshot instead",
                          container=container_id[:12], why=why)
            else:
                _log.info("container {container} forked into {new} on the host in"
                          " {seconds:.2f} s", container=container_id[:12], new=new[:12],
                          seconds=time.monotonic() - started)
                return new
        new = self._thd_fork_by_snapshot(client, container_id, session_id, spec)
        _log.info("container {container} forked into {new} by a snapshot ({why}) in"
                  " {seconds:.2f} s", container=container_id[:12], new=new[:12], why=why,
                  seconds=time.monotonic() - started)
        return new

    def unpause_container(self, container_id: str) -> Deferred:
        def _thd(client):
            try:
                paused = client.inspect_container(container_id)["State"].get("Paused")
            except docker.errors.NotFound:
                return False
            if paused:
                try:
                    client.unpause(container_id)
                except docker.errors.APIError as e:
                    if e.status_code != 409:        # thawed meanwhile
                        raise DockerError(f"Docker could not unpause the container:"
                                          f" {_short(e)}") from None
            return bool(paused)
        return self._call(_thd)

    # -- which way ---------------------------------------------------------

    def _thd_why_not_on_host(self, client, source: dict, spec: ContainerSpec) -> str | None:
        """
        C{None} if the fork can be copied on the host, else why not.
        """
        if urlsplit(self.host).scheme != "unix":
            return "the engine is not local"
        if os.geteuid() != 0:
            return "capsule is not root"
        driver, _ = self._thd_fork_engine(client)
        if driver != "overlay2" or (source.get("GraphDriver") or {}).get("Name") != "overlay2":
            return f"the storage driver is {driver}, not overlay2"
        if not source.get("Image"):
            return "the source's image is not known"
        return None

    def _thd_fork_engine(self, client) -> tuple[str, str]:
        if self._fork_engine is None:
            info = client.info()
            self._fork_engine = (str(info.get("Driver") or ""),
                                 str(info.get("DockerRootDir") or ""))
        return self._fork_engine

    # -- on the host -------------------------------------------------------

    def _thd_fork_on_host(self, client, source: dict, session_id: str,
                          spec: ContainerSpec) -> str:
        _, root = self._thd_fork_engine(client)
        mounted = {target for _, target in spec.volumes}
        anonymous = [m for m in source.get("Mounts") or []
                     if m.get("Type") == "volume"
                     and ANONYMOUS_VOLUME.fullmatch(m.get("Name") or "")
                     and m.get("Destination") not in mounted]
        labels = {**spec.labels, LABEL_VOLUME: COPY}
        # The source's very image (by its id), whatever C{spec} names: the
        # copied layer lies on it (as a snapshot's image would).
        spec = replace(spec, image=source["Image"])
        copies: dict[str, dict] = {}        # destination -> the new volume
        new_id = None
        try:
            for mount in anonymous:
                copies[mount["Destination"]] = client.create_volume(
                    secrets.token_hex(32), labels=labels)
            paused = None
            state = source.get("State") or {}
            if state.get("Running") and not state.get("Paused"):
                client.pause(source["Id"])
                paused = time.monotonic()
            copying = time.monotonic()
            try:
                # The volumes first: the engine fills an empty volume from
                # the image when a container that mounts it is made (what
                # the source deleted there would come back).
                for mount in anonymous:
                    target = copies[mount["Destination"]]
                    if _on_host(client, mount, target):
                        copy_tree(mount["Source"], target["Mountpoint"], root)
                    else:
                        self._thd_fill_volume(client, source, mount["Name"], target["Name"])
                forked = _owning(spec, {destination: volume["Name"]
                                        for destination, volume in copies.items()})
                new_id = self._thd_create_container(client, session_id, forked)
                copy_tree(_upper(source), _upper(client.inspect_container(new_id)), root)
            finally:
                copied = time.monotonic()
                if paused is not None:
                    _thd_unpause(client, source["Id"])
                    _log.info("container {container} was paused {seconds:.2f} s while its"
                              " files were copied ({copy:.2f} s)", container=source["Id"][:12],
                              seconds=time.monotonic() - paused, copy=copied - copying)
        except BaseException:
            if new_id is not None:
                try:
                    client.remove_container(new_id, force=True, v=True)
                except docker.errors.DockerException:
                    pass
            _thd_remove_volumes(client, [v["Name"] for v in copies.values()])
            raise
        try:
            self._thd_start_new(client, new_id)
        except BaseException:
            _thd_remove_volumes(client, [v["Name"] for v in copies.values()])
            raise
        return new_id

    def _thd_fill_volume(self, client, source: dict, name: str, target: str) -> None:
        """
        Copy the volume C{name} into the existing volume C{target} by the
        snapshots' copier (a volume of another driver, or with options).
        """
        self._thd_copy_volume(client, source["Image"], name, target, {})

    # -- by a snapshot -----------------------------------------------------

    def _thd_fork_by_snapshot(self, client, container_id: str, session_id: str,
                              spec: ContainerSpec) -> str:
        instance = spec.labels.get(LABEL_INSTANCE) or "capsule"
        tag = f"{instance}-fork-{secrets.token_hex(8)}"
        # Not a named snapshot, even where the source came from one (its
        # labels would say so).
        labels = {**spec.labels, LABEL_SNAPSHOT: "", LABEL_FORK: "true"}
        snapshot = self._thd_snapshot(client, container_id, SNAPSHOT_REPOSITORY, tag, labels)
        mounted = {target for _, target in spec.volumes}
        used = {mount: name for mount, name in snapshot.volumes.items() if mount not in mounted}
        forked = replace(_owning(spec, used), image=snapshot.image)
        try:
            new_id = self._thd_create_session_container(client, session_id, forked)
        except BaseException:
            try:
                _thd_remove_snapshot(client, snapshot.image, snapshot.volumes)
            except Exception as e:
                _log.warn("could not remove the fork's snapshot {image}: {error}",
                          image=snapshot.image, error=_short(e))
            raise
        try:
            # The tag goes, and any copy the new container does not mount;
            # what it uses stays (the engine refuses to remove it).
            _thd_remove_snapshot(client, snapshot.image, snapshot.volumes)
        except DockerError as e:
            _log.warn("could not remove the fork's snapshot {image}: {error}",
                      image=snapshot.image, error=e)
        return new_id


def _owning(spec: ContainerSpec, copies: dict[str, str]) -> ContainerSpec:
    """
    C{spec} mounting the volume C{copies} (mount point -> name) too, and
    labelled with them.
    """
    labels = {k: v for k, v in spec.labels.items() if k != LABEL_OWN_VOLUMES}
    if copies:
        labels[LABEL_OWN_VOLUMES] = own_volumes_label(copies)
    return replace(spec, labels=labels, volumes=spec.volumes + tuple(
        (name, mount) for mount, name in sorted(copies.items())))


def own_volumes_label(volumes: dict[str, str]) -> str:
    """
    L{LABEL_OWN_VOLUMES}'s value for C{volumes} (mount point -> name).
    """
    return ",".join(f"{mount}={name}" for mount, name in sorted(volumes.items()))


def copy_tree(source: str, target: str, root: str) -> None:
    """
    Copy what is in the directory C{source} into the directory C{target}
    with C{cp -a --reflink=auto}; both must be real directories under
    C{root} (the engine's data root), reached through no symbolic link.

    @raise CopyRefused: otherwise, or if the copy failed.
    """
    checked_root = _real_directory(root, "the engine's data root")
    for path in (source, target):
        _real_directory(path, "a directory to copy")
        if not path.startswith(checked_root.rstrip("/") + "/"):
            raise CopyRefused(f"{path} is not under the engine's data root {checked_root}")
    if os.path.samefile(source, target):
        raise CopyRefused(f"{source} is the directory to copy to")
    try:
        done = subprocess.run([*COPY_COMMAND, source.rstrip("/") + "/.", target],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=SNAPSHOT_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise CopyRefused(f"cp could not run: {e}") from None
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise CopyRefused(f"cp failed ({done.returncode}): {' / '.join(said[-3:])[:300]}")


def _real_directory(path, what: str) -> str:
    """
    C{path}, if it is absolute, normal, a directory, and no part of it is a
    symbolic link; else raise L{CopyRefused}.
    """
    if (not isinstance(path, str) or not path.startswith("/") or "\0" in path
            or os.path.normpath(path) != path.rstrip("/") and path != "/"):
        raise CopyRefused(f"{what} is not a normal absolute path: {path!r}")
    if os.path.realpath(path) != os.path.normpath(path):
        raise CopyRefused(f"{what} {path} is, or is under, a symbolic link")
    try:
        found = os.lstat(path)
    except OSError as e:
        raise CopyRefused(f"{what} {path} cannot be seen: {e.strerror}") from None
    if not stat.S_ISDIR(found.st_mode):
        raise CopyRefused(f"{what} {path} is not a directory")
    return os.path.normpath(path)


def _upper(info: dict) -> str:
    driver = info.get("GraphDriver") or {}
    upper = (driver.get("Data") or {}).get("UpperDir")
    if driver.get("Name") != "overlay2" or not upper:
        raise CopyRefused("the container has no overlay upper directory")
    return upper


def _on_host(client, mount: dict, target: dict) -> bool:
    """
    Whether a volume can be copied by its directory on the host: both the
    local driver's, without options (whose directory is the data itself).
    """
    if mount.get("Driver") != "local" or target.get("Driver") != "local":
        return False
    try:
        found = client.inspect_volume(mount["Name"])
    except docker.errors.NotFound:
        raise CopyRefused(f"the volume {mount['Name']} to copy is gone") from None
    return not found.get("Options") and not target.get("Options") and bool(
        mount.get("Source")) and bool(target.get("Mountpoint"))


def _thd_unpause(client, container_id: str) -> None:
    try:
        client.unpause(container_id)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as e:
        _log.warn("could not unpause container {container} after copying its files: {error}",
                  container=container_id[:12], error=_short(e))


def _error(e: Exception) -> str:
    if isinstance(e, docker.errors.APIError):
        return _short(e)
    return str(e) or type(e).__name__
