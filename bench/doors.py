"""
Doors: the memory a client can make capsule hold through a door, with the
caps on, next to the caps.  This file measures the upload door (bodies sent
and never finished: what capsule spools, against --spool-max-bytes) and the
exec answer's door, against capsules it starts itself, on loopback:

    .venv/bin/python bench/doors.py [--clients 4] [--image capsule-runtime:latest]

Each of C{--clients} clients asks, at once, for an exec that prints 16 MiB
of C{0xff} (not UTF-8) and 16 MiB of C{0x01} (which JSON escapes sixfold),
with C{max_output} 16 MiB, and then reads nothing.  It prints capsule's RSS
before, at its highest while the commands end and their answers wait, and
once capsule dropped the answers (after C{--write-timeout}, the tuning
knob C{answer-write-timeout}); the answers' statuses (a 429 is the
per-user cap); and the caps.  Run once without users and once with one
user (C{--tokens}).  It stops capsule and removes every container of its
instance however it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

# The tests' helpers (tests/support) are the bench's clients too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capsule.web.exec import (EXEC_MAX_OUTPUT, EXEC_OUTPUT_BUDGET, EXEC_OUTPUT_PER_USER,
                              answer_bound)
from tests.support.exec_flood import (MIB, flood_request, peak_rss_kib, read_status,
                                      stalled_exec)
from capsule.tuning import Tuning
from tests.support.httpclient import request
from tests.support.live import CapsuleServer, wait_for

TOKEN = "doors-token-" + "3" * 30


def exec_door(clients: int, write_timeout: float, image: str, users: bool) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="capsule-doors-"))
    extra = ["--grace", "300", "--pool-size", "1"]
    headers = {}
    if users:
        (workdir / "tokens").write_text(f"mallory:{TOKEN}\n")
        extra += ["--tokens", str(workdir / "tokens"), "--state-dir", str(workdir / "state")]
        headers = {"Authorization": f"Bearer {TOKEN}"}
    server = CapsuleServer(workdir, *extra, image=image,
                           instance=f"doors-{uuid.uuid4().hex[:8]}",
                           tuning={"answer-write-timeout": write_timeout})
    result = {"door": "exec answer", "users": users, "clients": clients,
              "attack": "16 MiB of 0xff on stdout + 16 MiB of 0x01 on stderr each,"
                        " max_output 16 MiB, clients not reading",
              "caps": {"answer_bound_mib": round(answer_bound(EXEC_MAX_OUTPUT) / MIB, 2),
                       "server_mib": EXEC_OUTPUT_BUDGET // MIB,
                       "per_user_mib": EXEC_OUTPUT_PER_USER // MIB if users else None,
                       "answer_write_timeout_s": write_timeout}}
    try:
        server.start()
        status, _, body = request(server.url + "/api/sessions", "POST",
                                  {**headers, "Content-Type": "application/json"}, b"{}",
                                  timeout=120)
        assert status == 201, body
        session_id = json.loads(body)["id"]
        wait_for(lambda: server.health()[1].get("pool", {}).get("ready", 0) >= 1, 60,
                 "the warm pool to fill", interval=0.2)
        time.sleep(1)
        before = server.rss_kib()
        started = time.monotonic()
        sockets = [stalled_exec(server.url, session_id, flood_request(), headers)
                   for _ in range(clients)]

        def answered() -> int:
            # Commands that ended, and execs refused.
            return len(re.findall(r"'sh' exited|exec refused with", server.log()))
        peak = peak_rss_kib(server.pid, lambda: answered() >= clients, 300)
        statuses = [read_status(sock)[0] for sock in sockets]
        accepted = statuses.count(200)
        wait_for(lambda: server.log().count("read none of it for") >= accepted,
                 write_timeout + 120, "capsule to drop the answers no one reads")
        time.sleep(1)
        after = server.rss_kib()
        for sock in sockets:
            sock.close()
        result.update({
            "statuses": statuses, "rss_mib": {
                "before": round(before / 1024), "peak": round(peak / 1024),
                "after_drop": round(after / 1024)},
            "held_at_most_mib": round((peak - before) / 1024),
            "seconds": round(time.monotonic() - started, 1)})
        return result
    finally:
        server.finish(workdir)


def spooled_bytes(pid: int) -> int:
    """
    Bytes of the files capsule holds open and has deleted: its request
    bodies' temporary files.
    """
    total = 0
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd).endswith(" (deleted)"):
                total += os.stat(fd).st_size
        except OSError:
            continue
    return total


def upload_door(clients: int, image: str, send_mib: int = 96, spool_mib: int = 256,
                upload_mib: int = 128) -> dict:
    """
    C{clients} uploads, each into a session of its own, each declaring C{upload_mib} MiB and
    sending C{send_mib} MiB of it, then stalling: capsule holds their bodies
    (in temporary files) until the spool budget says no to the next.
    """
    workdir = Path(tempfile.mkdtemp(prefix="capsule-doors-"))
    server = CapsuleServer(workdir, "--grace", "300", "--pool-size", "0",
                           "--upload-max-bytes", f"{upload_mib}m",
                           "--spool-max-bytes", f"{spool_mib}m", image=image,
                           instance=f"doors-{uuid.uuid4().hex[:8]}")
    result = {"door": "upload", "clients": clients,
              "attack": f"uploads declaring {upload_mib} MiB, sending {send_mib} MiB, then"
                        " nothing (the client neither finishes nor leaves)",
              "caps": {"spool_max_mib": spool_mib, "upload_max_mib": upload_mib,
                       "bodies_per_address": Tuning().bodies_per_address}}
    sockets = []
    try:
        server.start()
        # A session each: one upload per session runs at once.
        session_ids = []
        for _ in range(clients):
            status, _, body = request(server.url + "/api/sessions", "POST",
                                      {"Content-Type": "application/json"}, b"{}", timeout=120)
            assert status == 201, body
            session_ids.append(json.loads(body)["id"])
        before = server.rss_kib()
        statuses = []
        peak_spool = 0
        chunk = b"\0" * MIB
        for session_id in session_ids:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sockets.append(sock)
            sock.sendall((f"POST /api/sessions/{session_id}/workspace HTTP/1.1\r\n"
                          f"Host: 127.0.0.1\r\nContent-Type: application/x-tar\r\n"
                          f"Content-Length: {upload_mib * MIB}\r\n\r\n").encode())
            sock.settimeout(0.5)
            refused = None
            for _ in range(send_mib):
                try:
                    sock.sendall(chunk)
                except OSError:
                    break
                try:
                    head = sock.recv(200)
                    if head:
                        refused = int(head.split(b" ", 2)[1])
                        break
                except (TimeoutError, socket.timeout, BlockingIOError):
                    pass
            statuses.append(refused or "held")
            peak_spool = max(peak_spool, spooled_bytes(server.pid))
        time.sleep(2)
        peak_spool = max(peak_spool, spooled_bytes(server.pid))
        during = server.rss_kib()
        for sock in sockets:
            sock.close()
        sockets = []
        time.sleep(2)
        result.update({"statuses": statuses,
                       "rss_mib": {"before": round(before / 1024), "held": round(during / 1024),
                                   "after": round(server.rss_kib() / 1024)},
                       "spooled_on_disk_mib": round(peak_spool / MIB),
                       "spooled_after_mib": round(spooled_bytes(server.pid) / MIB)})
        return result
    finally:
        for sock in sockets:
            sock.close()
        server.finish(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--write-timeout", type=float, default=10.0)
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("--users", choices=("both", "no", "yes"), default="both")
    parser.add_argument("--door", choices=("exec", "upload", "both"), default="both")
    args = parser.parse_args()
    if args.door in ("upload", "both"):
        print(json.dumps(upload_door(args.clients, args.image)), flush=True)
    if args.door == "upload":
        return
    for users in {"both": (False, True), "no": (False,), "yes": (True,)}[args.users]:
        print(json.dumps(exec_door(args.clients, args.write_timeout, args.image, users)),
              flush=True)


if __name__ == "__main__":
    main()
