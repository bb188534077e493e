"""
docker/build-image.sh's decisions, with the real script and a stand-in
docker client (tests/fake_docker.py) on the PATH: which image it builds, when
it leaves one alone, what it stamps, what the agent image's build context
holds, and what a failed build says. The images themselves are built and run
by tests/integration/test_agent_image.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docker" / "build-image.sh"
RUNTIME, AGENT = "capsule-runtime:test", "capsule-agent:test"


def sha(*paths: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


RUNTIME_SHA = sha(ROOT / "docker" / "Dockerfile", ROOT / "docker" / "keeper" / "capsule-keeper.c")
AGENT_SHA = sha(*(ROOT / "docker" / "agent" / name
                  for name in ("Dockerfile", "package.json", "package-lock.json")))


@pytest.fixture
def docker(tmp_path):
    """
    Run build-image.sh against a fake engine holding C{images}; return its
    exit status, its stderr, and the engine's state afterwards.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(
        f"#!/bin/sh\nexec {sys.executable} -S -E {ROOT / 'tests' / 'fake_docker.py'} \"$@\"\n")
    (bin_dir / "docker").chmod(0o755)
    state_path = tmp_path / "state.json"

    def run(images, *args, fail_build=False, **env):
        state_path.write_text(json.dumps({"images": images, "fail_build": fail_build}))
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith("CAPSULE_") and k not in ("DOCKER_BUILDKIT",)}
        environ.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DOCKER_STATE=str(state_path),
                       TMPDIR=str(tmp_path), **env)
        result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                                env=environ, timeout=60)
        return result.returncode, result.stderr, json.loads(state_path.read_text())
    return run


def image(id_, **labels):
    return {"Id": id_, "Labels": labels, "Size": 1048576}


def up_to_date():
    return {
        "debian:bookworm-slim": image("sha256:base"),
        RUNTIME: image("sha256:runtime", **{"io.capsule.dockerfile-sha": RUNTIME_SHA}),
        AGENT: image("sha256:agent", **{"io.capsule.dockerfile-sha": AGENT_SHA,
                                        "io.capsule.runtime-id": "sha256:runtime"}),
    }


def builds(state):
    return [call for call in state["calls"] if call[0] == "build"]


def tag_of(call):
    return call[call.index("-t") + 1]


def test_both_up_to_date_builds_nothing(docker):
    status, err, state = docker(up_to_date(), RUNTIME, AGENT)
    assert status == 0
    assert err.splitlines() == [f"build-image: image {RUNTIME} is up to date",
                                f"build-image: image {AGENT} is up to date"]
    assert builds(state) == []


def test_a_changed_agent_directory_rebuilds_the_agent_image_alone(docker, tmp_path):
    images = up_to_date()
    images[AGENT]["Labels"]["io.capsule.dockerfile-sha"] = "0" * 64
    status, err, state = docker(images, RUNTIME, AGENT)
    assert status == 0, err
    assert f"build-image: image {AGENT} was built from another docker/agent/ ({'0' * 64}); rebuilding" in err
    (build,) = builds(state)
    assert tag_of(build) == AGENT
    assert ["--build-arg", f"RUNTIME={RUNTIME}"] == build[build.index("--build-arg"):][:2]
    assert state["images"][AGENT]["Labels"] == {"io.capsule.dockerfile-sha": AGENT_SHA,
                                                "io.capsule.runtime-id": "sha256:runtime"}
    # the context: docker/agent/'s files and the host's CA certificates, in a
    # directory of its own that is gone afterwards
    assert state["contexts"] == [["Dockerfile", "host-ca.crt", "package-lock.json", "package.json"]]
    assert "--force-rm" in build
    assert not list(tmp_path.glob("capsule-agent.*"))
    # the image it replaced is removed
    assert ["rmi", "sha256:agent"] in state["calls"]


def test_the_image_replaced_stays_while_another_tag_names_it(docker):
    # Another checkout's tag of the same image (capsule-agent:latest built
    # from the same layers as capsule-agent:test): rebuilding this one must
    # not take that one away (a rebuild once removed it by its id).
    images = up_to_date()
    images[AGENT]["Labels"]["io.capsule.dockerfile-sha"] = "0" * 64
    images["capsule-agent:latest"] = dict(images[AGENT])
    status, err, state = docker(images, RUNTIME, AGENT)
    assert status == 0, err
    assert builds(state) and not [call for call in state["calls"] if call[0] == "rmi"]
    assert state["images"]["capsule-agent:latest"]["Id"] == "sha256:agent"


def test_another_session_image_rebuilds_the_agent_image(docker):
    images = up_to_date()
    images[AGENT]["Labels"]["io.capsule.runtime-id"] = "sha256:older-runtime"
    status, err, state = docker(images, RUNTIME, AGENT)
    assert status == 0, err
    assert f"build-image: image {AGENT} was built from another {RUNTIME}; rebuilding" in err
    assert [tag_of(b) for b in builds(state)] == [AGENT]


def test_a_rebuilt_session_image_rebuilds_the_agent_image_on_it(docker):
    images = up_to_date()
    images[RUNTIME]["Labels"]["io.capsule.dockerfile-sha"] = "older"
    status, err, state = docker(images, RUNTIME, AGENT)
    assert status == 0, err
    assert [tag_of(b) for b in builds(state)] == [RUNTIME, AGENT]
    assert state["images"][AGENT]["Labels"]["io.capsule.runtime-id"] == state["images"][RUNTIME]["Id"]
    assert state["images"][RUNTIME]["Id"] != "sha256:runtime"


def test_a_missing_agent_image_is_built(docker):
    images = up_to_date()
    del images[AGENT]
    status, err, state = docker(images, RUNTIME, AGENT)
    assert status == 0, err
    assert [tag_of(b) for b in builds(state)] == [AGENT]
    assert not [call for call in state["calls"] if call[0] == "rmi"]


def test_agent_image_none_builds_no_agent_image(docker):
    images = up_to_date()
    del images[AGENT]
    status, err, state = docker(images, RUNTIME, "none")
    assert (status, err) == (0, f"build-image: image {RUNTIME} is up to date\n")
    assert builds(state) == []


def test_the_agent_image_name_defaults_from_the_environment(docker):
    images = up_to_date()
    status, err, state = docker(images, CAPSULE_IMAGE=RUNTIME, CAPSULE_AGENT_IMAGE=AGENT)
    assert status == 0
    assert err.splitlines()[-1] == f"build-image: image {AGENT} is up to date"


def test_rebuild_and_no_cache(docker):
    status, err, state = docker(up_to_date(), RUNTIME, AGENT,
                                CAPSULE_REBUILD="1", CAPSULE_NO_CACHE="1")
    assert status == 0, err
    assert [tag_of(b) for b in builds(state)] == [RUNTIME, AGENT]
    assert all("--no-cache" in b for b in builds(state))


def test_a_failed_agent_build_says_how_to_go_on_and_keeps_the_old_image(docker, tmp_path):
    images = up_to_date()
    images[AGENT]["Labels"]["io.capsule.runtime-id"] = "sha256:older-runtime"
    status, err, state = docker(images, RUNTIME, AGENT, fail_build=True)
    assert status == 1
    assert err.splitlines()[-1] == (
        f"build-image: error: building {AGENT} failed (above); it needs the npm registry and"
        " Debian's mirror from inside docker build. To go on without the agent image:"
        " make AGENT_IMAGE=none, or none as this script's second argument")
    assert not [call for call in state["calls"] if call[0] == "rmi"]
    assert not list(tmp_path.glob("capsule-agent.*"))
