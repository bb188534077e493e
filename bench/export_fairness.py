"""
How long a small export takes while big exports run (issue 9, item 5).

A real twistd and engine: one session holds a large sparse file, another a
156-byte one.  Big exports of the first are started from C{--big-clients}
loopback addresses (C{--big} in all, round-robin), then the small export
is timed from another address.  Prints one JSON line.

    .venv/bin/python bench/export_fairness.py --big 4 --big-clients 1
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.clients import BlockingTerminal  # noqa: E402
from tests.support.live import CapsuleServer, remove_instance_containers  # noqa: E402


def export(port: int, session_id: str, source: str, result: dict) -> None:
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=900,
                                    source_address=(source, 0))
    sock.sendall(f"GET /api/export/{session_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Connection: close\r\n\r\n".encode())
    size, head = 0, b""
    try:
        while chunk := sock.recv(1 << 20):
            if not head:
                head = chunk[:12]
            size += len(chunk)
    except OSError as e:
        result["error"] = type(e).__name__
    result.update(seconds=round(time.monotonic() - started, 2), bytes=size,
                  status=head.decode("latin-1"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=4)
    parser.add_argument("--big-clients", type=int, default=1)
    parser.add_argument("--sparse", default="8G")
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("extra", nargs="*", help="capsule options")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="export-bench-"))
    server = CapsuleServer(workdir, "--pool-size", "0", *args.extra, image=args.image).start()
    try:
        big = BlockingTerminal(server.ws_url, binary=True)
        big_id = big.start()
        big.run(f"truncate -s {args.sparse} /workspace/big && echo O''K", "OK", timeout=60)
        small = BlockingTerminal(server.ws_url, binary=True)
        small_id = small.start()
        small.run("printf %156s x > /workspace/small && echo O''K", "OK", timeout=60)
        quiet: dict = {}
        export(server.port, small_id, "127.0.0.1", quiet)
        bigs, threads = [], []
        for i in range(args.big):
            result: dict = {}
            source = f"127.0.0.{2 + i % args.big_clients}"
            thread = threading.Thread(target=export, args=(server.port, big_id, source, result))
            thread.start()
            bigs.append(result)
            threads.append(thread)
        time.sleep(1.0)
        loaded: dict = {}
        export(server.port, small_id, "127.0.0.1", loaded)
        for thread in threads:
            thread.join()
        print(json.dumps({"quiet": quiet, "small_during_big": loaded, "big": bigs,
                          "args": vars(args)}))
        big.ws.close()
        small.ws.close()
    finally:
        server.stop()
        remove_instance_containers(server.instance)


if __name__ == "__main__":
    main()
