"""
Soak: many connect / type / disconnect / reconnect / end-or-expire cycles
against a capsule it starts itself, on loopback; then it checks that nothing
leaked.

    .venv/bin/python bench/soak.py --cycles 500

Each cycle opens a session, runs a command, drops the connection (half the
time without a close handshake), reconnects with the session id and checks
the shell kept its state, then either types `exit` or leaves the session to
expire (grace 1 s).  At the end it waits for expiry and prints containers
leaked (containers of its instance beyond the warm pool), sessions leaked
(live sessions per /health) and capsule's memory at start and end.  Bounded
in cycles and in time (--max-seconds); it stops capsule and removes every
container of its instance however it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

# The tests' helpers (tests/support) are the bench's clients too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.clients import BlockingTerminal
from tests.support.live import CapsuleServer, wait_for


def soak(cycles: int, max_seconds: float, pool: int, image: str) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="capsule-soak-"))
    # Retention 0: an expired session's container is removed, as the soak
    # counts (kept sessions, stopped on purpose, are tests/test_keep*.py's).
    server = CapsuleServer(workdir, "--grace", "1", "--retention", "0",
                           "--pool-size", str(pool), "--memory", "512m", "--cpus", "1",
                           # one client opening sessions in a loop, on purpose
                           "--session-rate", "1000/1", "--max-sessions-per-client", "256",
                           image=image, instance=f"soak-{uuid.uuid4().hex[:8]}",
                           tuning={"cleanup-interval": 0.2})
    result = {"cycles_requested": cycles, "instance": server.instance}
    try:
        server.start()
        wait_for(lambda: server.health()[1].get("pool", {}).get("ready", 0) >= pool, 30,
                 f"capsule's warm pool to fill (log: {server.log_path})", interval=0.2)
        rss_start = server.rss_kib()
        started, done, failures = time.monotonic(), 0, []
        for cycle in range(cycles):
            if time.monotonic() - started > max_seconds:
                break
            try:
                first = BlockingTerminal(server.ws_url, timeout=10)
                session_id = first.start()
                first.run(f"export SOAK={cycle}; echo typed$((1+{cycle}))", f"typed{cycle + 1}")
                first.drop() if cycle % 2 else first.close()
                again = BlockingTerminal(server.ws_url, session_id, timeout=10)
                if not again.next("connected")["resumed"]:
                    raise RuntimeError("not resumed")
                again.run("echo kept-$SOAK-$((2*1))", f"kept-{cycle}-2")
                if cycle % 2:
                    again.exit(timeout=20)
                else:
                    again.drop()  # left to expire
                done += 1
            except Exception as e:  # counted and reported, the soak goes on
                failures.append(f"cycle {cycle}: {e}")
            if len(failures) > 10:
                break
        elapsed = time.monotonic() - started
        # Every session left expires (grace 1 s, sweep 0.2 s) and its
        # container is removed: what remains is the warm pool.
        try:
            wait_for(server.settled, 30, "the sessions left to expire", interval=0.2)
        except AssertionError:
            pass  # what is left is reported as leaked
        _, state = server.health()
        result.update(
            cycles_done=done,
            failures=failures,
            seconds=round(elapsed, 1),
            containers_leaked=max(0, len(server.containers()) - state["pool"]["ready"]),
            sessions_leaked=state["sessions"],
            rss_start_kib=rss_start,
            rss_end_kib=server.rss_kib(),
            unhandled_errors=len(server.unhandled_errors()),
        )
        return result
    finally:
        server.finish(workdir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--max-seconds", type=float, default=1800)
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--image", default=os.environ.get("CAPSULE_IMAGE", "capsule-runtime:latest"))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    options = parser.parse_args()
    result = soak(options.cycles, options.max_seconds, options.pool_size, options.image)
    if options.json:
        print(json.dumps(result))
    else:
        print(f"cycles:             {result['cycles_done']} of {result['cycles_requested']}"
              f" in {result['seconds']} s")
        print(f"containers leaked:  {result['containers_leaked']}")
        print(f"sessions leaked:    {result['sessions_leaked']}")
        print(f"capsule memory:     {result['rss_start_kib'] / 1024:.1f} MiB at start,"
              f" {result['rss_end_kib'] / 1024:.1f} MiB at end")
        print(f"unhandled errors:   {result['unhandled_errors']}")
        for failure in result["failures"]:
            print(f"failure: {failure}")
    ok = (not result["failures"] and result["containers_leaked"] == 0
          and result["sessions_leaked"] == 0 and result["unhandled_errors"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
