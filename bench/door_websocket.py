"""
The memory a client can make capsule hold through its WebSocket door, and
the descriptors through idle connections, with the caps on (issue 19).

A real twistd and engine, under a file descriptor limit of C{--nofile}:

 - ping flood: a raw WebSocket sends pings (125-byte payloads) as fast as
   capsule takes them and reads nothing;
 - input flood: a session whose shell reads no input (C{sleep}) is sent
   binary input frames of 256 KiB as fast as capsule takes them, its
   output unread;
 - idle sockets: C{--idle} connections that send nothing, then one
   C{/health}.

Each reports capsule's growth in resident memory (the peak, sampled every
0.1 s, over its size before), what it took from the client, whether and
how it ended, next to the caps that bound it.  Prints one JSON object.

    .venv/bin/python bench/door_websocket.py
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capsule.sessions.session import SessionConfig  # noqa: E402
from capsule.tuning import Tuning  # noqa: E402
from tests.support.clients import BlockingTerminal  # noqa: E402
from tests.support.httpclient import raw_websocket  # noqa: E402
from tests.support.live import CapsuleServer, remove_instance_containers  # noqa: E402

MIB = 1024 * 1024


class Peak(threading.Thread):
    """
    The highest resident memory of a process while it runs, in KiB.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, rss_kib(pid), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.peak = max(self.peak, rss_kib(self.pid))

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_peer(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        while sock.recv(65536, socket.MSG_DONTWAIT):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def ping_flood(server, seconds: float, limit: int) -> dict:
    before = rss_kib(server.pid)
    peak = Peak(server.pid)
    peak.start()
    sock = raw_websocket(server.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(0.5)
    frames = (struct.pack("!BB", 0x89, 0x80 | 125) + b"\0\0\0\0" + b"p" * 125) * 512
    sent, ended, started = 0, None, time.monotonic()
    while sent < limit and time.monotonic() - started < seconds:
        try:
            sent += sock.send(frames)
        except (TimeoutError, socket.timeout):
            if closed_by_peer(sock):
                ended = "closed by capsule"
                break
        except OSError as e:
            ended = f"closed by capsule ({type(e).__name__})"
            break
    if ended is None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not closed_by_peer(sock):
            time.sleep(0.2)
        ended = "closed by capsule" if time.monotonic() < deadline else "still open"
    sock.close()
    return {"sent_mib": round(sent / MIB, 2), "grew_mib": round((peak.stop() - before) / 1024, 1),
            "ended": ended, "after_s": round(time.monotonic() - started, 1)}


def input_flood(server, seconds: float) -> dict:
    terminal = BlockingTerminal(server.ws_url, binary=True)
    terminal.start()
    terminal.run("stty -icanon -echo; echo RE''ADY; sleep 600", "READY", timeout=60)
    terminal.ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    before = rss_kib(server.pid)
    peak = Peak(server.pid)
    peak.start()
    payload = b"x" * (256 * 1024)
    sent, ended, started = 0, "still open", time.monotonic()
    terminal.ws.settimeout(1)
    while time.monotonic() - started < seconds:
        try:
            terminal.ws.send_binary(payload)
            sent += len(payload)
        except Exception as e:
            # A send that cannot finish within its timeout: capsule reads no more.
            ended = ("capsule stopped reading (a send blocked)" if "Timeout" in type(e).__name__
                     else f"closed by capsule ({type(e).__name__})")
            break
    grown = (peak.stop() - before) / 1024
    terminal.drop()
    return {"sent_mib": round(sent / MIB, 2), "grew_mib": round(grown, 1), "ended": ended}


def idle_sockets(server, count: int) -> dict:
    held, failed = [], 0
    for _ in range(count):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", server.port))
            held.append(s)
        except OSError:
            failed += 1
            s.close()
    time.sleep(0.5)
    open_ = sum(not closed_by_peer(s) for s in held)
    used = descriptors(server.pid)
    try:
        status = server.health()[0]
    except OSError as e:
        status = type(e).__name__
    for s in held:
        s.close()
    return {"opened": count - failed, "kept_open_by_capsule": open_,
            "capsule_descriptors": used, "health": status}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--nofile", type=int, default=400)
    parser.add_argument("--idle", type=int, default=420)
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("extra", nargs="*", help="capsule options")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="door-websocket-"))
    server = CapsuleServer(workdir, "--pool-size", "0", "--max-sessions", "16", *args.extra,
                           image=args.image)
    server.args = ["prlimit", f"--nofile={args.nofile}:{args.nofile}", *server.args]
    server.start()
    tuning = Tuning()
    try:
        time.sleep(1)
        report = {
            "caps": {
                "transport_buffer_kib": 64,
                "ws_stall_timeout_s": tuning.ws_stall_timeout,
                "max_message_kib": tuning.max_message_size // 1024,
                "input_overrun_mib": SessionConfig.max_input_overrun / MIB,
                "max_connections_per_client": 64,
                "http_header_timeout_s": tuning.http_header_timeout,
                "nofile": args.nofile,
            },
            "rss_before_mib": round(rss_kib(server.pid) / 1024, 1),
            "ping_flood": ping_flood(server, args.seconds, 512 * MIB),
            "input_flood": input_flood(server, args.seconds),
            "idle_sockets": idle_sockets(server, args.idle),
        }
        print(json.dumps(report, indent=1))
    finally:
        server.stop()
        remove_instance_containers(server.instance)


if __name__ == "__main__":
    main()
