"""
The stand-in Kubernetes API server as a process of its own
(tests/support/kube_standin_main.py), as the benchmark and a C{twistd
capsule --engine kubernetes} in another process use it: it prints its URL,
answers, writes a kubeconfig that the Kubernetes engine loads, runs pods as
containers, and removes them on SIGTERM; bad options get a clear error.
"""

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.request import Request, urlopen

import pytest

from capsule.engine.kubernetes import kube_configuration
from tests.support.clients import BlockingTerminal
from tests.support.kube_standin import STANDIN_LABEL
from tests.support.live import CapsuleServer, instance_containers, remove_instance_containers

from .harness import IMAGE, docker_client

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.support.kube_standin_main"


def run_standin(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", MODULE, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def call(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = Request(url, data=data, method=method,
                      headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=30) as answer:
        return answer.status, json.loads(answer.read())


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture
def standin(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    process = run_standin("--port", "0", "--kubeconfig-out", str(kubeconfig),
                          "--namespace", "bench")
    url = process.stdout.readline().decode().strip()
    yield process, url, kubeconfig
    if process.poll() is None:
        process.kill()
        process.wait(30)
    # Whatever the test did, no pod of this stand-in outlives it.
    api = docker_client().api
    for c in api.containers(all=True, filters={"label": f"{STANDIN_LABEL}"}):
        if c["Labels"].get("io.capsule.instance", "").startswith("test-standin-main-"):
            api.remove_container(c["Id"], force=True, v=True)


def test_serves_writes_kubeconfig_and_removes_pods_on_sigterm(standin):
    process, url, kubeconfig = standin
    assert url.startswith("http://127.0.0.1:"), process.stderr.read()
    status, version = call(f"{url}/version")
    assert status == 200 and version["major"] == "1"
    configuration = kube_configuration(str(kubeconfig))
    assert configuration.host == url
    assert "namespace: bench" in kubeconfig.read_text()
    assert kubeconfig.stat().st_mode & 0o077 == 0

    instance = f"test-standin-main-{uuid.uuid4().hex[:8]}"
    status, pod = call(f"{url}/api/v1/namespaces/bench/pods", "POST", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "sleeper", "labels": {"io.capsule.instance": instance}},
        "spec": {"restartPolicy": "Never", "containers": [
            {"name": "main", "image": IMAGE, "command": ["sleep", "600"]}]}})
    assert status == 201, pod
    api = docker_client().api
    label = f"io.capsule.instance={instance}"
    wait(lambda: call(f"{url}/api/v1/namespaces/bench/pods/sleeper")[1]["status"].get("phase")
         == "Running", 60, "the pod to run")
    assert api.containers(filters={"label": label})

    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, process.stderr.read()
    assert api.containers(all=True, filters={"label": label}) == []


def test_a_capsule_in_another_process_runs_its_sessions_there(standin, tmp_path):
    """
    C{twistd capsule --engine kubernetes} given the runner's kubeconfig:
    a session's pod runs on the stand-in, and its shell answers.
    """
    process, url, kubeconfig = standin
    instance = f"test-standin-main-{uuid.uuid4().hex[:8]}"
    server = CapsuleServer(tmp_path, "--engine", "kubernetes", "--kubeconfig", str(kubeconfig),
                           "--kube-namespace", "bench", "--pool-size", "0", "--door-port", "0",
                           image=IMAGE, instance=instance)
    try:
        server.start(timeout=60)
        terminal = BlockingTerminal(server.ws_url, binary=True)
        terminal.start(80, 24, timeout=60)
        terminal.run("echo $((6*7))__RDY", "42__RDY", timeout=60)
        names = [c["Labels"].get("io.kubernetes.pod.name") for c in instance_containers(instance)]
        assert len(names) == 1 and names[0], names
        status, pod = call(f"{url}/api/v1/namespaces/bench/pods/{names[0]}")
        assert status == 200 and pod["status"]["phase"] == "Running"
        terminal.exit()
    finally:
        server.stop()
        remove_instance_containers(instance)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--kubeconfig-out", "/nonexistent-dir/kubeconfig"], "no directory '/nonexistent-dir'"),
    (["--kubeconfig-out", "/tmp"], "is a directory"),
    (["--namespace", ""], "--namespace must not be empty"),
    (["--network", "no-such-network-" + uuid.uuid4().hex[:6]], "no Docker network"),
])
def test_bad_options_are_refused_clearly(tmp_path, args, message):
    full = ["--kubeconfig-out", str(tmp_path / "kubeconfig"), *args]
    process = run_standin(*full)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert out == b""
    assert message in err.decode(), err
    if "--kubeconfig-out" not in args:
        assert not (tmp_path / "kubeconfig").exists()


def test_kubeconfig_out_is_required():
    process = run_standin("--port", "0")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "--kubeconfig-out" in err.decode()
