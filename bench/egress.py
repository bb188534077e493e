"""
The egress proxy's cost: the time to fetch a file (100 MB by default) from
a local server through the proxy, against a direct fetch.

A real twistd capsule with two profiles: C{open} (on a bridge network of
the bench's own, made for the run and removed after it: capsule's fence
rules, left on the shared C{capsule} bridge by a capsule with
C{--firewall auto}, would refuse the direct fetch) and C{fenced} (egress =
[the server's address], on capsule-fenced, no route out).  The server
listens on the bench network's gateway address (the host side of its
bridge), which the operator allows (--egress-allow-address, --egress-port).
Both sessions run curl (by C{docker exec}, into /dev/null): the open one
straight to the server, the fenced one through the proxy (its HTTP_PROXY),
as a plain request and through a CONNECT tunnel (curl --proxytunnel).  The
runs alternate; the medians are compared, and capsule's CPU seconds per
fetch through the proxy (from /proc, 10 ms ticks) are shown.  Prints one
JSON object.

    .venv/bin/python bench/egress.py [--megabytes 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.live import (CapsuleServer, docker_client, free_port,  # noqa: E402
                                remove_instance_containers, session_container)


def serve(address: str, size: int):
    chunk = b"x" * (1024 * 1024)

    class Big(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            left = size
            while left > 0:
                part = chunk[:min(left, len(chunk))]
                self.wfile.write(part)
                left -= len(part)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer((address, 0), Big)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def create(server: CapsuleServer, profile: str) -> str:
    request = urllib.request.Request(server.url + "/api/sessions", method="POST",
                                     data=json.dumps({"profile": profile}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        session_id = json.loads(answer.read())["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            return session_container(session_id)
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"no container for session {session_id}")


def fetch(container, url: str, *options: str) -> float:
    code, out = container.exec_run(
        ["curl", "-sS", *options, "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
         url])
    if code != 0:
        raise RuntimeError(f"curl failed ({code}): {out.decode(errors='replace')[-300:]}")
    seconds, size = out.decode().split()
    return float(seconds), int(size)


def cpu(pid: int) -> float:
    """
    The CPU seconds process C{pid} has used (user and system).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--door-port", type=int, default=0,
                        help="the session door's port (default: a free one; 3180 where"
                             " capsule's fence rules on capsule-fenced admit only that)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="capsule-bench-egress-"))
    door = args.door_port or free_port()
    size = args.megabytes * 1_000_000
    tag = uuid.uuid4().hex[:6]
    network = docker_client().networks.create(
        f"capsule-bench-{tag}", driver="bridge", labels={"io.capsule.test": "bench"},
        options={"com.docker.network.bridge.enable_icc": "false",
                 "com.docker.network.bridge.name": f"capbench{tag}"})
    network.reload()
    gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
    upstream = serve(gateway, size)
    port = upstream.server_address[1]
    profiles = tmp / "profiles.toml"
    profiles.write_text(f'[profiles.open]\nimage = "{args.image}"\n'
                        f'[profiles.fenced]\nimage = "{args.image}"\negress = ["{gateway}"]\n')
    server = CapsuleServer(tmp, "--network", network.name, "--pool-size", "0",
                           "--door-port", str(door), "--profiles",
                           str(profiles), "--egress-allow-address", f"{gateway}/32",
                           "--egress-port", str(port), "--memory", "512m", image=args.image)
    server.start()
    try:
        client = docker_client()
        open_container = client.containers.get(create(server, "open"))
        fenced_container = client.containers.get(create(server, "fenced"))
        url = f"http://{gateway}:{port}/file"
        direct, proxied, tunnelled = [], [], []
        # capsule's CPU seconds per fetch through the proxy, each way of it.
        proxied_cpu, tunnelled_cpu = [], []
        fetch(open_container, url)
        fetch(fenced_container, url)
        fetch(fenced_container, url, "--proxytunnel")
        for _ in range(args.repeats):
            seconds, got = fetch(open_container, url)
            assert got == size, got
            direct.append(seconds)
            before = cpu(server.pid)
            seconds, got = fetch(fenced_container, url)
            proxied_cpu.append(cpu(server.pid) - before)
            assert got == size, got
            proxied.append(seconds)
            before = cpu(server.pid)
            seconds, got = fetch(fenced_container, url, "--proxytunnel")
            tunnelled_cpu.append(cpu(server.pid) - before)
            assert got == size, got
            tunnelled.append(seconds)
        d, p = statistics.median(direct), statistics.median(proxied)
        t = statistics.median(tunnelled)
        print(json.dumps({
            "measure": "egress proxy fetch", "megabytes": args.megabytes,
            "repeats": args.repeats,
            "direct_seconds": round(d, 3), "proxied_seconds": round(p, 3),
            "direct_mb_per_s": round(size / d / 1e6, 1),
            "proxied_mb_per_s": round(size / p / 1e6, 1),
            "proxied_over_direct": round(d / p, 3),
            "tunnelled_seconds": round(t, 3), "tunnelled_mb_per_s": round(size / t / 1e6, 1),
            "tunnelled_over_direct": round(d / t, 3),
            "capsule_cpu_seconds_proxied": round(statistics.median(proxied_cpu), 3),
            "capsule_cpu_seconds_tunnelled": round(statistics.median(tunnelled_cpu), 3)}),
            flush=True)
    finally:
        server.stop()
        remove_instance_containers(server.instance)
        upstream.shutdown()
        network.remove()


if __name__ == "__main__":
    main()
