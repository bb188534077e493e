"""
A real restart of a Docker engine with live-restore: the test starts an
engine of its own (its own containerd, data root and socket, so the engine
the other tests use is never touched), loads the session image into it,
runs capsule against it, and restarts that engine under a running session.
Without live-restore, the restart stops the session's container: the
session is kept (docs/keeping.md), and resumable.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from .harness import IMAGE, WSClient, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("dockerd") or os.path.exists("/usr/sbin/dockerd"))
    or not shutil.which("containerd") or not shutil.which("ip"),
    reason="needs root, dockerd and containerd to run an engine of the test's own")

LOOP = "i=0; while true; do i=$((i+1)); echo T$i; sleep 0.05; done\r"


class PrivateEngine:
    """
    containerd and dockerd (with --live-restore) under C{root}; dockerd can
    be restarted while containerd, and so the containers, run on.
    """

    def __init__(self, root: Path, live_restore: bool = True) -> None:
        self.root = root
        self.live_restore = live_restore
        # A bridge of its own: an engine started with --bridge none removes
        # the host's docker0, which the engine the other tests use needs.
        self.bridge = f"cpst{os.getpid() % 100000}"
        self.socket = root / "docker.sock"
        self.containerd_socket = root / "ctd" / "containerd.sock"
        self.containerd = self.dockerd = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def _run(self, *args, **kwargs):
        return subprocess.run(args, env={**os.environ, "DOCKER_HOST": self.host},
                              check=True, capture_output=True, **kwargs)

    def start(self) -> "PrivateEngine":
        (self.root / "ctd").mkdir(parents=True)
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", "10.231.77.1/24", "dev", self.bridge], check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        config = self.root / "containerd.toml"
        config.write_text(
            'version = 2\n'
            f'root = "{self.root}/ctd/root"\n'
            f'state = "{self.root}/ctd/state"\n'
            f'[grpc]\n  address = "{self.containerd_socket}"\n'
            f'[ttrpc]\n  address = "{self.containerd_socket}.ttrpc"\n'
            '[debug]\n  address = ""\n[metrics]\n  address = ""\n')
        self.containerd = subprocess.Popen(
            ["containerd", "--config", str(config)],
            stdout=open(self.root / "containerd.log", "wb"), stderr=subprocess.STDOUT)
        wait_for(self.containerd_socket.exists, 20, "containerd to listen")
        self.start_dockerd()
        return self

    def start_dockerd(self) -> None:
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        self.dockerd = subprocess.Popen(
            [dockerd, "--data-root", str(self.root / "data"), "--exec-root",
             str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid"),
             "-H", self.host, "--containerd", str(self.containerd_socket),
             *(["--live-restore"] if self.live_restore else []),
             "--bridge", self.bridge, "--iptables=false", "--ip-masq=false"],
            stdout=open(self.root / "dockerd.log", "ab"), stderr=subprocess.STDOUT)

        def answers():
            return subprocess.run(["docker", "-H", self.host, "version"],
                                  capture_output=True).returncode == 0
        wait_for(answers, 30, "the test's own dockerd to answer")

    def stop_dockerd(self) -> None:
        self.dockerd.send_signal(signal.SIGTERM)
        self.dockerd.wait(30)

    def load(self, image: str) -> None:
        saved = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        self._run("docker", "load", stdin=saved.stdout)
        assert saved.wait() == 0

    def stop(self) -> None:
        if self.dockerd is not None and self.dockerd.poll() is None:
            ids = self._run("docker", "ps", "-aq").stdout.split()
            if ids:
                subprocess.run(["docker", "-H", self.host, "rm", "-f", *map(bytes.decode, ids)],
                               capture_output=True)
            self.stop_dockerd()
        if self.containerd is not None and self.containerd.poll() is None:
            self.containerd.send_signal(signal.SIGTERM)
            self.containerd.wait(30)
        # Whatever the engine left mounted under its root.
        with open("/proc/mounts") as mounts:
            points = [line.split()[1] for line in mounts if str(self.root) in line.split()[1]]
        for point in sorted(points, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def _private_engine(live_restore: bool):
    root = Path(f"/tmp/capsule-engine-{os.getpid()}-{time.monotonic_ns()}")
    private = PrivateEngine(root, live_restore=live_restore)
    try:
        private.start()
        private.load(IMAGE)
        yield private
    finally:
        private.stop()


@pytest.fixture
def engine():
    yield from _private_engine(True)


@pytest.fixture
def engine_without_live_restore():
    yield from _private_engine(False)


def _numbers(output: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"\bT(\d+)\r\n", output)]


@pytest_twisted.ensureDeferred
async def test_a_session_survives_a_dockerd_restart_with_live_restore(make_server, engine):
    server = make_server("--pool-size", "0", "--grace", "60", "--network", "none",
                         env={"DOCKER_HOST": engine.host})
    client = await WSClient.connect(server.ws_url, binary=True)
    await client.start()
    await client.run("stty -echo")
    client.type(LOOP)
    await client.until(rb"T20\r\n")
    await deferToThread(engine.stop_dockerd)
    assert (await client.next("notice", timeout=30))["code"] == "engine_away"
    await deferToThread(engine.start_dockerd)
    assert (await client.next("notice", timeout=60))["code"] == "engine_back"
    seen = max(_numbers(client.output))
    await client.until(f"T{seen + 20}\r\n")
    numbers = _numbers(client.output)
    assert numbers == list(range(1, len(numbers) + 1)), "a gap or a duplicate"
    assert client.received == len(client.output)
    assert not client.errors
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_dockerd_restart_without_live_restore_keeps_the_session(
        make_server, engine_without_live_restore, tmp_path):
    """
    The restart stops the session's container (its processes are lost):
    the session is kept, not an error; its client is told so; resumed
    (same id), its files are there and a new shell runs.
    """
    engine = engine_without_live_restore
    server = make_server("--pool-size", "0", "--grace", "60", "--network", "none",
                         "--retention", "1d", "--state-dir", str(tmp_path / "state"),
                         env={"DOCKER_HOST": engine.host})
    client = await WSClient.connect(server.ws_url, binary=True)
    session_id = await client.start()
    await client.run("echo kept-$((6*7)) > /workspace/notes.txt; (sleep 600 &)")
    await deferToThread(engine.stop_dockerd)
    assert (await client.next("notice", timeout=30))["code"] == "engine_away"
    await deferToThread(engine.start_dockerd)
    exit = await client.exited
    assert exit["exit_code"] is None
    assert "is kept" in exit["message"] and "kept until" in exit["message"], exit
    assert "resume it" in exit["message"]
    assert f"session {session_id[:8]}" in server.log() and "it is kept" in server.log()
    again = await WSClient.connect(server.ws_url, f"{session_id}&resume=1", binary=True)
    connected = await again.next("connected", timeout=60)
    assert connected["session_id"] == session_id and connected["resumed_from"] > 0
    out = await again.run("cat /workspace/notes.txt; jobs | wc -l")
    # The files are there; the processes are not (a new shell).
    assert "kept-42" in out and "\n0" in out.replace("\r", "")
    await again.close()
