"""
What the engine's host really has, read cheaply and often: its available
memory (C{MemAvailable} of /proc/meminfo) and what each session's container
holds (its cgroup's memory use less its inactive file cache: the working
set, as the kubelet counts it).

Only when the engine runs on this host (its Docker host is a UNIX socket
and it says the same total memory as /proc/meminfo): then every
C{interval} seconds one small file is read for the host and one or two per
session; never a Docker call.  Otherwise nothing is read, and admission
counts sessions at their requests, without a reserve
(L{capsule.core.memory}).
"""

from __future__ import annotations

from typing import Callable, Iterable

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()

MEMINFO = "/proc/meminfo"
CGROUP_ROOT = "/sys/fs/cgroup"
# Where a container's memory use is, by cgroup version and driver: the
# file with its use, the file with its statistics, the statistic of its
# inactive file cache.
CGROUP_LAYOUTS = (
    ("memory/docker/{id}/memory.usage_in_bytes", "memory/docker/{id}/memory.stat",
     "total_inactive_file"),
    ("memory/system.slice/docker-{id}.scope/memory.usage_in_bytes",
     "memory/system.slice/docker-{id}.scope/memory.stat", "total_inactive_file"),
    ("docker/{id}/memory.current", "docker/{id}/memory.stat", "inactive_file"),
    ("system.slice/docker-{id}.scope/memory.current",
     "system.slice/docker-{id}.scope/memory.stat", "inactive_file"),
)
# Under this use a container's statistics are not read (its cache is
# counted too: a little more than it holds, never less).
MIB = 1024 ** 2
STAT_ABOVE = 32 * MIB
# The engine's total memory and /proc/meminfo's may differ this much on the
# same host (the engine rounds, a balloon driver moves).
SAME_TOTAL = 0.02


def read_small(path: str) -> str | None:
    """
    A small file's text, or C{None} if it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read(65536).decode("ascii", "replace")
    except OSError:
        return None


def meminfo_field(text: str, name: str) -> int | None:
    """
    A field of /proc/meminfo's C{text}, in bytes.
    """
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key == name:
            parts = rest.split()
            try:
                return int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
            except (IndexError, ValueError):
                return None
    return None


def stat_field(text: str, name: str) -> int | None:
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            try:
                return int(value)
            except ValueError:
                return None
    return None


class HostMemory:
    """
    The reading of the engine's host (L{capsule.core.memory.HostReading}).

    @param containers: the ids of the live sessions' containers.
    @param read: reads a small file (C{None} if it cannot): tests give a
        fake host.
    @param reserve: the reserve now (C{None}: none): the log says when the
        host goes under it (new sessions are refused) and when it is back.
    @ivar available: bytes available on the host, as last read; C{None}:
        not read (the engine is elsewhere, or not known yet).
    @ivar total: the host's memory, as /proc/meminfo says it.
    """

    def __init__(self, clock, containers: Callable[[], Iterable[str]], interval: float = 5.0,
                 read: Callable[[str], str | None] = read_small,
                 cgroup_root: str = CGROUP_ROOT,
                 reserve: Callable[[], int | None] | None = None) -> None:
        self._clock = clock
        self._reserve = reserve
        self._under = False
        self._containers = containers
        self.interval = interval
        self._read = read
        self._root = cgroup_root
        self.available: int | None = None
        self.total: int | None = None
        self._used: dict[str, int] = {}
        # Where the containers' cgroups are: None not known yet, () none found.
        self._layout: tuple | None = None
        self._loop: LoopingCall | None = None

    def used(self, container_id: str) -> int | None:
        return self._used.get(container_id)

    def local_total(self) -> int | None:
        """
        This machine's memory, as /proc/meminfo says it.
        """
        text = self._read(MEMINFO)
        return None if text is None else meminfo_field(text, "MemTotal")

    def engine_is(self, total: int, docker_host: str) -> bool:
        """
        The engine (at C{docker_host}) says its host has C{total} bytes:
        if that host is this one, start reading it.  Whether it is.
        """
        here = self.local_total()
        local = (docker_host.startswith(("unix://", "http+unix://")) and here is not None
                 and abs(here - total) <= SAME_TOTAL * max(here, total))
        if not local:
            _log.warn("the Docker engine runs on another host ({host}, {total} bytes against"
                      " this one's {here}): its available memory is not watched (no"
                      " --memory-reserve) and sessions count at their requests",
                      host=docker_host, total=total, here=here)
            return False
        self.total = here
        self.start()
        return True

    def start(self) -> None:
        if self._loop is None:
            self._loop = LoopingCall(self.read)
            self._loop.clock = self._clock
            self._loop.start(self.interval, now=True).addErrback(
                lambda f: _log.failure("reading the host's memory failed", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def read(self) -> None:
        """
        Read the host's available memory and the containers' use now.
        """
        text = self._read(MEMINFO)
        self.available = None if text is None else meminfo_field(text, "MemAvailable")
        self._say_reserve()
        used = {}
        if self._layout != ():
            tried = False
            for container_id in self._containers():
                tried = True
                value = self._container(container_id)
                if value is not None:
                    used[container_id] = value
            if tried and self._layout is None:
                # Not this host's cgroups (capsule in a container of its
                # own cgroup namespace): not looked for again.
                self._layout = ()
                _log.info("the sessions' memory use is not measured (no cgroup of theirs"
                          " under {root}): they count at their requests", root=self._root)
        self._used = used

    def _say_reserve(self) -> None:
        reserve = self._reserve() if self._reserve is not None else None
        under = None not in (reserve, self.available) and self.available < reserve
        if under and not self._under:
            _log.warn("the host has {available} MiB of memory available, under the reserve of"
                      " {reserve} MiB (--memory-reserve): new sessions are refused until it has"
                      " more", available=self.available // MIB, reserve=reserve // MIB)
        elif self._under and not under:
            _log.info("the host has {available} MiB of memory available again (reserve"
                      " {reserve} MiB): new sessions are admitted",
                      available=None if self.available is None else self.available // MIB,
                      reserve=None if reserve is None else reserve // MIB)
        self._under = under

    def _container(self, container_id: str) -> int | None:
        layouts = (self._layout,) if self._layout is not None else CGROUP_LAYOUTS
        for layout in layouts:
            usage_path, stat_path, inactive = layout
            text = self._read(f"{self._root}/{usage_path.format(id=container_id)}")
            if text is None:
                continue
            try:
                usage = int(text.strip())
            except ValueError:
                return None
            self._layout = layout
            if usage <= STAT_ABOVE:
                return usage
            stat = self._read(f"{self._root}/{stat_path.format(id=container_id)}")
            cache = stat_field(stat, inactive) if stat is not None else None
            return max(0, usage - (cache or 0))
        return None
