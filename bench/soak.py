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
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import warnings
from pathlib import Path

import docker
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent

# Sessions keep their connections across calls rather than in a with block.
warnings.filterwarnings("ignore", "connect\\(\\) must be used", DeprecationWarning)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Session:
    def __init__(self, url: str, session_id: str | None = None) -> None:
        target = url if session_id is None else f"{url}?session_id={session_id}"
        self.ws = connect(target, open_timeout=10, close_timeout=2)
        self.output = b""

    def start(self) -> str:
        self.ws.send(json.dumps({"type": "resize", "cols": 80, "rows": 24}))
        return self.wait("connected")["session_id"]

    def wait(self, kind: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message["type"] == "output":
                self.output += base64.b64decode(message["data"])
            if message["type"] == kind:
                return message
            if message["type"] == "error":
                raise RuntimeError(f"error frame: {message}")

    def run(self, command: str, expect: str, timeout: float = 20) -> None:
        self.ws.send(json.dumps({"type": "input", "data": command + "\r"}))
        deadline = time.monotonic() + timeout
        while expect.encode() not in self.output:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {expect!r} within {timeout} s: {self.output[-300:]!r}")
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message["type"] == "output":
                self.output += base64.b64decode(message["data"])
            elif message["type"] in ("error", "exit"):
                raise RuntimeError(f"unexpected {message}")

    def drop(self) -> None:
        # No close handshake: as a network drop.
        self.ws.socket.shutdown(socket.SHUT_RDWR)
        self.ws.socket.close()

    def close(self) -> None:
        self.ws.close()


def health(base: str) -> dict:
    with urllib.request.urlopen(base + "/health", timeout=10) as response:
        return json.loads(response.read())


def soak(cycles: int, max_seconds: float, pool: int, image: str) -> dict:
    instance = f"soak-{uuid.uuid4().hex[:8]}"
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="capsule-soak-"))
    twistd = Path(sys.executable).with_name("twistd")
    args = [str(twistd), "-n", "--pidfile=", f"--logfile={workdir / 'capsule.log'}", "capsule",
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--instance", instance,
            "--image", image, "--grace", "1", "--cleanup-interval", "0.2",
            "--pool-size", str(pool), "--memory", "512m", "--cpus", "1"]
    server = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws"
    api = docker.from_env(timeout=60).api
    labels = {"label": f"io.capsule.instance={instance}"}
    result = {"cycles_requested": cycles, "instance": instance}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if health(base)["pool"]["ready"] >= pool:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("capsule did not start: see " + str(workdir / "capsule.log"))
            time.sleep(0.2)
        rss_start = rss_kib(server.pid)
        started, done, failures = time.monotonic(), 0, []
        for cycle in range(cycles):
            if time.monotonic() - started > max_seconds:
                break
            try:
                first = Session(url)
                session_id = first.start()
                first.run(f"export SOAK={cycle}; echo typed$((1+{cycle}))", f"typed{cycle + 1}")
                first.drop() if cycle % 2 else first.close()
                again = Session(url, session_id)
                if not again.wait("connected")["resumed"]:
                    raise RuntimeError("not resumed")
                again.run("echo kept-$SOAK-$((2*1))", f"kept-{cycle}-2")
                if cycle % 2:
                    again.ws.send(json.dumps({"type": "input", "data": "exit\r"}))
                    again.wait("exit")
                else:
                    again.drop()  # left to expire
                done += 1
            except Exception as e:  # counted and reported, the soak goes on
                failures.append(f"cycle {cycle}: {e}")
            if len(failures) > 10:
                break
        elapsed = time.monotonic() - started
        # Let every left session expire (grace 1 s, sweep 0.2 s).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and health(base)["sessions"] > 0:
            time.sleep(0.2)
        time.sleep(1)
        state = health(base)
        containers = api.containers(all=True, filters=labels)
        result.update(
            cycles_done=done,
            failures=failures,
            seconds=round(elapsed, 1),
            containers_leaked=max(0, len(containers) - state["pool"]["ready"]),
            sessions_leaked=state["sessions"],
            rss_start_kib=rss_start,
            rss_end_kib=rss_kib(server.pid),
            unhandled_errors=sum(line.count("Unhandled") + line.count("Traceback")
                                 for line in (workdir / "capsule.log").read_text().splitlines()),
        )
        return result
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        for c in api.containers(all=True, filters=labels):
            try:
                api.remove_container(c["Id"], force=True, v=True)
            except docker.errors.APIError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)


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
