"""
The Makefile as a newcomer meets it: `make setup` into a fresh virtualenv
says one line and no warning, and twistd finds capsule there; two `make run`
in one checkout (each with its own instance and port) run side by side,
keep their pid files out of the tree, and a second one of the same instance
says what to do.
"""

import hashlib
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .harness import IMAGE, remove_instance_containers, wait_for

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent

# What this machine's own pip configuration may say about its indexes: not
# the Makefile's output.
_PIP_ENVIRONMENT = re.compile(r"^WARNING: Location '.*' is ignored")


def _said(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()
            and not _PIP_ENVIRONMENT.match(line)]


def test_setup_says_one_line_and_twistd_finds_capsule_in_the_venv(tmp_path):
    """
    The editable install is not a deprecated one (setuptools' compat mode
    printed 14 lines of warning), code is imported from the checkout, and
    `twistd --help` in that virtualenv lists capsule.
    """
    venv = tmp_path / "venv"
    # --no-print-directory: under `make test` this make is a sub-make, which
    # would otherwise say the directory it enters and leaves.
    done = subprocess.run(["make", "--no-print-directory", f"VENV={venv}", f"{venv}/.installed"],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert _said(output) == [f"capsule: installing capsule and its Python packages into"
                             f" {venv} (pip)..."], output
    assert not re.search(r"(?i)deprecat|editable_mode|compat|BuildBackendWarning", output)

    # Run elsewhere than the checkout: the plugin is found through the venv.
    helped = subprocess.run([str(venv / "bin" / "twistd"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert re.search(r"^\s+capsule\s+Browser terminals", helped.stdout, re.M), helped.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import capsule.tap; print(capsule.tap.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(ROOT / "capsule" / "tap.py")


def _image_current(image: str) -> bool:
    """
    Whether docker/build-image.sh would leave C{image} as it is (`make run`
    then builds nothing).
    """
    dockerfile = (ROOT / "docker" / "Dockerfile").read_bytes()
    keeper = (ROOT / "docker" / "keeper" / "capsule-keeper.c").read_bytes()
    sha = hashlib.sha256(dockerfile + keeper).hexdigest()
    found = subprocess.run(["docker", "image", "inspect", "--format",
                            '{{ index .Config.Labels "io.capsule.dockerfile-sha" }}', image],
                           capture_output=True, text=True)
    return found.stdout.strip() == sha


def _untracked() -> set[str]:
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    return {line[3:] for line in status.stdout.splitlines() if line.startswith("??")}


class _MakeRun:
    """
    `make run` in the checkout, in a process group of its own.
    """

    def __init__(self, tmp_path: Path, instance: str, *, label: str) -> None:
        self.instance = instance
        self.out = tmp_path / f"make-run-{label}.out"
        state = tmp_path / f"state-{label}"
        with open(self.out, "wb") as out:
            self.process = subprocess.Popen(
                ["make", "--no-print-directory", "run", f"VENV={VENV}", f"IMAGE={IMAGE}",
                 "AGENT_IMAGE=none", f"INSTANCE={instance}",
                 "LISTEN=tcp:0:interface=127.0.0.1",
                 f"ARGS=--pool-size 0 --state-dir {state}",
                 f"BUILD_LOG={tmp_path / f'build-{label}.log'}"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def ready(self) -> str:
        return wait_for(lambda: re.search(r"capsule is ready: (\S+)", self.output())
                        or self.process.poll() is not None, 60,
                        f"make run of {self.instance} to say it is ready")

    def stop(self) -> None:
        """
        SIGTERM to twistd's PID, from its pid file: `make run` ends without an error.
        """
        pidfile = ROOT / ".run" / f"{self.instance}.pid"
        if self.process.poll() is None and pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise


def test_two_make_runs_in_one_checkout(tmp_path):
    if not _image_current(IMAGE):
        pytest.skip(f"{IMAGE} is not the current docker/Dockerfile's (make image)")
    before = _untracked()
    tag = uuid.uuid4().hex[:8]
    first_name, second_name = f"test-make-{tag}-a", f"test-make-{tag}-b"
    runs = []
    try:
        first = _MakeRun(tmp_path, first_name, label="first")
        runs.append(first)
        assert first.ready() and first.process.poll() is None, first.output()

        # The same instance again: refused at once, saying what to do.
        again = subprocess.run(
            ["make", "--no-print-directory", "run", f"VENV={VENV}", f"IMAGE={IMAGE}",
             "AGENT_IMAGE=none", f"INSTANCE={first_name}", "LISTEN=tcp:0:interface=127.0.0.1"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode != 0
        assert f"a capsule of instance {first_name} already runs" in again.stdout, again.stdout
        assert "make run INSTANCE=" in again.stdout
        assert "Another twistd server" not in again.stdout + again.stderr

        # Another instance on another port runs beside it.
        second = _MakeRun(tmp_path, second_name, label="second")
        runs.append(second)
        assert second.ready() and second.process.poll() is None, second.output()
        assert first.process.poll() is None

        assert _untracked() == before
        assert not (ROOT / "twistd.pid").exists()
    finally:
        for run in runs:
            run.stop()
        for name in (first_name, second_name):
            remove_instance_containers(name)
    for run in runs:
        assert run.process.returncode == 0, run.output()
        assert not (ROOT / ".run" / f"{run.instance}.pid").exists()
