"""
What the bench measures on any terminal (capsule's or the floor's), and the
statistics it reports.

A terminal on the reactor has C{out} (an L{tests.support.clients.Output}) and
C{send_input}; one on a blocking socket has C{send_input}, C{recv}, C{drain}
and C{exit} (see C{clients}).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

from twisted.internet import reactor

from tests.support.live import sleep

from cpuwatch import CpuWatch, describe as describe_cpu

READY_INPUT = b"echo $((6*7))__RDY\r"
READY_MARK = b"42__RDY"
END_MARK = b"T2END"

# Seconds between a key's echo and the next key in the echo tests.
KEY_GAP = 0.01
# Type x, then a backspace: readline echoes x, then a \b.
KEYS = ((b"x", b"x"), (b"\x7f", b"\x08"))


class BenchError(Exception):
    pass


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- statistics --


def ms(seconds: float) -> float:
    return seconds * 1000.0


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values) -> dict:
    return {"n": len(values), "min": min(values), "median": statistics.median(values),
            "p90": percentile(values, 90), "p50": percentile(values, 50),
            "p99": percentile(values, 99), "max": max(values)}


# -- on the reactor --


async def ready(term) -> None:
    since = term.out.total
    term.send_input(READY_INPUT)
    await term.out.wait_for(READY_MARK, 30, since)
    # Let readline finish redrawing the prompt.
    await sleep(0.3)


async def keystrokes(term, label: str, count: int, gap: float = KEY_GAP) -> dict:
    """
    Type C{x} and a backspace in turn at an empty prompt; each one's time
    until readline's echo (C{x}, then a C{\\b}) comes back.  Keys are C{gap}
    seconds apart (after the echo): a fast typist's pace is still much
    slower, and capsule gathers output that follows a send within its
    coalescing delay (2 ms).
    """
    count += count % 2
    times = []
    deadline = time.monotonic() + 60 + count * (gap + 0.05)
    for i in range(count):
        if time.monotonic() > deadline:
            raise BenchError(f"{label}: keystrokes took too long ({i} done)")
        key, echo = KEYS[i % 2]
        since = term.out.total
        t0 = time.perf_counter()
        term.send_input(key)
        await term.out.wait_for(echo, 5, since)
        times.append(ms(time.perf_counter() - t0))
        if gap:
            await sleep(gap)
    result = summary(times)
    say(f"{label} echo: p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms,"
        f" max {result['max']:.2f} ms over {count} keystrokes {gap * 1000:g} ms apart")
    return result


async def throughput(term, label: str, n: int, capsule_pid: int | None = None) -> dict:
    """
    Time C{head -c n /dev/zero | base64} until its end marker, and account
    for where the machine's CPU went meanwhile.
    """
    command = f"head -c {n} /dev/zero | base64; echo T$((1+1))END\r".encode()
    since = term.out.total
    chunks0 = term.out.chunks
    names = {os.getpid(): "bench client"}
    if capsule_pid is not None:
        names[capsule_pid] = "capsule"
    watch = CpuWatch(reactor, names)
    watch.start()
    t0 = time.perf_counter()
    term.send_input(command)
    try:
        await term.out.wait_for(END_MARK, max(120, n / 1e6), since)
    finally:
        cpu = watch.stop()
    elapsed = time.perf_counter() - t0
    received = term.out.total - since
    chunks = term.out.chunks - chunks0
    result = {"bytes": received, "seconds": elapsed, "mbps": received / elapsed / 1e6,
              "chunk": received / max(1, chunks),
              "client_cpu": cpu["groups"].get("bench client", 0.0),
              "server_cpu": cpu["groups"].get("capsule", 0.0) if capsule_pid else None,
              "cpu": cpu}
    say(f"{label} throughput: {received / 1e6:.1f} MB in {elapsed:.2f} s ="
        f" {result['mbps']:.1f} MB/s in {chunks} pieces of {result['chunk'] / 1024:.0f} KiB"
        f" on average (bench client CPU {result['client_cpu']:.2f} s"
        + (f", capsule CPU {result['server_cpu']:.2f} s" if capsule_pid else "") + ")")
    say(f"  {label}: {describe_cpu(cpu, received / 1e6)}")
    await sleep(0.3)
    return result


# -- on a blocking socket, in a thread --


def lean_keystrokes(make_term, count: int, gap: float = KEY_GAP) -> list[float]:
    """
    Open a terminal, wait until the shell is ready, then time C{count}
    keystrokes as L{keystrokes} does.
    """
    term = make_term()
    try:
        seen = b""

        def until(marker: bytes) -> None:
            nonlocal seen
            deadline = time.monotonic() + 30
            while marker not in seen:
                if time.monotonic() > deadline:
                    raise BenchError(f"no {marker!r}; output ended with {seen[-300:]!r}")
                seen = seen[-4096:] + term.recv()
            seen = seen[seen.index(marker) + len(marker):]

        term.send_input(READY_INPUT)
        until(READY_MARK)
        time.sleep(0.3)  # the prompt after the marker, as readline redraws it
        term.drain()
        seen = b""
        times = []
        for i in range(count + count % 2):
            key, echo = KEYS[i % 2]
            t0 = time.perf_counter()
            term.send_input(key)
            until(echo)
            times.append(ms(time.perf_counter() - t0))
            if gap:
                time.sleep(gap)
        return times
    finally:
        try:
            term.exit()
        except Exception:  # the shell's end is not measured
            term.drop()
