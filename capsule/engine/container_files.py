"""
One file in or out of a container through the engine's archive API
(L{capsule.engine.snapshots.KeptContainers.put_file} and C{read_file}): the
paths capsule accepts, the archive API's stat of a path (its last part not
followed: how a symbolic link is seen and refused), and the last bytes of
a file read from the archive stream.  Run on the Docker thread pool
(C{thd_}: blocking docker-py calls).
"""

from __future__ import annotations

import base64
import json
import posixpath
import tarfile

import docker.errors

from capsule.core.errors import ContainerGone, DockerError

# The most of a file read_file reads through (it keeps the last max_bytes):
# a bigger file is taken for none.
READ_SCAN_LIMIT = 64 * 1024 * 1024
# Directories put_file makes: the container's user's own.
DIRECTORY_MODE = 0o700
# The Go FileMode bits of the archive API's path stat.
GO_DIR = 1 << 31
GO_SYMLINK = 1 << 27
GO_TYPE = (1 << 31) | (1 << 27) | (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 19)


def thd_exists(client, container_id: str) -> None:
    try:
        client.inspect_container(container_id)
    except docker.errors.NotFound:
        raise ContainerGone("the session's container no longer exists") from None


def thd_stat(client, container_id: str, path: str) -> dict | None:
    """
    The archive API's stat of C{path} in the container (its last part not
    followed), or C{None} if there is no such path.
    """
    response = client.head(client._url("/containers/{0}/archive", container_id),
                           params={"path": path}, timeout=client.timeout)
    if response.status_code == 404:
        return None
    client._raise_for_status(response)
    header = response.headers.get("X-Docker-Container-Path-Stat") or ""
    try:
        found = json.loads(base64.b64decode(header))
        found["mode"] = int(found["mode"])
    except (ValueError, KeyError, TypeError):
        raise DockerError(f"Docker's answer about {path} could not be read") from None
    return found


class Chunks:
    """
    A stream's chunks as a file that tarfile reads.
    """

    def __init__(self, chunks) -> None:
        self._chunks = iter(chunks)
        self._left = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._left) < size:
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            self._left += chunk
        if size < 0:
            size = len(self._left)
        data, self._left = self._left[:size], self._left[size:]
        return data


def last_bytes(raw, max_bytes: int) -> bytes | None:
    """
    The last C{max_bytes} of the one regular file of the tar stream C{raw}.
    """
    with tarfile.open(fileobj=raw, mode="r|") as tar:
        entry = tar.next()
        if entry is None or not entry.isreg() or entry.size > READ_SCAN_LIMIT:
            return None
        f = tar.extractfile(entry)
        kept = bytearray()
        while True:
            chunk = f.read(256 * 1024)
            if not chunk:
                break
            kept += chunk
            if len(kept) > max_bytes:
                del kept[:len(kept) - max_bytes]
        return bytes(kept) if max_bytes > 0 else b""


def absolute_path(path: str) -> str:
    if (not isinstance(path, str) or not path.startswith("/") or "\0" in path
            or posixpath.normpath(path) != path or path == "/"):
        raise ValueError(f"not a normal absolute path of a file: {path!r}")
    return path


def path_parts(path: str) -> list[str]:
    """
    C{/a/b/c} -> C{["/a", "/a/b", "/a/b/c"]}.
    """
    names = path.strip("/").split("/")
    return ["/" + "/".join(names[: at + 1]) for at in range(len(names))]
