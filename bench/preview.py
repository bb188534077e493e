"""
A preview next to a direct connection (issue 23): a small HTTP server
(perl, tests/integration/data/preview_server.pl) on port 3000 in a
session, reached through capsule's preview (/preview/<id>/3000/, a token
in Authorization) and directly at the container's address from the host.

Measures, alternating the two paths so that the machine's load hits both
alike: download and upload throughput (medians of C{--repeats} transfers
of C{--mib} MiB), requests per second for a small answer (one connection
per request on both paths: the server closes, and a preview's answer says
Connection: close), the latency of one such request (p50, p99; the
difference is what the preview adds), and capsule's resident memory before
and at its peak during a 1 GiB download through the preview. Prints a
table, then one JSON line. Runnable alone:

    .venv/bin/python bench/preview.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.httpclient import request  # noqa: E402
from tests.support.live import (CapsuleServer, docker_client,  # noqa: E402
                                remove_instance_containers, session_container)

MIB = 1024 * 1024
TOKEN = "bench-token-" + "7" * 30
SERVER = (Path(__file__).resolve().parents[1] / "tests" / "integration" / "data"
          / "preview_server.pl").read_text()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api(base: str, path: str, body=None, method="POST"):
    status, _, data = request(base + path, method, {
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        json.dumps(body).encode() if body is not None else None, timeout=120)
    return status, json.loads(data) if data else None


def exchange(host: str, port: int, head: bytes, body_bytes: int = 0) -> tuple[int, int]:
    """
    Send C{head} (and C{body_bytes} of body), read the whole answer until
    the server closes: (status, bytes of answer).
    """
    with socket.create_connection((host, port), timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(head)
        block = b"u" * MIB
        left = body_bytes
        while left > 0:
            n = min(left, MIB)
            s.sendall(block[:n])
            left -= n
        got, first = 0, b""
        buffer = bytearray(1 << 20)
        while True:
            n = s.recv_into(buffer)
            if not n:
                break
            if len(first) < 12:
                first += bytes(buffer[:12])
            got += n
    return int(first[9:12] or b"0"), got


class Paths:
    def __init__(self, capsule_port: int, address: str, session_id: str) -> None:
        self.capsule = ("127.0.0.1", capsule_port)
        self.direct = (address, 3000)
        self.prefix = f"/preview/{session_id}/3000"

    def head(self, which: str, method: str, path: str, length: int | None = None) -> bytes:
        if which == "preview":
            target, extra = self.prefix + path, f"Authorization: Bearer {TOKEN}\r\n"
        else:
            target, extra = path, ""
        if length is not None:
            extra += f"Content-Length: {length}\r\n"
        host = "%s:%d" % self.where(which)
        return (f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").encode()

    def where(self, which: str):
        return self.capsule if which == "preview" else self.direct


def throughput(paths: Paths, which: str, size: int, upload: bool) -> float:
    start = time.perf_counter()
    if upload:
        status, _ = exchange(*paths.where(which), paths.head(which, "POST", "/upload", size),
                             size)
    else:
        status, got = exchange(*paths.where(which), paths.head(which, "GET", f"/big?n={size}"))
        assert got > size, (which, got)
    assert status == 200, status
    return size / MIB / (time.perf_counter() - start)


def small(paths: Paths, which: str, seconds: float) -> tuple[float, list[float]]:
    """
    Requests per second for /hello, one after the other, and each one's latency.
    """
    latencies = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        status, _ = exchange(*paths.where(which), paths.head(which, "GET", "/hello"))
        assert status == 200
        latencies.append(time.perf_counter() - start)
    return len(latencies) / sum(latencies), latencies


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--image", default=os.environ.get("CAPSULE_TEST_IMAGE",
                                                          "capsule-runtime:latest"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mib", type=int, default=None, help="MiB per transfer")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    mib = args.mib or (100 if args.quick else 500)
    repeats = args.repeats or (2 if args.quick else 3)
    seconds = 2.0 if args.quick else 5.0
    big = (256 if args.quick else 1024) * MIB

    work = Path(tempfile.mkdtemp(prefix="capsule-bench-preview-"))
    (work / "tokens").write_text(f"bench:{TOKEN}\n")
    server = CapsuleServer(work, "--tokens", str(work / "tokens"), "--pool-size", "0",
                           "--grace", "600", image=args.image, label="preview")
    server.start()
    try:
        status, made = api(server.url, "/api/sessions", {})
        assert status == 201, made
        session_id = made["id"]
        script = ("cat > /tmp/s.pl && (setsid perl /tmp/s.pl 3000 >/dev/null 2>&1 </dev/null"
                  " &) && sleep 0.5")
        status, out = api(server.url, f"/api/sessions/{session_id}/exec",
                          {"argv": ["sh", "-c", script], "stdin": SERVER})
        assert status == 200 and out["exit_code"] == 0, out
        info = docker_client().api.inspect_container(session_container(session_id))
        address = next(n["IPAddress"] for n in info["NetworkSettings"]["Networks"].values()
                       if n.get("IPAddress"))
        paths = Paths(server.port, address, session_id)
        for _ in range(50):
            try:
                exchange(*paths.where("direct"), paths.head("direct", "GET", "/hello"))
                break
            except OSError:
                time.sleep(0.1)
        results: dict = {"mib": mib, "repeats": repeats}
        for kind, upload in (("download", False), ("upload", True)):
            runs: dict[str, list[float]] = {"direct": [], "preview": []}
            for _ in range(repeats):
                for which in ("direct", "preview"):
                    runs[which].append(throughput(paths, which, mib * MIB, upload))
            results[kind] = {w: round(statistics.median(v), 1) for w, v in runs.items()}
            results[kind]["ratio"] = round(results[kind]["preview"] / results[kind]["direct"], 3)
        rates, latencies = {}, {}
        for which in ("direct", "preview", "direct", "preview"):
            rate, lat = small(paths, which, seconds / 2)
            rates.setdefault(which, []).append(rate)
            latencies.setdefault(which, []).extend(lat)
        results["small"] = {
            w: {"requests_per_s": round(statistics.mean(rates[w]), 1),
                "p50_ms": round(percentile(latencies[w], 0.5) * 1000, 2),
                "p99_ms": round(percentile(latencies[w], 0.99) * 1000, 2)}
            for w in ("direct", "preview")}
        results["small"]["added_p50_ms"] = round(
            results["small"]["preview"]["p50_ms"] - results["small"]["direct"]["p50_ms"], 2)
        results["small"]["added_p99_ms"] = round(
            results["small"]["preview"]["p99_ms"] - results["small"]["direct"]["p99_ms"], 2)
        # capsule's memory while 1 GiB passes through a preview.
        before = rss_kib(server.pid)
        peak = [before]
        stop = threading.Event()

        def sample():
            while not stop.wait(0.05):
                peak[0] = max(peak[0], rss_kib(server.pid))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cpu = cpu_seconds(server.pid)
        start = time.perf_counter()
        rate = throughput(paths, "preview", big, upload=False)
        wall = time.perf_counter() - start
        cpu = cpu_seconds(server.pid) - cpu
        stop.set()
        sampler.join()
        results["memory"] = {"bytes": big, "rss_before_mib": round(before / 1024, 1),
                             "rss_peak_mib": round(peak[0] / 1024, 1),
                             "mib_per_s": round(rate, 1), "capsule_cpu_s": round(cpu, 2),
                             "wall_s": round(wall, 2)}
    finally:
        server.stop()
        remove_instance_containers(server.instance)

    d, u, s, m = results["download"], results["upload"], results["small"], results["memory"]
    print("| preview figure | direct | through the preview | ratio |")
    print("|---|---|---|---|")
    print(f"| download, MiB/s ({mib} MiB, median of {repeats}) | {d['direct']} |"
          f" {d['preview']} | {d['ratio']:.0%} |")
    print(f"| upload, MiB/s ({mib} MiB, median of {repeats}) | {u['direct']} |"
          f" {u['preview']} | {u['ratio']:.0%} |")
    print(f"| small answers, requests/s (one at a time) | {s['direct']['requests_per_s']} |"
          f" {s['preview']['requests_per_s']} |"
          f" {s['preview']['requests_per_s'] / s['direct']['requests_per_s']:.0%} |")
    print(f"| latency p50 / p99, ms | {s['direct']['p50_ms']} / {s['direct']['p99_ms']} |"
          f" {s['preview']['p50_ms']} / {s['preview']['p99_ms']} | +{s['added_p50_ms']} /"
          f" +{s['added_p99_ms']} ms |")
    print(f"| capsule's RSS, {big // MIB} MiB through the preview | before"
          f" {m['rss_before_mib']} MiB | peak {m['rss_peak_mib']} MiB |"
          f" +{m['rss_peak_mib'] - m['rss_before_mib']:.1f} MiB |")
    print(f"| capsule's CPU for those {big // MIB} MiB | | {m['capsule_cpu_s']} s in"
          f" {m['wall_s']} s | |")
    print(json.dumps({"preview": results}))


if __name__ == "__main__":
    main()
