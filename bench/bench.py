#!/usr/bin/env python3
"""
capsule's benchmark: what a visitor feels, next to the physical floor.

    make bench                     # the full run (a few minutes)
    make bench ARGS=--quick        # a reduced run, for smoke-testing
    .venv/bin/python bench/bench.py --help

It starts ``twistd -n capsule`` itself (on a free loopback port, with an
instance name ``bench-<random>`` of its own), speaks real WebSocket to it, and
measures, in one run:

1. connect -> usable shell (open a WebSocket, resize, ``connected``, then
   ``echo $((6*7))__RDY`` until ``42__RDY`` comes back): cold (``--pool-size
   0``) and warm (``--pool-size 2``, the pool full before each session);
2. keystroke echo round trip at bash's prompt (``x``, then a backspace, keys
   10 ms apart), binary and JSON protocols, timed with a blocking client on
   each side (websocket-client for capsule; the Twisted clients' figures go
   in the notes);
3. output throughput of ``head -c N /dev/zero | base64`` until a final marker,
   binary and JSON (medians of several runs: the PTY's rate wanders), with
   where the machine's CPU went meanwhile (``bench/cpuwatch.py``), and binary
   through a second capsule whose keepers are reached through relay execs
   (``keeper-direct = false``) rather than over TCP;
4. many concurrent sessions: time until all are usable, and capsule's RSS
   before, during and after;
5. a flood to a slow reader (binary with slow acks, JSON with TCP
   backpressure only): capsule's RSS, then how fast capsule notices the
   client left and removes the container once the grace period is over;
6. keystroke echo while other sessions keep taking from the warm pool (so
   that it refills all the while), against the same client's echo at a
   quiet capsule;
7. the page in headless Chromium (``browser.py``, Playwright): navigation
   to the first prompt drawn, with a warm pool and without one, for a first
   visit (empty cache) and a returning one (a new tab, cache warm);
8. memory pressure (``pressure.py``): sessions that each really hold 300 MB,
   opened until admission refuses (the reserve set so that it refuses after
   about 4 GiB of real use), then capsule, dockerd and every session
   checked, and the kernel's out-of-memory kills counted;
9. the floors, with docker-py and Twisted and no capsule: container
   create+start+exec, plain exec, the same many at once, and the raw exec
   stream's throughput and echo (read through capsule's own exec-start
   upgrade, ``capsule.engine.exec_process.ExecStreamProtocol``).
10. keeper channels (``channels.py``): a session's keeper stream carrying a
   TCP connection against TCP to a container's address, and the terminal's
   echo during a bulk channel.
11. the Anthropic credential gateway (``gateway.py``): the time to the first
   event of a streamed answer through it against the fake upstream alone,
   and a large streamed answer's throughput both ways.
12. a preview (``preview.py``): a port's throughput each way, small answers
   per second and their latency through capsule's preview, next to a direct
   connection to the container's port, and capsule's memory during 1 GiB.
13. the egress proxy (``egress.py``): 100 MB from a local server through a
   fenced session's proxy against a direct fetch.
14. kept sessions (``keep.py``): put away and resume to a command's answer
   for a shell session and one with 1 GB in /workspace, their forks, and the
   disk a kept session uses, next to a cold start.
15. the Kubernetes engine (``kube.py``): warm and cold connect and keystroke
   echo through ``--engine kubernetes`` on the tests' stand-in API server,
   next to Docker's.

Each capsule figure is measured in turn with its floor, so that a change in
the machine's load hits both alike.  ``--capsule-arg`` passes options to every
capsule started (``--capsule-arg=--pool-size=4``), ``--capsule-tuning`` tuning
knobs (``--capsule-tuning=coalesce-ms=0``, see docs/tuning.md).

It prints one Markdown table (each figure, its floor, the ratio, the target)
on stdout; progress goes to stderr.  Whatever happens (failure, Ctrl-C), it
stops the capsule servers it started and removes every container of its
instance and every floor container it made (labelled
``io.capsule.bench.run=<random>``).

The client runs in the same machine as capsule and dockerd: its own CPU time
competes with theirs, and the notes under the table say how much it used.

This file is the driver: what runs in which order, and the cleanup.  The
rest is in ``clients.py`` (the terminals), ``floors.py`` (the measurements
without capsule), ``measures.py`` (what is timed on any terminal),
``phases.py`` (each capsule figure next to its floor), ``browser.py`` (the
page in Chromium), ``report.py`` (the table and notes) and ``cpuwatch.py``; capsule is started through
``tests.support.live``, as the tests and the soak script start it.
"""


