"""
Density: how many idle shell sessions one host holds, and what each costs.

    make bench ARGS="--only density"                       # N = 300
    make bench ARGS="--only density --density-sessions 30"

With one capsule started with its default options (only what one client
needs raised: the per-client and rate limits, and --grace, since sessions
made through the API without a client would otherwise end after 60 s),
in one run:

1. at 0 sessions: the host's available memory (C{MemAvailable}), capsule's
   RSS, capsule's CPU over C{--density-cpu-seconds} (60 s), a new warm
   connect (a WebSocket opened until its shell answers, the pool full) and
   keystroke echo p50/p99 of one session, and of a raw exec in a container
   of the floor's at the same moment (the machine's load moves both);
2. N idle shell sessions created through the API (C{POST /api/sessions}),
   in batches of L{BATCH} at once: the time per session, and how many were
   admitted (a refusal ends the creation, and is reported with its reason);
   capsule's idle CPU again at 100 sessions on the way;
3. at N: the same figures as at 0; memory per session both as the fall
   of C{MemAvailable} (which the machine's other work moves too) and
   counted: each container's cgroup memory, its containerd-shim's PSS, and
   what dockerd and containerd grew by (this needs root, as the bench's
   Docker access mostly is);
4. the burst: the floor first (L{BURST} parallel C{docker run -it} of the
   same image through the docker CLI on a pty, each until its shell answers
   a command), then L{BURST} capsule sessions opened at once over the
   WebSocket, each until its shell answers a command, then the floor again
   on capsule's network (a user-defined bridge costs Docker more per start
   than its default one: that part of the gap is the network's);
5. every session deleted through the API (C{DELETE /api/sessions/ID}),
   timed until their containers are gone.

It prints its figures against the targets of issue 21.  The containers it
makes are capsule's (its instance's label) and the floor's (the run's
label): the bench removes both whatever happens.
"""

from __future__ import annotations

import json
import os
import time
import uuid

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread

from capsule.engine.network import CAPSULE_NETWORK
from tests.support.httpclient import request
from tests.support.live import CapsuleServer, poll, sleep

from clients import ENVIRONMENT, USER, WORKDIR, lean_session, open_session
from floors import CPUS, LABEL_BENCH, LABEL_BENCH_RUN, MEMORY, PIDS, Floor
from measures import READY_INPUT, READY_MARK, BenchError, lean_keystrokes, ms, say, summary

# Sessions created at once through the API.
BATCH = 10
# Sessions opened at once in the burst.
BURST = 20
# Where capsule's idle CPU is measured on the way up (besides 0 and N).
CPU_AT = (100,)
# Warm connects measured at 0 and at N (the median is compared).
CONNECTS = 5
# Keystrokes of the echo measurement.
KEYSTROKES = 300

# Issue 21's targets.
TARGET_ADMITTED = 300
TARGET_HOST_MB = 10.0
TARGET_ECHO_P99 = 2.0
TARGET_CONNECT = 1.5
TARGET_CPU = 0.05


def capsule_options(n: int, grace: float) -> list[str]:
    """
    capsule's options for the density run: its defaults, with the per-client
    and rate limits raised (the bench is one client) and a grace period
    that outlasts the run.
    """
    return ["--max-sessions-per-client", str(n + BURST + 10), "--session-rate", "1000/1",
            "--grace", f"{grace:g}"]


# -- what the host and capsule's process say -------------------------------------------


def cpu_seconds(pid: int) -> float:
    """
    The CPU time (user + system, all threads) process C{pid} used so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are the 14th and 15th fields; the 3rd is fields[0].
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pss_mb(pid: int) -> float | None:
    """
    Process C{pid}'s proportional share of the memory it maps (its own
    pages, and its part of those it shares), or C{None} if it cannot be read.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def processes() -> dict[int, str]:
    """
    Every process's command line, by pid.
    """
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found[int(entry)] = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                pass
    return found


