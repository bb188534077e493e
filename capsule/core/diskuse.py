"""
What a session holds on the host's disk, beyond what Docker's C{SizeRw}
says, and how it is read.

Docker's C{SizeRw} is the size of the files in a container's writable layer.
A session holds more than that:

 - files it deleted while a process still has them open (or mapped): their
   blocks stay allocated until the last descriptor closes, and no directory
   lists them, so no walk of the layer (C{SizeRw}, C{du}) sees them;
 - its volumes: the anonymous /workspace and home volumes of a
   --read-only-root session, and its user's agent volume, which outlives
   the session.

The engine gives volumes' sizes (C{/system/df}: L{DiskUsage}).  Deleted
files held open are read inside the container by L{HELD_SCAN}, an exec run
as the session's user: the kernel lets a process read another's descriptors
(C{/proc/PID/fd}) only with the same user id or C{CAP_SYS_PTRACE}, which a
container without capabilities never has, not even for root (and a
privileged exec is refused under no-new-privileges).

Pure: no reactor, no Docker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024 * 1024

# Lists each deleted-but-open regular file the scanning user can see
# (device, inode, 512-byte blocks allocated: "%D %i %b", a "f" line) from
# every process's descriptors, then every mapping of a deleted file
# (/proc/PID/maps lines ending " (deleted)": an "m" line; a mapping's size
# is a lower bound of its file's, whose inode /proc/PID/map_files would
# give only to CAP_SYS_ADMIN), then the mounts' devices and file system
# types ("d" lines), then "x" and the processes whose descriptors it could
# not read.  Only the image's own /bin/sh, find, grep and sed (read-only to
# a session without sudo); stderr is dropped.
HELD_SCAN = (
    "/bin/sh", "-c",
    "cd /proc || exit 1; "
    "find -L [0-9]*/fd -mindepth 1 -maxdepth 1 -type f -links 0 -printf 'f %D %i %b\\n'"
    " 2>/dev/null; "
    "grep -h ' (deleted)$' [0-9]*/maps 2>/dev/null | sed -n 's/^\\([0-9a-f]*\\)-\\([0-9a-f]*\\)"
    " [^ ]* [^ ]* \\([0-9a-f]*:[0-9a-f]*\\) \\([0-9]*\\) .*/m \\1 \\2 \\3 \\4/p'; "
    "sed -n 's/^[0-9]* [0-9]* \\([0-9]*:[0-9]*\\) .* - \\([^ ]*\\) .*/d \\1 \\2/p'"
    " self/mountinfo; "
    "for p in [0-9]*; do [ -r $p/fd ] || [ ! -e $p/fd ] || echo x $p; done",
)
# File systems whose files are memory, not disk (counted by --memory).
MEMORY_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs", "mqueue", "shm"})


@dataclass(frozen=True)
class Mount:
    """
    A volume a container mounts: its name and where.
    """

    name: str
    destination: str


@dataclass(frozen=True)
class DiskUsage:
    """
    What the engine says of disk use, in one call.

    @ivar layers: each running container's writable layer size (C{SizeRw}),
        by container id.
    @ivar mounts: the volumes each of those containers mounts.
    @ivar volumes: volumes' sizes in bytes, by name (only when asked for;
        a volume whose size the engine does not know is left out).
    """

    layers: dict[str, int] = field(default_factory=dict)
    mounts: dict[str, tuple[Mount, ...]] = field(default_factory=dict)
    volumes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Held:
    """
    What L{HELD_SCAN} found: C{bytes} held by C{files} deleted files on
    disk-backed file systems, and C{hidden} processes whose descriptors it
    could not read (another user's, or made undumpable).
    """

    bytes: int = 0
    files: int = 0
    hidden: int = 0


def _makedev(major: int, minor: int) -> int:
    # As glibc's makedev(): what find's %D prints.
    return ((major & 0xFFFFF000) << 32) | ((major & 0xFFF) << 8) | \
        ((minor & 0xFFFFFF00) << 12) | (minor & 0xFF)


def parse_held(output: bytes) -> Held:
    """
    What L{HELD_SCAN}'s output says.  A file open and mapped, or open in
    several processes, counts once, at the largest size seen; files on a
    memory file system, or on a device no mount names (C{memfd}s, pipes'
    and sockets' pseudo file systems), do not count.  Lines that do not
    parse are skipped (the output may be cut short).
    """
    sizes: dict[tuple[int, int], int] = {}
    kinds: dict[int, str] = {}
    hidden = 0
    for line in output.decode("ascii", "replace").splitlines():
        parts = line.split()
        try:
            if parts[0] == "f" and len(parts) == 4:
                key = (int(parts[1]), int(parts[2]))
                sizes[key] = max(sizes.get(key, 0), int(parts[3]) * 512)
            elif parts[0] == "m" and len(parts) == 5:
                major, minor = (int(n, 16) for n in parts[3].split(":"))
                key = (_makedev(major, minor), int(parts[4]))
                length = int(parts[2], 16) - int(parts[1], 16)
                sizes[key] = max(sizes.get(key, 0), length)
            elif parts[0] == "d" and len(parts) == 3:
                major, minor = (int(n) for n in parts[1].split(":"))
                kinds[_makedev(major, minor)] = parts[2]
            elif parts[0] == "x" and len(parts) == 2:
                hidden += 1
        except (IndexError, ValueError):
            continue
    counted = [size for (device, _), size in sizes.items()
               if device in kinds and kinds[device] not in MEMORY_FILE_SYSTEMS]
    return Held(bytes=sum(counted), files=len(counted), hidden=hidden)


@dataclass(frozen=True)
class SessionDisk:
    """
    What one session holds, by where.

    @ivar layer: its writable layer (C{SizeRw}).
    @ivar volumes: its own volumes (a --read-only-root session's), not its
        agent volume.
    @ivar held: deleted files its processes hold open, at the last scan.
    """

    layer: int = 0
    volumes: int = 0
    held: int = 0

    @property
    def total(self) -> int:
        return self.layer + self.volumes + self.held

    def describe(self) -> str:
        """
        The total, and what of it is not plain files in its layer.
        """
        parts = []
        if self.held:
            parts.append(f"{mib(self.held)} of it in deleted files still open")
        if self.volumes:
            parts.append(f"{mib(self.volumes)} in its volumes")
        return mib(self.total) + (f" ({', '.join(parts)})" if parts else "")


def mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB"
