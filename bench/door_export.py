"""
The memory a client can make capsule hold through the export door, with
the caps on (issue 19).

A real twistd and engine: one session holds C{--workspace} MiB of random
bytes (which do not compress); C{--exports} exports of it are asked for from
C{--clients} loopback addresses by clients that read nothing.  capsule reads
Docker's archive into each export's spool (memory, then a temporary file)
until the caps stop it.  capsule's resident memory and the spools' bytes on
disk are sampled meanwhile; prints one JSON line with the peaks and the
caps.  Runnable alone:

    .venv/bin/python bench/door_export.py --exports 8 --clients 4 --workspace 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capsule.tuning import Tuning  # noqa: E402
from capsule.web.streams import SPOOL_MEMORY, SPOOL_MEMORY_BUDGET  # noqa: E402
from tests.support.httpclient import request  # noqa: E402
from tests.support.live import CapsuleServer, remove_instance_containers  # noqa: E402

MIB = 1024 * 1024


def spooled_on_disk(pid: int, directory: str) -> int:
    """
    Bytes in the (unlinked) temporary files capsule has open under C{directory}.
    """
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(directory + "/"):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            continue
    return total


def stalled_export(port: int, session_id: str, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /api/export/{session_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Connection: close\r\n\r\n".encode())
    return sock


def call(server, path: str, body: dict) -> dict:
    status, _, payload = request(server.url + path, "POST",
                                 {"Content-Type": "application/json"},
                                 json.dumps(body).encode(), timeout=300)
    answer = json.loads(payload)
    if status not in (200, 201):
        raise SystemExit(f"{path}: {status} {answer}")
    return answer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exports", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workspace", type=int, default=32, help="MiB of random bytes")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="how long the stalled exports are watched")
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("extra", nargs="*", help="capsule options")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="door-export-"))
    spool_dir = workdir / "tmp"
    spool_dir.mkdir()
    clients = max(1, args.clients)
    server = CapsuleServer(workdir, "--pool-size", "0",
                           "--exports-per-client", str(-(-args.exports // clients)),
                           *args.extra, image=args.image,
                           env={"TMPDIR": str(spool_dir)}).start()
    socks = []
    try:
        session_id = call(server, "/api/sessions", {})["id"]
        call(server, f"/api/sessions/{session_id}/exec",
             {"argv": ["sh", "-c", f"head -c {args.workspace}M /dev/urandom"
                                   " > /workspace/big"], "timeout": 300})
        time.sleep(1)
        before = server.rss_kib()
        peak_rss, peak_disk = before, 0
        for i in range(args.exports):
            socks.append(stalled_export(server.port, session_id, f"127.0.0.{2 + i % clients}"))
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            peak_rss = max(peak_rss, server.rss_kib())
            peak_disk = max(peak_disk, spooled_on_disk(server.pid, str(spool_dir)))
            time.sleep(0.2)
        tuning = Tuning()
        print(json.dumps({
            "door": "export", "exports": args.exports, "clients": clients,
            "workspace_mib": args.workspace,
            "rss_before_mib": round(before / 1024, 1),
            "rss_peak_mib": round(peak_rss / 1024, 1),
            "rss_growth_mib": round((peak_rss - before) / 1024, 1),
            "spooled_on_disk_peak_mib": round(peak_disk / MIB, 1),
            "caps": {
                "spool_memory_per_export_mib": SPOOL_MEMORY / MIB,
                "spool_memory_all_mib": SPOOL_MEMORY_BUDGET / MIB,
                "export_spool_bytes_mib": tuning.export_spool_bytes / MIB,
                "export_spool_budget_mib": tuning.export_spool_budget / MIB,
                "export_stall_s": tuning.export_stall,
                "export_threads": tuning.export_threads,
            },
            "stalled_cut": server.log().count("read nothing for"),
        }))
    finally:
        for sock in socks:
            sock.close()
        server.stop()
        remove_instance_containers(server.instance)


if __name__ == "__main__":
    main()
