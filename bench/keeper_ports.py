"""
What finding a session's ports costs its keeper: capsule-keeper reads the
container's socket table once a second while an attachment is in place
(its 'P' frames, see docs/protocol.md).  One container of the session image,
its keeper attached through a relay exec and otherwise idle (a command
that prints nothing), and the keeper server's time on a CPU
(/proc/PID/schedstat) over two windows, extrapolated to many sessions:
the first 25 s after its start, while it reads the table every second
(as after output), and a window of --seconds after 35 s of silence, when
it reads it every 10 s.

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


def cpu_seconds(pid: int) -> float:
    """
    The process's time on a CPU: /proc/PID/schedstat's (nanoseconds) where
    the kernel keeps it, else utime + stime (in clock ticks).
    """
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="capsule-runtime:latest")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--listening", type=int, default=0)
    parser.add_argument("--sessions", type=int, default=200)
    args = parser.parse_args(argv)
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
        begun = time.monotonic()
        relay = subprocess.Popen(["docker", "exec", "-i", container, "capsule-keeper", "-r",
                                  SOCKET, "--", "sh", "-c", "read x"],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        pid = keeper_pid(init_pid)
        for what, start, window in (("reading every 1 s (output in the last 30 s)", 1, 24),
                                    ("reading every 10 s (quiet for 30 s)", 35, args.seconds)):
            time.sleep(max(0.0, start - (time.monotonic() - begun)))
            before, started = cpu_seconds(pid), time.monotonic()
            time.sleep(window)
            used = cpu_seconds(pid) - before
            elapsed = time.monotonic() - started
            share = used / elapsed
            print(f"keeper, {what}, {args.listening} extra listening ports: {used * 1000:.1f} ms"
                  f" of CPU in {elapsed:.0f} s ({share * 100:.4f} % of a core); {args.sessions}"
                  f" such sessions: {share * args.sessions * 100:.2f} % of a core")
    finally:
        if relay is not None:
            relay.stdin.close()
            relay.wait(10)
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)


if __name__ == "__main__":
    main()
