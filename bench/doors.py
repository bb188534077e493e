"""
Doors: the memory a client can make capsule hold through a door, with the
caps on, next to the caps.  This file measures the exec answer's door,
against a capsule it starts itself, on loopback:

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
import re
import shutil
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
        try:
            server.stop()
        finally:
            server.remove_containers()
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--write-timeout", type=float, default=10.0)
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("--users", choices=("both", "no", "yes"), default="both")
    args = parser.parse_args()
    for users in {"both": (False, True), "no": (False,), "yes": (True,)}[args.users]:
        print(json.dumps(exec_door(args.clients, args.write_timeout, args.image, users)),
              flush=True)


if __name__ == "__main__":
    main()
