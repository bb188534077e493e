"""
The Kubernetes engine next to Docker's, through a real capsule:
``twistd capsule`` on the local Docker engine, and ``twistd capsule --engine
kubernetes`` on the tests' stand-in API server
(``tests/support/kube_standin_main.py``, a process of its own, whose pods
are containers on the same Docker engine).  For each:

- connect -> usable shell, warm (``--pool-size 2``, the pool full before
  each session): a WebSocket opened, resized, ``connected``, then ``echo
  $((6*7))__RDY`` until ``42__RDY`` comes back, as ``bench.py`` measures it;
- the same, cold (``--pool-size 0``);
- keystroke echo round trip at bash's prompt (``x``, then a backspace, keys
  10 ms apart), binary protocol, on a blocking client (websocket-client), as
  ``bench.py``'s echo table.

With ``--engine kubernetes`` capsule reaches each session's keeper through
pods/exec (the API server's exec WebSocket, and the stand-in's ``docker
exec`` behind it), as its sessions have no address of their own (as with
``--network none``); on Docker it reaches them over TCP at the container's
address.  So Docker is measured twice: as it runs by default, and with its
keepers reached through relay execs (the tuning knob ``keeper-direct=false``),
the path the Kubernetes engine's compares with.  Each figure is measured in
turn on every engine, so that a change in the machine's load hits all alike.  What the stand-in adds is
its HTTP calls, watch and exec relay: a real cluster adds its scheduler,
kubelet and network instead (a cold start there is seconds, mostly the
kubelet's).

Prints a Markdown table, then one JSON line.  Runnable alone:

    .venv/bin/python bench/kube.py [--quick] [--sessions N] [--keystrokes N]

Whatever happens (failure, Ctrl-C, SIGTERM), it stops the capsules and
stand-ins it started and removes every container of its instances
(``bench-kube-<random>-*``).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.clients import BlockingTerminal  # noqa: E402
from tests.support.live import (CapsuleServer, remove_instance_containers,  # noqa: E402
                                remove_instance_volumes, wait_for)

from clients import SIZE, lean_session  # noqa: E402
from floors import CPUS, MEMORY, PIDS  # noqa: E402
from measures import KEY_GAP, READY_MARK, lean_keystrokes, percentile, say, summary  # noqa: E402

FULL = dict(sessions=10, keystrokes=500)
QUICK = dict(sessions=3, keystrokes=100)

# Seconds of calm before each connect, once the capsule settled.
QUIET = 0.2

# (key, the table's name, the stand-in's pod network or None for Docker,
# capsule's tuning knobs).  With --engine kubernetes capsule reaches every
# keeper through pods/exec (its sessions behave as --network none's, which
# have no address of their own); Docker's capsule reaches them over TCP at
# the container's address, and, with keeper-direct=false, through relay
# execs as the Kubernetes engine does.
ENGINES = (
    ("docker", "Docker", None, {}),
    ("docker_relay", "Docker, keeper through relay execs", None, {"keeper-direct": "false"}),
    ("kube", "Kubernetes (stand-in), keeper through pods/exec", "none", {}),
)


class Standin:
    """
    The stand-in API server in a process of its own
    (L{tests.support.kube_standin_main}).
    """

    def __init__(self, workdir: Path, label: str, network: str) -> None:
        self.kubeconfig = workdir / f"kubeconfig-{label}.yaml"
        self.log_path = workdir / f"standin-{label}.log"
        self.network = network
        self.process: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> "Standin":
        root = Path(__file__).resolve().parents[1]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.kube_standin_main", "--port", "0",
                 "--kubeconfig-out", str(self.kubeconfig), "--network", self.network],
                cwd=root, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        # Its first line is its URL, once it listens (an empty line: it exited).
        line = self.process.stdout.readline().decode().strip()
        if not line.startswith("http"):
            self.stop()
            raise RuntimeError(f"the stand-in did not start: {line!r}; its log:\n"
                               f"{self.log_path.read_text(errors='replace')[-2000:]}")
        self.url = line
        return self

    def stop(self, timeout: float = 60) -> None:
        """
        SIGTERM: it removes its pods' containers, then exits.
        """
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class Engine:
    """
    One engine's capsules (warm and cold) and figures.
    """

    def __init__(self, key: str, name: str, network: str | None, tuning: dict, work: Path,
                 run_id: str, image: str) -> None:
        self.key, self.name, self.network, self.tuning = key, name, network, tuning
        self.work, self.image = work, image
        self.instance = f"bench-kube-{run_id}-{key.replace('_', '-')}"
        self.standin: Standin | None = None
        self.servers: list[CapsuleServer] = []
        self.figures: dict = {}
        self.failed: str | None = None

    def options(self) -> list[str]:
        if self.network is None:
            return []
        if self.standin is None:
            self.standin = Standin(self.work, self.key, self.network).start()
            say(f"{self.name}: stand-in at {self.standin.url}")
        return ["--engine", "kubernetes", "--kubeconfig", str(self.standin.kubeconfig),
                "--kube-namespace", self.instance]

    def server(self, label: str, pool: int) -> CapsuleServer:
        server = CapsuleServer(
            self.work, "--memory", MEMORY, "--cpus", f"{CPUS:g}", "--pids", str(PIDS),
            "--max-sessions", "100", "--max-sessions-per-client", "100",
            "--session-rate", "1000/1", "--memory-budget", "off", "--pool-size", str(pool),
            # Its capsules run at once: no session door (unused here) for
            # one to take the port of another's.
            "--door-port", "0",
            *self.options(), image=self.image, instance=self.instance,
            label=f"{self.key}-{label}", own_session=True, tuning=self.tuning)
        self.servers.append(server)
        say(f"starting capsule ({self.name}, {label}): {' '.join(server.args[4:])}")
        server.start(timeout=60)
        wait_for(lambda: server.health()[0] == 200, 60, f"capsule ({self.key}) to answer /health")
        settle(server)
        return server

    def stop(self, server: CapsuleServer) -> None:
        try:
            server.stop()
        finally:
            left = server.remove_containers()
            if left:
                say(f"{left} container(s) of capsule ({self.key}) were left: removed")

    def cleanup(self) -> None:
        for server in self.servers:
            try:
                server.stop()
            except RuntimeError as e:
                say(str(e))
        if self.standin is not None:
            self.standin.stop()
        remove_instance_containers(self.instance)
        remove_instance_volumes(self.instance)

    def problems(self) -> list[str]:
        """
        Its capsules' log lines that speak of an error (warnings are the
        bench host's, as bench.py's notes say).
        """
        words = ("Traceback", "Unhandled", "#error", "#critical")
        return [line for server in self.servers for line in server.log().splitlines()
                if any(w in line for w in words)]


def settle(server: CapsuleServer) -> None:
    wait_for(server.settled, 90, f"capsule ({server.label}) to settle", interval=0.05)
    time.sleep(QUIET)


def connect(server: CapsuleServer) -> float:
    """
    A new session's WebSocket to its shell's answer, in ms; the session ended
    after.
    """
    t0 = time.perf_counter()
    term = BlockingTerminal(server.ws_url, binary=True, timeout=60)
    try:
        term.start(*SIZE, timeout=60)
        term.run("echo $((6*7))__RDY", READY_MARK.decode(), timeout=60)
        elapsed = (time.perf_counter() - t0) * 1000
    except BaseException:
        term.drop()
        raise
    term.exit()
    return elapsed


def stats(values: list[float]) -> dict:
    return {**summary(values), "p95": percentile(values, 95)}


def measured(engine: "Engine", what: str, function, *args):
    """
    C{function(*args)}; a failure marks C{engine} failed (its figures stop
    there) and returns None: the other engines go on.
    """
    try:
        return function(*args)
    except Exception as e:
        # A capsule that did not start says why in its log's last line
        # (the log itself is kept).
        lines = [line.strip() for line in (str(e) or type(e).__name__).splitlines()
                 if line.strip()]
        text = lines[0] if len(lines) < 2 else f"{lines[0]} … {lines[-1]}"
        engine.failed = f"{what}: {text}"
        say(f"{engine.key} FAILED: {engine.failed}")
        return None


def connects(engines: list[Engine], servers: dict, kind: str, count: int) -> None:
    """
    C{count} connects on each engine, in turn.
    """
    times = {e.key: [] for e in engines}
    for i in range(count):
        for engine in engines:
            server = servers.get(engine.key)
            if server is None or engine.failed:
                continue
            measured(engine, f"{kind} connect", settle, server)
            elapsed = None if engine.failed else measured(
                engine, f"{kind} connect", connect, server)
            if elapsed is not None:
                times[engine.key].append(elapsed)
        say(f"{kind} #{i + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in times.items()
                                             if v))
    for engine in engines:
        if times[engine.key] and not engine.failed:
            engine.figures[kind] = stats(times[engine.key])


def echoes(engines: list[Engine], servers: dict, count: int) -> None:
    """
    C{count} keystrokes on each engine, in two halves in turn (the second
    in the other order).
    """
    times = {e.key: [] for e in engines}
    half = max(2, count // 2)
    for order in (engines, engines[::-1]):
        for engine in order:
            server = servers.get(engine.key)
            if server is None or engine.failed:
                continue
            measured(engine, "echo", settle, server)
            found = None if engine.failed else measured(
                engine, "echo", lean_keystrokes,
                lambda: lean_session(server.ws_url, True), half)
            times[engine.key] += found or []
    for engine in engines:
        if engine.failed or not times[engine.key]:
            continue
        engine.figures["echo"] = stats(times[engine.key])
        f = engine.figures["echo"]
        say(f"{engine.key} echo: p50 {f['p50']:.2f} ms, p99 {f['p99']:.2f} ms over {f['n']}"
            f" keystrokes {KEY_GAP * 1000:g} ms apart")


def table(engines: list[Engine]) -> list[str]:
    """
    The Markdown table: a row per figure, a column per engine; each
    Kubernetes figure's median as a ratio of Docker's.
    """
    docker = engines[0].figures

    def cell(engine: Engine, kind: str, fields) -> str:
        f = engine.figures.get(kind)
        if not f:
            if not engine.failed:
                return "n/a"
            return "failed: " + " ".join(engine.failed.split())[:150].replace("|", "/")
        text = ", ".join(f"{name} {f[name]:.{2 if kind == 'echo' else 1}f}" for name in fields)
        if engine is not engines[0] and docker.get(kind):
            text += f" ({f['median'] / docker[kind]['median']:.2f}x)"
        return text + f"; n={f['n']}"

    rows = [("connect → usable shell, warm (pool 2), ms", "warm", ("median", "p95")),
            ("connect → usable shell, cold (pool 0), ms", "cold", ("median", "p95")),
            (f"keystroke echo, binary protocol ({KEY_GAP * 1000:g} ms apart), ms", "echo",
             ("median", "p95", "p99"))]
    lines = ["| figure | " + " | ".join(e.name for e in engines) + " |",
             "|---" * (len(engines) + 1) + "|"]
    for title, kind, fields in rows:
        lines.append(f"| {title} | " + " | ".join(cell(e, kind, fields) for e in engines) + " |")
    return lines


def start_all(engines: list[Engine], label: str, pool: int) -> dict:
    servers = {}
    for engine in engines:
        if not engine.failed:
            server = measured(engine, f"capsule ({label}) start", engine.server, label, pool)
            if server is not None:
                servers[engine.key] = server
    return servers


def stop_all(engines: list[Engine], servers: dict) -> None:
    for engine in engines:
        if engine.key in servers:
            measured(engine, "stop", engine.stop, servers[engine.key])


def run(args, engines: list[Engine]) -> None:
    warm = start_all(engines, "warm", 2)
    try:
        connects(engines, warm, "warm", args.sessions)
        echoes(engines, warm, args.keystrokes)
    finally:
        stop_all(engines, warm)
    cold = start_all(engines, "cold", 0)
    try:
        connects(engines, cold, "cold", args.sessions)
    finally:
        stop_all(engines, cold)


def terminate(signum, frame):
    raise KeyboardInterrupt  # the same clean-up as Ctrl-C's


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=os.environ.get("CAPSULE_IMAGE",
                                                          "capsule-runtime:latest"),
                        help="session image [default: %(default)s]")
    parser.add_argument("--quick", action="store_true",
                        help=f"a reduced run: {QUICK['sessions']} connects of each kind,"
                             f" {QUICK['keystrokes']} keystrokes")
    parser.add_argument("--sessions", type=int, help="connects measured per kind and engine")
    parser.add_argument("--keystrokes", type=int, help="keystrokes per engine")
    parser.add_argument("--engine", action="append", choices=[e[0] for e in ENGINES],
                        help="measure only these engines (repeatable; docker is always"
                             " measured, as the reference)")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        elif getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    signal.signal(signal.SIGTERM, terminate)
    work = Path(tempfile.mkdtemp(prefix="bench-kube-"))
    run_id = uuid.uuid4().hex[:8]
    chosen = set(args.engine or [e[0] for e in ENGINES]) | {"docker"}
    engines = [Engine(*engine, work, run_id, args.image)
               for engine in ENGINES if engine[0] in chosen]
    say(f"kube bench: {args.sessions} connects of each kind, {args.keystrokes} keystrokes;"
        f" logs in {work}")
    failed, exit_code = None, 0
    load_before = os.getloadavg()[0]
    try:
        run(args, engines)
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        exit_code = 130
    except Exception as e:
        failed = str(e) or type(e).__name__
        say(f"FAILED: {failed}")
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for engine in engines:
            engine.cleanup()
    if exit_code:
        say(f"logs kept in {work}")
        sys.exit(exit_code)
    problems = [line for e in engines for line in e.problems()]
    for line in problems[:10]:
        say(f"capsule log: {line[:300]}")
    failed = failed or "; ".join(f"{e.key}: {e.failed}" for e in engines if e.failed)
    if failed:
        say(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    lines = table(engines) + [
        "", f"{args.sessions} connects of each kind and {args.keystrokes} keystrokes per"
        f" engine; load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f}"
        f" after, on {os.cpu_count()} CPUs."]
    for line in lines:
        print(line)
    print(json.dumps({"kube": {
        "engines": {e.key: {"name": e.name, "failed": e.failed, **e.figures} for e in engines},
        "sessions": args.sessions, "keystrokes": args.keystrokes,
        "log_errors": len(problems)}}))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
