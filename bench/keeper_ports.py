"""
What finding a session's ports costs its keeper: capsule-keeper reads the
container's socket table once a second while an attachment is in place
(its 'P' frames, see docs/protocol.md).  One container of the session image,
its keeper attached through a relay exec and otherwise idle (a shell
waiting at its prompt), and the keeper server's CPU time (utime + stime in
/proc/PID/stat) over a window, extrapolated to many idle sessions.

    python bench/keeper_ports.py [--image capsule-runtime:latest] [--seconds 60]
        [--listening 0] [--sessions 200]

--listening N starts a server with N listening ports in the container
first (a bigger table to read).  The container is labelled
io.capsule.bench=keeper-ports and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

SOCKET = "/tmp/.capsule-keeper/bench.sock"
LABEL = "io.capsule.bench=keeper-ports"


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def keeper_pid(init_pid: int) -> int:
    """
    The keeper server's host pid: the process with the bench's socket in
    its command line whose parent is the container's first process (the
    server is double-forked away from its relay).
    """
    for _ in range(100):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if SOCKET.encode() in argv and ppid == init_pid:
                return int(entry)
        time.sleep(0.1)
    raise SystemExit("the keeper server was not found")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--listening", type=int, default=0)
    parser.add_argument("--sessions", type=int, default=200)
    args = parser.parse_args(argv)
    hz = os.sysconf("SC_CLK_TCK")
    container = docker("run", "-d", "--rm", "--label", LABEL, "--network", "none",
                       "--entrypoint", "sleep", args.image, "3600")
    relay = None
    try:
        if args.listening:
            docker("exec", "-d", container, "perl", "-MIO::Socket::INET", "-e",
                   f"@s=map {{IO::Socket::INET->new(LocalPort=>10000+$_,Listen=>1)}}"
                   f" 1..{args.listening}; sleep 3600")
        init_pid = int(docker("inspect", "-f", "{{.State.Pid}}", container))
        # The relay, attached for the whole window (stdin held open).
        relay = subprocess.Popen(["docker", "exec", "-i", container, "capsule-keeper", "-r",
                                  SOCKET, "--", "sh", "-c", "read x"],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        pid = keeper_pid(init_pid)
        time.sleep(2)  # past its start
        before, started = cpu_ticks(pid), time.monotonic()
        time.sleep(args.seconds)
        used = (cpu_ticks(pid) - before) / hz
        elapsed = time.monotonic() - started
        share = used / elapsed
        print(f"keeper CPU over {elapsed:.0f} s, idle and attached, {args.listening} extra"
              f" listening ports: {used * 1000:.0f} ms ({share * 100:.3f} % of a core;"
              f" {used / elapsed * 1000:.2f} ms per 1 s poll, clock tick {1000 / hz:.0f} ms)")
        print(f"{args.sessions} such sessions: {share * args.sessions * 100:.2f} % of a core")
    finally:
        if relay is not None:
            relay.stdin.close()
            relay.wait(10)
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)


if __name__ == "__main__":
    main()