from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker.errors
from twisted.internet import task
from twisted.internet.threads import deferToThread

# The tests' helpers (tests/support) are the bench's clients too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.live import CapsuleServer, poll, remove_container

from density import Density, capsule_options
from floors import CPUS, LABEL_BENCH_RUN, MEMORY, PIDS, Floor
from measures import say
from phases import Phases, health, settle
from report import report

FULL = dict(sessions=10, keystrokes=500, throughput_bytes=100_000_000, repeats=5,
            concurrent=50, flood_seconds=20.0, browser_rounds=10)
QUICK = dict(sessions=3, keystrokes=100, throughput_bytes=20_000_000, repeats=2,
             concurrent=10, flood_seconds=5.0, browser_rounds=3)

# What --only may select: the measurements whose phase names start so.
ONLY = ("connect", "echo", "refill", "throughput", "concurrent", "flood", "browser", "doors",
        "pressure", "density", "channels", "gateway", "preview", "egress", "keep", "kube")

# The density run's sessions live without a client for its whole length.
DENSITY_GRACE = 3600.0

# The doors (issue 19's caps): each script starts capsules of its own and
# prints JSON; (label, script, full run's arguments, quick run's).
DOORS = (
    ("exec answer", "doors.py", ["--clients", "4"], ["--clients", "2", "--users", "no"]),
    ("export", "door_export.py", ["--exports", "8", "--clients", "4", "--workspace", "32"],
     ["--exports", "4", "--clients", "2", "--workspace", "16"]),
    ("websocket", "door_websocket.py", [], []),
)


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.p = dict(QUICK if args.quick else FULL)
        for key in self.p:
            value = getattr(args, key, None)
            if value is not None:
                self.p[key] = value
        self.run_id = uuid.uuid4().hex[:10]
        self.instance = f"bench-{self.run_id}"
        # The capsule whose keepers are reached through relay execs, beside
        # the warm one: an instance of its own (each finds the other's
        # containers none of its business).
        self.relay_instance = f"bench-{self.run_id}-relay"
        self.image = args.image
        self.host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self.floor = Floor(self.host, self.image, self.run_id)
        self.api = self.floor.api
        self.tmp = Path(tempfile.mkdtemp(prefix=f"capsule-{self.instance}-"))
        self.servers: list[CapsuleServer] = []
        self.results: dict = {}
        self.failures: dict[str, str] = {}
        self.notes: list[str] = []
        self.phases = Phases(self.p, self.floor, self.results)
        self.other_containers = 0
        self.finished = False
        self.load_before = self.load_after = None
        self.engine_version = "?"

    async def phase(self, name: str, coroutine_function, *args):
        """
        Run one measurement; a failure is recorded (and shown in the table),
        and the bench goes on with the next one.
        """
        if not self.selected(name):
            return None
        say(f"--- {name}")
        try:
            return await coroutine_function(*args)
        except Exception as e:
            message = str(e) or type(e).__name__
            self.failures[name] = message
            say(f"{name} FAILED: {message}")
            return None

    def selected(self, *names: str) -> bool:
        """
        Whether --only lets any of these phases run.
        """
        return not self.args.only or any(
            name.startswith(kind) for name in names for kind in self.args.only)

    async def run(self) -> None:
        others = await deferToThread(self.api.containers)
        self.other_containers = len(others)
        self.load_before = os.getloadavg()
        say(f"instance {self.instance}, image {self.image}, "
            f"{'quick' if self.args.quick else 'full'} run: {self.p}; logs in {self.tmp}")
        if others:
            say(f"{len(others)} other running container(s) on this engine compete for the CPU")
        # Each capsule figure is measured next to its floor, alternately,
        # so that a change in the machine's load hits both alike.
        if self.selected("connect"):
            await self.with_server("cold", ["--pool-size", "0"], self.cold_suite)
        if self.selected("connect", "echo", "refill", "throughput", "concurrent"):
            await self.with_server("warm", ["--pool-size", "2"], self.warm_suite)
        if self.selected("flood"):
            await self.with_server("flood", ["--pool-size", "0", "--grace", "1"],
                                   self.flood_suite, {"cleanup-interval": 0.2})
        # The page's tabs close without ending their sessions: a short
        # grace, so that each visit starts at an idle capsule.
        if self.selected("browser"):
            for label, pool in (("browser-warm", "2"), ("browser-cold", "0")):
                await self.with_server(label, ["--pool-size", pool, "--grace", "1"],
                                       lambda server, label=label: self.phase(
                                           f"browser ({label[8:]})", self.phases.page_visits,
                                           server, label.replace("-", "_")),
                                       {"cleanup-interval": 0.2})
        if self.selected("density"):
            # capsule's defaults: what one host holds as shipped.
            n = self.args.density_sessions
            await self.with_server("density", [], self.density_suite,
                                   base=capsule_options(n, DENSITY_GRACE))
        if self.selected("doors"):
            for label, script, full, quick in DOORS:
                await self.phase(f"doors ({label})", self.door, script,
                                 quick if self.args.quick else full)
        if self.selected("pressure"):
            await self.phase("pressure", self.pressure)
        if self.selected("channels"):
            await self.phase("channels", self.channels)
        if self.selected("gateway"):
            await self.phase("gateway", self.gateway)
        if self.selected("preview"):
            await self.phase("preview", self.preview)
        if self.selected("egress"):
            await self.phase("egress", self.egress)
        if self.selected("keep"):
            await self.phase("keep", self.keep)
        if self.selected("kube"):
            await self.phase("kube", self.kube)
        self.load_after = os.getloadavg()

    async def pressure(self) -> None:
        """
        Sessions that really hold memory until admission refuses
        (``pressure.py``, which starts a capsule of its own): its figures
        go into the report.
        """
        command = [sys.executable, str(Path(__file__).with_name("pressure.py")),
                   "--image", self.image, "--real-gib", "1" if self.args.quick else "4"]
        done = await deferToThread(subprocess.run, command, capture_output=True, text=True,
                                   timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"pressure.py exited {done.returncode}: {done.stderr[-500:]}")
        *lines, last = done.stdout.strip().splitlines()
        self.results["pressure"] = json.loads(last)
        for line in lines:
            say(line)

    async def script(self, name: str, arguments: list[str],
                     timeout: float = 1800) -> tuple[list[str], dict, str]:
        """
        Run C{bench/name} (which starts capsules of its own) in a process of
        its own: its printed lines, its last line's JSON, and its stderr.
        """
        command = [sys.executable, str(Path(__file__).with_name(name)),
                   "--image", self.image, *arguments]
        done = await deferToThread(subprocess.run, command, capture_output=True, text=True,
                                   timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr[-500:]}")
        *lines, last = done.stdout.strip().splitlines()
        return lines, json.loads(last), done.stderr.strip()

    async def egress(self) -> None:
        """
        A fetch through the egress proxy against a direct one (``egress.py``).
        """
        _, self.results["egress"], _ = await self.script(
            "egress.py", ["--megabytes", "20" if self.args.quick else "100",
                          "--repeats", str(self.p["repeats"])])
        say(json.dumps(self.results["egress"]))

    async def channels(self) -> None:
        """
        Keeper channels against TCP to a container's address (``channels.py``).
        """
        _, self.results["channels"], said = await self.script(
            "channels.py", ["--megabytes", "20" if self.args.quick else "50",
                            "--repeats", "2" if self.args.quick else "3"], timeout=900)
        say(said)

    async def gateway(self) -> None:
        """
        What the Anthropic credential gateway adds to a streamed answer
        (``gateway.py``).
        """
        lines, found, _ = await self.script(
            "gateway.py", ["--requests", "50" if self.args.quick else "200"])
        self.results["gateway"] = found["gateway"]
        for line in lines:
            say(line)

    async def preview(self) -> None:
        """
        A preview next to a direct connection to the container's port
        (``preview.py``): its table is printed and goes into the report.
        """
        lines, found, _ = await self.script(
            "preview.py", ["--quick"] if self.args.quick else [])
        self.results["preview"] = found["preview"]
        self.results["preview_table"] = lines
        for line in lines:
            say(line)

    async def keep(self) -> None:
        """
        Kept sessions (``keep.py``): put away, resume and fork times, and a
        kept session's disk, next to a cold start; its table is printed and
        goes into the report.
        """
        lines, found, _ = await self.script(
            "keep.py", ["--quick"] if self.args.quick else [])
        self.results["keep"] = found["keep"]
        self.results["keep_table"] = lines
        for line in lines:
            say(line)

    async def kube(self) -> None:
        """
        The Kubernetes engine on the stand-in next to Docker (``kube.py``):
        its table is printed and goes into the report.
        """
        command = [sys.executable, str(Path(__file__).with_name("kube.py")),
                   "--image", self.image, *(["--quick"] if self.args.quick else [])]
        done = await deferToThread(subprocess.run, command, capture_output=True, text=True,
                                   timeout=900)
        # An engine that failed is in its table (and its exit code): the
        # others' figures are kept.
        *lines, last = done.stdout.strip().splitlines() or [""]
        if last.startswith("{"):
            self.results["kube"] = json.loads(last)["kube"]
            self.results["kube_table"] = lines
            for line in lines:
                say(line)
        if done.returncode != 0:
            failed = [f"{key}: {engine['failed']}" for key, engine in
                      (self.results.get("kube") or {}).get("engines", {}).items()
                      if engine.get("failed")]
            raise RuntimeError(f"kube.py exited {done.returncode}: "
                               + ("; ".join(failed) or done.stderr[-500:]))

    async def door(self, script: str, arguments: list[str]) -> None:
        """
        What a client can make capsule hold through one door, with the caps
        on: the door's own script, whose JSON goes into the report.
        """
        command = [sys.executable, str(Path(__file__).with_name(script)),
                   "--image", self.image, *arguments]
        done = await deferToThread(subprocess.run, command, capture_output=True, text=True,
                                   timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{script} exited {done.returncode}: {done.stderr[-500:]}")
        decoder, text, found = json.JSONDecoder(), done.stdout, []
        index = text.find("{")
        while index != -1:
            value, end = decoder.raw_decode(text, index)
            found.append(value)
            index = text.find("{", end)
        self.results.setdefault("doors", []).extend(found)
        for value in found:
            say(json.dumps(value))

    async def with_server(self, label: str, extra, suite, tuning=None, base=None,
                          instance: str | None = None) -> None:
        """
        @param base: capsule's options before C{--capsule-arg} and C{extra}
            (default: the limits of L{floors} and admission opened for one
            client opening up to 50 sessions at once).
        """
        tuning = {**(tuning or {}), **dict(
            item.split("=", 1) for item in self.args.capsule_tuning)}
        if base is None:
            base = ["--memory", MEMORY, "--cpus", f"{CPUS:g}", "--pids", str(PIDS),
                    "--max-sessions", "100", "--max-sessions-per-client", "100",
                    "--session-rate", "1000/1", "--memory-budget", "off"]
        server = CapsuleServer(
            self.tmp, *base, *self.args.capsule_arg, *extra,
            image=self.image, instance=instance or self.instance, label=label, own_session=True,
            tuning=tuning)
        self.servers.append(server)
        try:
            say(f"starting capsule ({label}): {' '.join(server.args[4:])}"
                + (f" (tuning: {server.env['CAPSULE_TUNING']})" if tuning else ""))
            server.start(timeout=60)

            async def healthy():
                status, body = await health(server)
                return status == 200 and body.get("docker") and body.get("image")

            await poll(healthy, 60, f"capsule ({label}) to answer /health")
            await settle(server)
            await suite(server)
        except Exception as e:
            self.failures[f"capsule ({label})"] = str(e) or type(e).__name__
            say(f"capsule ({label}) FAILED: {e}")
        finally:
            try:
                await deferToThread(server.stop)
            except RuntimeError as e:
                self.notes.append(f"capsule ({label}) did not stop in time: killed")
                say(str(e))
            left = await deferToThread(server.remove_containers)
            problems = server.problems()
            if problems:
                self.notes.append(f"capsule ({label}) logged {len(problems)} warning/error line(s),"
                                  f" first: `{problems[0][:200]}`")
                say(f"capsule ({label}) log problems:\n  " + "\n  ".join(problems[:10]))
            if left:
                self.notes.append(f"{left} container(s) of capsule ({label}) were still"
                                  " there after it stopped (removed by the bench)")

    # -- the suites: which phase runs with which capsule, in which order --

    async def cold_suite(self, server: CapsuleServer) -> None:
        await self.phase("connect, cold", self.phases.connect_cold, server)

    async def warm_suite(self, server: CapsuleServer) -> None:
        phases = self.phases
        floor_container = await self.floor.make_container()
        try:
            await self.phase("connect, warm", phases.connect_warm, server, floor_container)
            await self.phase("echo", phases.echo, server, floor_container)
            await self.phase("refill: echo while the pool refills", phases.echo_refill, server)
            await self.phase("throughput: generator alone", phases.generator, floor_container)
            if self.selected("throughput"):
                # The same capsule with its keepers reached through relay
                # execs (dockerd, containerd-shim), beside the direct path.
                await self.with_server(
                    "relay", ["--pool-size", "1"],
                    lambda relay: self.phase("throughput", phases.throughput_rounds, server,
                                             floor_container, relay),
                    {"keeper-direct": "false"}, instance=self.relay_instance)
        finally:
            await self.floor.remove(floor_container)
        await self.phase("concurrent floor", phases.floor_concurrent, server)
        await self.phase("concurrent sessions", phases.capsule_concurrent, server)

    async def flood_suite(self, server: CapsuleServer) -> None:
        for binary in (True, False):
            name = "binary" if binary else "json"
            await self.phase(f"flood ({name})", self.phases.flood, server, binary)
        await self.phase("flood (input)", self.phases.input_flood, server)

    async def density_suite(self, server: CapsuleServer) -> None:
        density = Density(server, self.floor, self.image, self.run_id, self.args.density_sessions,
                          self.args.density_cpu_seconds, self.results,
                          extra=self.args.capsule_arg)
        await self.phase("density", density.run)

    def report(self) -> str:
        return report({
            "results": self.results, "failures": self.failures, "p": self.p,
            "quick": self.args.quick, "image": self.image, "instance": self.instance,
            "engine_version": self.engine_version, "load_before": self.load_before,
            "load_after": self.load_after, "other_containers": self.other_containers,
            "notes": self.notes,
        })


# -- entry point ---------------------------------------------------------------------


def cleanup(bench: Bench) -> None:
    """
    Synchronous, after the reactor stopped (also on Ctrl-C or failure):
    stop every capsule started, remove every container of this run.
    """
    for server in bench.servers:
        if server.process is not None and server.process.poll() is None:
            say(f"stopping capsule (pid {server.pid})")
            try:
                server.stop()
            except RuntimeError as e:
                say(str(e))
    removed = 0
    for label in (f"io.capsule.instance={bench.instance}",
                  f"io.capsule.instance={bench.relay_instance}", f"{LABEL_BENCH_RUN}={bench.run_id}"):
        try:
            found = bench.api.containers(all=True, filters={"label": label})
        except Exception as e:
            say(f"could not list containers with {label}: {e}")
            continue
        for c in found:
            try:
                remove_container(bench.api, c["Id"])
                removed += 1
            except Exception as e:
                say(f"could not remove container {c['Id'][:12]}: {e}")
    if bench.finished and not bench.failures:
        shutil.rmtree(bench.tmp, ignore_errors=True)
        say(f"cleanup: removed {removed} leftover container(s)")
    else:
        say(f"cleanup: removed {removed} leftover container(s); capsule logs kept in {bench.tmp}")


async def amain(reactor, bench: Bench):
    try:
        bench.engine_version = (await deferToThread(bench.api.version)).get("Version", "?")
        await deferToThread(bench.api.inspect_image, bench.image)
    except Exception as e:
        say(f"no Docker engine answers at {bench.host}, or the image {bench.image} is"
            f" missing (make image): {e}")
        bench.finished = True
        raise SystemExit(2)
    started = time.monotonic()
    try:
        await bench.run()
    except Exception as e:
        bench.failures["bench"] = str(e) or type(e).__name__
        say(f"the bench failed: {bench.failures['bench']}")
    say(f"done in {time.monotonic() - started:.0f} s")
    print(bench.report(), flush=True)
    bench.finished = True
    if bench.failures:
        say(f"{len(bench.failures)} measurement(s) failed: {', '.join(bench.failures)}")
        raise SystemExit(1)


def _knob(text: str) -> str:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"not NAME=VALUE: {text!r}")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Benchmark capsule against the physical floor (docker-py + Twisted)"
                    " and print one Markdown table.")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run for smoke-testing (fewer sessions, 20 MB, 10"
                             " concurrent sessions, 5 s floods)")
    parser.add_argument("--image", default=os.environ.get("CAPSULE_IMAGE", "capsule-runtime:latest"),
                        help="session image [default: %(default)s]")
    parser.add_argument("--capsule-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for every capsule started (repeatable),"
                             " e.g. --capsule-arg=--pool-size=4")
    parser.add_argument("--capsule-tuning", action="append", default=[], metavar="NAME=VALUE",
                        type=_knob,
                        help="a tuning knob for every capsule started (repeatable, see"
                             " docs/tuning.md), e.g. --capsule-tuning=coalesce-ms=0")
    parser.add_argument("--sessions", type=int, help="connects measured per kind (≥1)")
    parser.add_argument("--keystrokes", type=int, help="keystrokes per echo test")
    parser.add_argument("--throughput-bytes", type=int, help="bytes fed to base64")
    parser.add_argument("--repeats", type=int, help="interleaved throughput runs (medians compared)")
    parser.add_argument("--concurrent", type=int, help="concurrent sessions")
    parser.add_argument("--flood-seconds", type=float, help="seconds of flood")
    parser.add_argument("--browser-rounds", type=int,
                        help="first and returning visits in Chromium, per capsule (warm, cold)")
    parser.add_argument("--only", action="append", choices=ONLY, metavar="PHASE",
                        help="run only this kind of measurement (repeatable): "
                             + ", ".join(ONLY))
    parser.add_argument("--density-sessions", type=int, default=300, metavar="N",
                        help="idle sessions the density measurement creates [default:"
                             " %(default)s]")
    parser.add_argument("--density-cpu-seconds", type=float, default=60.0, metavar="S",
                        help="how long capsule's idle CPU is measured at each count"
                             " [default: %(default)s]")
    args = parser.parse_args(argv)
    for name in ("sessions", "keystrokes", "throughput_bytes", "repeats", "concurrent",
                 "browser_rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.density_sessions < 1:
        parser.error("--density-sessions must be at least 1")
    if not 0 < args.density_cpu_seconds <= 600:
        parser.error("--density-cpu-seconds must be in (0, 600]")
    if args.flood_seconds is not None and not 0 < args.flood_seconds <= 600:
        parser.error("--flood-seconds must be in (0, 600]")

    try:
        bench = Bench(args)
    except docker.errors.DockerException as e:
        say(f"no Docker engine answers: {e}")
        sys.exit(2)
    try:
        task.react(amain, (bench,))
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup(bench)
        if not bench.finished:
            say("interrupted")
            sys.exit(130)


if __name__ == "__main__":
    main()
