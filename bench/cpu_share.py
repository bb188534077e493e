#!/usr/bin/env python3
"""
Fair CPU sharing: does an idle session's keystroke echo, and /health, stay
close to their quiet values while every other session burns CPU?

    .venv/bin/python bench/cpu_share.py                  # --cpu-shares 1024, then 256
    .venv/bin/python bench/cpu_share.py --shares 256 --burners 4 --keystrokes 200

For each --cpu-shares value it starts its own ``twistd -n capsule`` (sessions
limited to --cpus 2, the default), opens one idle session and measures its
keystroke echo (a lean blocking client, as bench.py's echo figure) and the
latency of ``GET /health``: first quiet, then while --burners other sessions
each run two ``yes > /dev/null`` (two CPUs' worth each, their --cpus limit).
1024 is Docker's default weight, the same as the server's and the engine's;
256 is capsule's default.  It prints one Markdown table on stdout (progress
on stderr), and removes every container of its servers whatever happens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import sys
from pathlib import Path

# The tests' helpers (tests/support) are the bench's clients too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.clients import BlockingTerminal
from tests.support.live import CapsuleServer, wait_for

from measures import lean_keystrokes, ms, percentile, say

BURN = b"yes > /dev/null & yes > /dev/null &\r"
SIZE = (80, 24)


def _session(url: str) -> BlockingTerminal:
    term = BlockingTerminal(url, binary=True)
    term.start(*SIZE)
    return term


def health_times(server: CapsuleServer, count: int) -> list[float]:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        status, _, _ = server.get("/health")
        times.append(ms(time.perf_counter() - t0))
        if status != 200:
            raise RuntimeError(f"/health answered {status}")
        time.sleep(0.02)
    return times


def figures(server: CapsuleServer, keystrokes: int, probes: int) -> dict:
    echo = lean_keystrokes(lambda: _session(server.ws_url), keystrokes)
    health = health_times(server, probes)
    return {"echo_p50": statistics.median(echo), "echo_p99": percentile(echo, 99),
            "health_p50": statistics.median(health), "health_p99": percentile(health, 99)}


def busy_cpu(seconds: float = 2.0) -> float:
    """
    How many of the host's CPUs were busy over C{seconds} (from /proc/stat).
    """
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return (1 - (idle1 - idle0) / max(1, total1 - total0)) * os.cpu_count()


def measure(shares: int, args, workdir: Path) -> dict:
    server = CapsuleServer(workdir, "--cpu-shares", str(shares), "--pool-size", "0",
                           "--session-rate", "100/60", image=args.image,
                           label=f"cpu-share-{shares}")
    burners: list[BlockingTerminal] = []
    try:
        server.start()
        say(f"--cpu-shares {shares}: quiet")
        quiet = figures(server, args.keystrokes, args.probes)
        for _ in range(args.burners):
            term = _session(server.ws_url)
            term.send_input(BURN)
            burners.append(term)
        wait_for(lambda: busy_cpu(1.0) > 0.9 * os.cpu_count(), 30,
                 "the burners to take every CPU", interval=0)
        say(f"--cpu-shares {shares}: {args.burners} sessions burning")
        busy = figures(server, args.keystrokes, args.probes)
        return {"quiet": quiet, "busy": busy}
    finally:
        for term in burners:
            term.drop()
        server.finish()


def report(results: dict, args) -> str:
    lines = [
        f"CPU sharing: one idle session while {args.burners} others each run two"
        " `yes > /dev/null` (--cpus 2)",
        "",
        "| --cpu-shares | figure | quiet p50 | busy p50 | ratio | quiet p99 | busy p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for shares, r in results.items():
        for name, key in (("keystroke echo", "echo"), ("/health", "health")):
            q50, b50 = r["quiet"][f"{key}_p50"], r["busy"][f"{key}_p50"]
            lines.append(
                f"| {shares} | {name} | {q50:.2f} ms | {b50:.2f} ms | {b50 / q50:.1f}x |"
                f" {r['quiet'][f'{key}_p99']:.2f} ms | {r['busy'][f'{key}_p99']:.2f} ms |")
    lines.append("")
    lines.append(f"{args.keystrokes} keystrokes 10 ms apart and {args.probes} /health"
                 " probes 20 ms apart per cell; target: busy within 2x of quiet.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", type=int, action="append",
                        help="a --cpu-shares value to measure; repeatable [1024, 256]")
    parser.add_argument("--burners", type=int, default=4)
    parser.add_argument("--keystrokes", type=int, default=200)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--image", default="capsule-runtime:latest")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="capsule-cpu-share-"))
    results = {}
    for shares in args.shares or [1024, 256]:
        results[shares] = measure(shares, args, workdir)
    print(report(results, args))
    say(f"logs in {workdir}")


if __name__ == "__main__":
    main()
