"""
Where the machine's CPU goes during a measurement.

C{CpuWatch} samples every process's CPU time (C{/proc/PID/stat}) and the
machine's busy time (C{/proc/stat}) a few times a second and, when stopped,
says how many CPU seconds each kind of process used meanwhile.  A process
that ends between two samples loses at most one interval of its time, so
short-lived ones are undercounted; the long-lived ones a throughput run
involves (the generator, the keeper, dockerd, the shim, capsule, the
client) are counted to within one interval.
"""

from __future__ import annotations

import os

from twisted.internet.task import LoopingCall

TICK = os.sysconf("SC_CLK_TCK")


def _machine() -> tuple[float, float]:
    """
    (busy, total) CPU seconds since boot, over all cores.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # without guest time, which user time includes
    return (total - idle) / TICK, total / TICK


def _processes() -> dict[int, tuple[str, float]]:
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        found[int(entry.name)] = (comm, (int(fields[11]) + int(fields[12])) / TICK)
    return found


class CpuWatch:
    """
    @param clock: a reactor, for the sampling timer.
    @param names: pid -> name for processes to be named apart from their
        command (the bench client, capsule).
    """

    def __init__(self, clock, names: dict[int, str], interval: float = 0.2) -> None:
        self._names = names
        self._start: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._loop = LoopingCall(self._sample)
        self._loop.clock = clock
        self._interval = interval

    def start(self) -> None:
        self._machine0 = _machine()
        self._start = {pid: cpu for pid, (_, cpu) in _processes().items()}
        self._last = {}
        self._loop.start(self._interval, now=False)

    def _sample(self) -> None:
        self._last.update(_processes())

    def stop(self) -> dict:
        """
        Stop, and return C{{"busy": share of all cores busy, "cores": n,
        "machine": busy CPU seconds in all, "groups": {name: CPU seconds}}}
        for the time since L{start}.
        """
        if self._loop.running:
            self._loop.stop()
        self._sample()
        busy1, total1 = _machine()
        busy0, total0 = self._machine0
        cores = os.cpu_count() or 1
        groups: dict[str, float] = {}
        for pid, (comm, cpu) in self._last.items():
            used = cpu - self._start.get(pid, 0.0)
            if used <= 0:
                continue
            name = self._names.get(pid) or _group(comm)
            groups[name] = groups.get(name, 0.0) + used
        wall = (total1 - total0) / cores
        return {"busy": (busy1 - busy0) / wall if wall else 0.0, "cores": cores,
                "machine": busy1 - busy0, "groups": groups}


# The processes a throughput run's bytes go through, on either path (the
# rest of the machine's CPU is other work: on a shared machine, not ours).
PATH = ("base64", "head", "bash", "capsule-keeper", "capsule", "dockerd", "containerd",
        "containerd-shim", "kernel threads", "bench client")


def path_ms_per_mb(result: dict, megabytes: float) -> float:
    """
    CPU ms per MB of the processes on the bytes' way (L{PATH}).
    """
    return sum(seconds for name, seconds in result["groups"].items()
               if name in PATH) * 1000 / megabytes


def _group(comm: str) -> str:
    if comm.startswith("containerd-shim"):
        return "containerd-shim"
    if comm.startswith("kworker") or comm.startswith("ksoftirq"):
        return "kernel threads"
    return comm


def describe(result: dict, megabytes: float, top: int = 8) -> str:
    """
    One line: cores busy, then the biggest users in CPU ms per MB.
    """
    groups = sorted(result["groups"].items(), key=lambda kv: -kv[1])
    parts = [f"{name} {seconds * 1000 / megabytes:.1f}" for name, seconds in groups[:top]
             if seconds * 1000 / megabytes >= 0.5]
    accounted = sum(result["groups"].values())
    return (f"machine {result['busy'] * 100:.0f}% of {result['cores']} cores busy,"
            f" {result['machine'] * 1000 / megabytes:.1f} CPU ms/MB in all"
            f" ({path_ms_per_mb(result, megabytes):.1f} on the bytes' path)"
            f" ({accounted * 1000 / megabytes:.1f} in processes): "
            + ", ".join(parts) + " (CPU ms per MB)")