def engine_mb() -> float | None:
    """
    The memory dockerd and containerd hold (PSS), or C{None} if unreadable.
    """
    total, seen = 0.0, False
    for pid, command in processes().items():
        name = command.split(" ", 1)[0].rsplit("/", 1)[-1]
        if name in ("dockerd", "containerd"):
            value = pss_mb(pid)
            if value is not None:
                total, seen = total + value, True
    return total if seen else None


def container_memory(container_ids: list[str]) -> dict | None:
    """
    What each of these containers costs the host, counted rather than
    inferred from C{MemAvailable} (which the machine's other work moves):
    its cgroup's memory (cgroup v1 or v2, with Docker's cgroupfs or systemd
    layout) and its containerd-shim's PSS, as means in MB; C{None} where
    they cannot be read (not root, another layout).
    """
    cgroups, shims = [], []
    wanted = set(container_ids)
    for container_id in container_ids:
        for path in (f"/sys/fs/cgroup/memory/docker/{container_id}/memory.usage_in_bytes",
                     f"/sys/fs/cgroup/docker/{container_id}/memory.current",
                     f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.current"):
            try:
                with open(path) as f:
                    cgroups.append(int(f.read()) / 2 ** 20)
                break
            except OSError:
                continue
    for pid, command in processes().items():
        if "containerd-shim" in command and " -id " in command:
            if command.split(" -id ", 1)[1].split(" ", 1)[0] in wanted:
                value = pss_mb(pid)
                if value is not None:
                    shims.append(value)
    if not cgroups or not shims:
        return None
    return {"containers": len(container_ids), "cgroup_mb": sum(cgroups) / len(cgroups),
            "shim_mb": sum(shims) / len(shims), "counted": (len(cgroups), len(shims))}


# -- the floor: docker run -it on a pty ---------------------------------------------------


class _DockerRun(ProcessProtocol):
    """
    One C{docker run -it}: once its shell prints anything, the ready
    command is typed; C{usable} fires with the milliseconds from the start
    until its answer came.
    """

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.seen = b""
        self.typed = False
        self.usable: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def childDataReceived(self, fd, data: bytes) -> None:
        self.seen = (self.seen + data)[-4096:]
        if not self.typed:
            self.typed = True
            self.transport.write(READY_INPUT)
        elif READY_MARK in self.seen and not self.usable.called:
            self.usable.callback(ms(time.perf_counter() - self.t0))

    def processEnded(self, reason) -> None:
        if not self.usable.called:
            self.usable.errback(BenchError(f"docker run ended first: {self.seen[-300:]!r}"))
        self.ended.callback(None)


def docker_run_argv(image: str, run_id: str, network: str | None = None) -> list[str]:
    """
    A plain C{docker run -it} of the session image, as a terminal server
    that runs one per connection does, with capsule's default limits (on
    Docker's default bridge, or on C{network}).
    """
    env = [arg for name, value in ENVIRONMENT.items() for arg in ("-e", f"{name}={value}")]
    return ["docker", "run", "--rm", "-it", "--init", "--memory", MEMORY,
            "--memory-swap", MEMORY, "--cpus", f"{CPUS:g}", "--pids-limit", str(PIDS),
            "--user", USER, "--workdir", WORKDIR, *env,
            "--label", f"{LABEL_BENCH}=1", "--label", f"{LABEL_BENCH_RUN}={run_id}",
            *(["--network", network] if network else []),
            "--name", f"bench-floor-{uuid.uuid4()}", image, "bash", "-l"]


async def docker_run_burst(image: str, run_id: str, n: int, network: str | None = None,
                           timeout: float = 120) -> dict:
    """
    N C{docker run -it} at once: the time until all their shells answered.
    """
    runs = []
    t0 = time.perf_counter()
    for _ in range(n):
        run = _DockerRun(t0)
        reactor.spawnProcess(run, "docker", docker_run_argv(image, run_id, network),
                             env=dict(os.environ), usePTY=True)
        runs.append(run)
    try:
        outcomes = await defer.DeferredList(
            [r.usable.addTimeout(timeout, reactor) for r in runs], consumeErrors=True)
        all_usable = time.perf_counter() - t0
    finally:
        for run in runs:
            if not run.ended.called:
                run.transport.write(b"exit\r")
        await defer.DeferredList([r.ended.addTimeout(60, reactor) for r in runs],
                                 consumeErrors=True)
    times = [value for ok, value in outcomes if ok]
    failed = [value.getErrorMessage() for ok, value in outcomes if not ok]
    return {"n": n, "ok": len(times), "all_usable_s": all_usable,
            "times": summary(times) if times else None, "failed": failed}


# -- the measurement ----------------------------------------------------------------------


class Density:
    """
    @param n: the idle sessions to create.
    @param cpu_seconds: how long capsule's idle CPU is measured each time.
    """

    def __init__(self, server: CapsuleServer, floor: Floor, image: str, run_id: str, n: int,
                 cpu_seconds: float, results: dict, extra: list[str] = ()) -> None:
        self.server = server
        self.floor = floor
        self.floor_container: str | None = None
        self.image = image
        self.run_id = run_id
        self.n = n
        self.cpu_window = cpu_seconds
        # What was added to capsule's defaults besides capsule_options.
        self.results = results.setdefault("density", {"n": n, "cpu": {}, "extra": list(extra)})
        self.ids: list[str] = []

    # -- capsule through its API --

    def _thd_create(self) -> tuple[int, dict]:
        answer = request(self.server.url + "/api/sessions", "POST",
                         {"Content-Type": "application/json"}, b"{}", timeout=120)
        return answer.status, json.loads(answer.body or b"{}")

    def _thd_delete(self, session_id: str) -> int:
        return request(f"{self.server.url}/api/sessions/{session_id}", "DELETE",
                       timeout=60).status

    async def pool_full(self, base: bool = False, timeout: float = 120) -> None:
        """
        Wait until the warm pool holds what it wants (with C{base}: until
        it is back at its size, the demand of the last takes forgotten).
        """
        def full():
            _, body = self.server.health()
            pool = body.get("pool", {})
            wanted = pool.get("target", pool.get("size"))
            return pool.get("ready") == wanted and (not base or wanted == pool.get("size"))
        await poll(lambda: deferToThread(full), timeout, "the warm pool to be full")

    # -- the figures at one count --

    async def idle_cpu(self, at: int) -> float:
        """
        capsule's CPU, as a share of one core, over the window, once the
        warm pool is back at its size (the takes of the last step make it
        grow, then shrink: work, not idleness).
        """
        pid = self.server.pid
        await self.pool_full(base=True)
        await sleep(2)  # what the last step left to do
        c0, t0 = cpu_seconds(pid), time.monotonic()
        await sleep(self.cpu_window)
        share = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        self.results["cpu"][str(at)] = share
        say(f"capsule's idle CPU at {at} sessions: {share:.2%} of one core over"
            f" {self.cpu_window:g} s")
        return share

    async def snapshot(self, key: str) -> None:
        """
        Memory, a warm connect and keystroke echo, at the sessions there
        are now.
        """
        pid = self.server.pid
        await sleep(2)
        self.results[f"mem_available_{key}"] = mem_available_mb()
        self.results[f"rss_{key}"] = rss_mb(pid)
        self.results[f"engine_{key}"] = await deferToThread(engine_mb)
        if key == "n":
            ids = [c["Id"] for c in await deferToThread(self.server.containers)]
            self.results["containers"] = await deferToThread(container_memory, ids)
        connects = []
        for _ in range(CONNECTS):
            await self.pool_full()
            await sleep(0.2)
            term, elapsed = await open_session(self.server.ws_url, binary=True)
            connects.append(elapsed)
            await term.exit()
        self.results[f"connect_{key}"] = summary(connects)
        await self.pool_full()
        echo = summary(await deferToThread(
            lean_keystrokes, lambda: lean_session(self.server.ws_url, True), KEYSTROKES))
        self.results[f"echo_{key}"] = echo
        # The raw exec's echo at the same moment: how much the machine's
        # load, not the sessions, moved it.
        floor = summary(await deferToThread(
            lean_keystrokes, lambda: self.floor.lean(self.floor_container), KEYSTROKES))
        self.results[f"floor_echo_{key}"] = floor
        say(f"at {key}: MemAvailable {self.results[f'mem_available_{key}']:.0f} MB, capsule RSS"
            f" {self.results[f'rss_{key}']:.1f} MB, warm connect median"
            f" {summary(connects)['median']:.0f} ms, echo p50 {echo['p50']:.2f} ms,"
            f" p99 {echo['p99']:.2f} ms (raw exec p50 {floor['p50']:.2f}, p99 {floor['p99']:.2f})")

    # -- the steps --

    async def create(self) -> None:
        """
        N sessions through the API, BATCH at once, until N or a refusal.
        """
        pid = self.server.pid
        stops = sorted(c for c in CPU_AT if c < self.n)
        refused = None
        busy = cpu = 0.0
        while len(self.ids) < self.n and refused is None:
            batch = min(BATCH, self.n - len(self.ids))
            b0, c0 = time.perf_counter(), cpu_seconds(pid)
            outcomes = await defer.DeferredList(
                [deferToThread(self._thd_create) for _ in range(batch)], consumeErrors=True)
            busy += time.perf_counter() - b0
            cpu += cpu_seconds(pid) - c0
            for ok, value in outcomes:
                if not ok:
                    refused = refused or value.getErrorMessage()
                    continue
                status, body = value
                if status == 201:
                    self.ids.append(body["id"])
                else:
                    refused = refused or f"{status} {body.get('error')}: {body.get('message')}"
            if stops and len(self.ids) >= stops[0]:
                stops.pop(0)
                say(f"{len(self.ids)} sessions made")
                await self.idle_cpu(len(self.ids))
        made = len(self.ids)
        self.results.update(admitted=made, refused=refused, create_s=busy,
                            per_session_ms=ms(busy / max(1, made)),
                            create_cpu_per_session_ms=ms(cpu / max(1, made)))
        say(f"{made} sessions made through the API in {busy:.1f} s"
            f" ({ms(busy / max(1, made)):.0f} ms each)"
            + (f"; then refused: {refused}" if refused else ""))

    async def burst(self) -> None:
        """
        The floor, then capsule: BURST shells at once, each until it answers.
        The pool is at its size (what a burst finds after a quiet while).
        """
        await self.pool_full(base=True)
        await sleep(1)
        floor = await docker_run_burst(self.image, self.run_id, BURST)
        self.results["burst_floor"] = floor
        say(f"floor: {floor['ok']}/{BURST} `docker run -it` usable after"
            f" {floor['all_usable_s']:.2f} s")
        await self.pool_full(base=True)
        await sleep(1)
        terms = []
        t0 = time.perf_counter()
        outcomes = await defer.DeferredList(
            [defer.ensureDeferred(open_session(self.server.ws_url, True, timeout=180))
             for _ in range(BURST)], consumeErrors=True)
        all_usable = time.perf_counter() - t0
        times, failed = [], []
        for ok, value in outcomes:
            if ok:
                terms.append(value[0])
                times.append(value[1])
            else:
                failed.append(value.getErrorMessage())
        self.results["burst"] = {"n": BURST, "ok": len(terms), "all_usable_s": all_usable,
                                 "times": summary(times) if times else None, "failed": failed}
        say(f"capsule: {len(terms)}/{BURST} sessions usable after {all_usable:.2f} s"
            + (f"; first failure: {failed[0]}" if failed else ""))
        _, body = await deferToThread(self.server.health)
        self.results["pool_after_burst"] = body.get("pool")
        await defer.DeferredList([defer.ensureDeferred(t.exit(timeout=60)) for t in terms],
                                 consumeErrors=True)
        # What Docker's own start costs on capsule's network (a user-defined
        # bridge, with its DNS) rather than on the default bridge.
        await self.pool_full()
        await sleep(1)
        floor = await docker_run_burst(self.image, self.run_id, BURST, network=CAPSULE_NETWORK)
        self.results["burst_floor_network"] = floor
        say(f"floor on capsule's network: {floor['ok']}/{BURST} `docker run -it` usable after"
            f" {floor['all_usable_s']:.2f} s")

    async def delete(self) -> None:
        t0 = time.perf_counter()
        failed = 0
        for start in range(0, len(self.ids), BATCH * 2):
            outcomes = await defer.DeferredList(
                [deferToThread(self._thd_delete, i) for i in self.ids[start:start + BATCH * 2]],
                consumeErrors=True)
            failed += sum(1 for ok, status in outcomes if not ok or status != 200)
        deleted = time.perf_counter() - t0

        def gone():
            _, body = self.server.health()
            return body.get("sessions") == 0
        await poll(lambda: deferToThread(gone), 300, "every session to end")
        await self.pool_full(base=True, timeout=300)
        pool = self.server.pool_size
        await poll(lambda: deferToThread(lambda: len(self.server.containers()) <= pool), 300,
                   "the sessions' containers to be removed")
        removed = time.perf_counter() - t0
        self.results.update(delete_s=deleted, removed_s=removed, delete_failed=failed)
        say(f"{len(self.ids)} sessions deleted in {deleted:.1f} s, their containers gone after"
            f" {removed:.1f} s" + (f"; {failed} deletion(s) failed" if failed else ""))
        self.ids = []

    async def run(self) -> None:
        self.floor_container = await self.floor.make_container()
        try:
            await self.pool_full()
            await self.idle_cpu(0)
            await self.snapshot("0")
            try:
                await self.create()
                if str(len(self.ids)) not in self.results["cpu"]:
                    await self.idle_cpu(len(self.ids))
                await self.snapshot("n")
                await self.burst()
            finally:
                await self.delete()
        finally:
            await self.floor.remove(self.floor_container)


# -- the figures against the targets ------------------------------------------------------


def density_table(d: dict) -> str:
    """
    The density figures against issue 21's targets, as Markdown.
    """
    rows = []

    def verdict(ok):
        return "—" if ok is None else ("ok" if ok else "**missed**")

    n, admitted = d.get("n"), d.get("admitted")
    if admitted is not None:
        rows.append(["sessions admitted (asked for N)",
                     f"{admitted} of {n}" + (f"; refused: {d['refused']}" if d.get("refused")
                                             else ""),
                     f"≥ {TARGET_ADMITTED}", verdict(admitted >= TARGET_ADMITTED)])
        rows.append(["time per session (API, {BATCH} at once)".replace("{BATCH}", str(BATCH)),
                     f"{d['per_session_ms']:.0f} ms (capsule CPU"
                     f" {d['create_cpu_per_session_ms']:.1f} ms each)", "—", "—"])
    if admitted and "mem_available_n" in d:
        per = (d["mem_available_0"] - d["mem_available_n"]) / admitted
        # On a shared machine, others' work moves MemAvailable too: the
        # counted figure below is the one judged, when it could be read.
        judged = not d.get("containers")
        rows.append(["host memory per idle session (fall of MemAvailable)",
                     f"{per:.1f} MB ({d['mem_available_0']:.0f} -> {d['mem_available_n']:.0f} MB)",
                     f"≤ {TARGET_HOST_MB:g} MB" if judged else "—",
                     verdict(per <= TARGET_HOST_MB) if judged else "—"])
        counted = d.get("containers")
        engine = (None if d.get("engine_n") is None or d.get("engine_0") is None
                  else (d["engine_n"] - d["engine_0"]) / admitted)
        if counted:
            total = counted["cgroup_mb"] + counted["shim_mb"] + (engine or 0)
            rows.append(["host memory per idle session, counted",
                         f"{total:.1f} MB: container (cgroup) {counted['cgroup_mb']:.1f},"
                         f" containerd-shim (PSS) {counted['shim_mb']:.1f}"
                         + (f", dockerd + containerd growth {engine:.2f}" if engine is not None
                            else "") + f" (over {counted['containers']} containers)",
                         f"≤ {TARGET_HOST_MB:g} MB", verdict(total <= TARGET_HOST_MB)])
        rss = (d["rss_n"] - d["rss_0"]) / admitted
        rows.append(["capsule RSS per idle session",
                     f"{rss * 1024:.0f} kB ({d['rss_0']:.1f} -> {d['rss_n']:.1f} MB)", "—", "—"])
    e0, en = d.get("echo_0"), d.get("echo_n")
    if e0 and en:
        ratio = en["p99"] / e0["p99"]
        f0, fn = d.get("floor_echo_0"), d.get("floor_echo_n")
        floor = (f"; raw exec at the same moments {f0['p50']:.2f} / {f0['p99']:.2f} ->"
                 f" {fn['p50']:.2f} / {fn['p99']:.2f} ms (p99 {fn['p99'] / f0['p99']:.2f}x)"
                 if f0 and fn else "")
        rows.append([f"keystroke echo at N vs at 0 (p50 / p99, {e0['n']} keys)",
                     f"{e0['p50']:.2f} / {e0['p99']:.2f} -> {en['p50']:.2f} / {en['p99']:.2f} ms"
                     f" (p99 {ratio:.2f}x){floor}", f"p99 ≤ {TARGET_ECHO_P99:g}x",
                     verdict(ratio <= TARGET_ECHO_P99)])
    c0, cn = d.get("connect_0"), d.get("connect_n")
    if c0 and cn:
        ratio = cn["median"] / c0["median"]
        rows.append(["new warm connect at N vs at 0 (median)",
                     f"{c0['median']:.0f} -> {cn['median']:.0f} ms ({ratio:.2f}x)",
                     f"≤ {TARGET_CONNECT:g}x", verdict(ratio <= TARGET_CONNECT)])
    cpu = d.get("cpu", {})
    if cpu:
        at_n = cpu.get(str(admitted)) if admitted is not None else None
        rows.append(["capsule idle CPU (share of one core)",
                     ", ".join(f"{share:.2%} at {at}" for at, share in
                               sorted(cpu.items(), key=lambda item: int(item[0]))),
                     f"< {TARGET_CPU:.0%} at N", verdict(None if at_n is None
                                                           else at_n < TARGET_CPU)])
    burst, floor = d.get("burst"), d.get("burst_floor")
    if burst and floor:
        ok = burst["ok"] == burst["n"] and floor["ok"] == floor["n"]
        ratio = burst["all_usable_s"] / floor["all_usable_s"]
        rows.append([f"burst: {burst['n']} opened at once, all usable",
                     f"{burst['ok']}/{burst['n']} after {burst['all_usable_s']:.2f} s;"
                     f" floor ({floor['n']} parallel `docker run -it`) {floor['ok']}/{floor['n']}"
                     f" after {floor['all_usable_s']:.2f} s ({ratio:.2f}x)",
                     "≤ 1x the floor", verdict(ok and ratio <= 1.0)])
    network = d.get("burst_floor_network")
    if burst and network:
        rows.append([f"burst floor on capsule's network ({network['n']} parallel"
                     " `docker run -it --network capsule`)",
                     f"{network['ok']}/{network['n']} after {network['all_usable_s']:.2f} s"
                     f" (capsule {burst['all_usable_s'] / network['all_usable_s']:.2f}x)",
                     "—", "—"])
    if "delete_s" in d:
        rows.append(["deleting every session (API)",
                     f"{d['delete_s']:.1f} s; containers gone after {d['removed_s']:.1f} s",
                     "—", "—"])
    head = ["figure", "measured", "target", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
