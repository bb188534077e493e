"""
capsule as the systemd path and capsule's image install it: a wheel built
from the checkout, `pip install`ed into a fresh virtualenv, npm's packages
copied next to its page (docs/deploy.md), and that installed `twistd
capsule` serving the page, every module the page imports, and an upload
made through the page in Chromium.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.httpclient import request

from .harness import (CapsuleServer, docker_client, remove_instance_containers, session_container,
                      wait_for)

ROOT = Path(__file__).resolve().parents[2]
WWW = ROOT / "www"
CHROMIUM = os.environ.get("CAPSULE_CHROMIUM") or shutil.which("chromium")
# What a copy of the checkout leaves out: what git ignores, and git itself.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "node_modules", "build", "dist",
                                     "*.egg-info", "__pycache__", ".run", ".pytest_cache")


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or shutil.which("python3")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """
    A fresh virtualenv with capsule installed from one wheel, built from a
    copy of the checkout without npm's packages.
    """
    if not (WWW / "node_modules" / "@xterm" / "xterm").is_dir():
        pytest.skip("www/node_modules is missing (make setup)")
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    wheels = work / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(source)], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = wheels.glob("capsule-*.whl")
    venv = work / "venv"
    subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check",
                    "--quiet", "install", str(wheel)], check=True, capture_output=True,
                   timeout=900)
    return venv


def _page_files(www: Path) -> set[str]:
    """
    What capsule's www/ serves: all but npm's packages, the tests and the
    manifests.
    """
    held = set()
    for path in www.rglob("*"):
        relative = path.relative_to(www)
        if path.is_file() and relative.parts[0] not in ("node_modules", "test") \
                and not relative.name.startswith(".") \
                and relative.as_posix() not in ("package.json", "package-lock.json"):
            held.add(relative.as_posix())
    return held


def _start(venv: Path, tmp_path: Path, *args: str) -> CapsuleServer:
    server = CapsuleServer(tmp_path, "--pool-size", "0", "--state-dir", str(tmp_path / "state"),
                           *args)
    # The installed twistd, run away from the checkout (twistd puts its
    # working directory on sys.path).
    server.args[0] = str(venv / "bin" / "twistd")
    return server


def _run(server: CapsuleServer, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(server.args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=server.env)


def test_the_installed_capsule_has_every_file_of_the_page_and_serves_an_upload(
        installed, tmp_path):
    share = installed / "share" / "capsule" / "www"
    assert _page_files(share) == _page_files(WWW)
    assert (share / "js" / "tar.js").is_file()
    assert not (share / "node_modules").exists()
    found = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import capsule.tap; print(capsule.tap.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert found.stdout.startswith(str(installed))

    # Without npm's packages it says what to do, rather than serving a page
    # without a terminal.
    server = _start(installed, tmp_path)
    refused = _run(server, tmp_path)
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert f"the page's npm packages are missing from {share}" in said, said
    assert "npm ci" in said

    # As docs/deploy.md says: npm's packages copied next to the page.
    shutil.copytree(WWW / "node_modules", share / "node_modules")
    server = _start(installed, tmp_path)
    server.process = subprocess.Popen(server.args, cwd=tmp_path, env=server.env,
                                      stdout=open(server.out_path, "wb"),
                                      stderr=subprocess.STDOUT)
    try:
        _wait_listening(server)
        fetched = _fetch_the_page(server)
        assert "js/tar.js" in fetched and "app.js" in fetched
        assert any(name.startswith("node_modules/@xterm/xterm/") for name in fetched)
        if CHROMIUM is None:
            pytest.skip("no chromium on this machine: the page's upload is not tried")
        _upload_through_the_page(server)
    finally:
        server.stop()
        remove_instance_containers(server.instance)
    assert server.unhandled_errors() == []


def _wait_listening(server: CapsuleServer) -> None:
    wait_for(lambda: "capsule is ready" in server.log() or server.process.poll() is not None,
             60, "the installed capsule to say it is ready")
    assert server.process.poll() is None, server.log()


def _fetch_the_page(server: CapsuleServer) -> set[str]:
    """
    The page, what it names, and every module imported from there on,
    each answered 200; their paths.
    """
    status, _, body = request(server.url + "/")
    assert status == 200
    todo = [name.decode() for name in re.findall(rb'(?:src|href)="/?([^"#?]+)', body)]
    fetched = set()
    while todo:
        name = todo.pop()
        if name in fetched or "://" in name:
            continue
        status, _, content = request(f"{server.url}/{name}")
        assert status == 200, name
        fetched.add(name)
        if name.endswith(".js") and not name.startswith("node_modules/"):
            folder = os.path.dirname(name)
            for imported in re.findall(rb'(?:from|import)\s*\(?\s*"(\./[^"]+|\.\./[^"]+)"',
                                       content):
                todo.append(os.path.normpath(os.path.join(folder, imported.decode())))
    return fetched


def _upload_through_the_page(server: CapsuleServer) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 600})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_selector('#status[data-state="connected"]', timeout=30000)
            session_id = page.get_attribute("#session", "title")
            page.wait_for_selector("#upload:not([disabled])", timeout=30000)
            page.set_input_files("#upload-input", files=[{
                "name": "from the installed page.txt", "mimeType": "text/plain",
                "buffer": "installed \u00e9\n".encode()}])
            container = docker_client().containers.get(session_container(session_id))
            wait_for(lambda: container.exec_run(
                ["cat", "/workspace/from the installed page.txt"]).output
                == "installed \u00e9\n".encode(), 30, "the uploaded file in /workspace")
            assert errors == []
        finally:
            browser.close()
