"""
The keeper's screen across a stop of its container, in a real container of
the test image (see "The screen across a stop" in
docker/keeper/capsule-keeper.c): the screen a session had is saved while it
runs; after `docker stop` and `docker start`, a keeper started anew shows it
first, marked, at the offsets it had, then a new shell.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
import uuid

import pytest

from capsule.core.keeper import (DEFAULT_SOCKET, SCREEN_ENV, FrameReader, encode_input,
                                 keeper_argv, parse_screen)
from capsule.core.kept import SCREEN_PATH

from .harness import IMAGE, LABEL_INSTANCE, docker_client, remove_instance_containers

PREAMBLE = re.compile(rb"\x1b_capsule-keeper;offset=(\d+);dropped=(\d+)\x1b\\")
RESUMED = re.compile(rb"\x1b\[2m\xe2\x94\x80\xe2\x94\x80 resumed \d{4}-\d\d-\d\d \d\d:\d\d UTC:"
                     rb" the screen above is from before the session was put away")


class Exec:
    """
    A relay exec (C{docker exec -i}, no TTY), as capsule runs it: its
    frames read from its stdout.
    """

    def __init__(self, container: str, offset: int) -> None:
        argv = keeper_argv(("bash", "-l"), offset)
        self.process = subprocess.Popen(
            ["docker", "exec", "-i", "-u", "developer", "-e", f"{SCREEN_ENV}={SCREEN_PATH}",
             container, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        self.reader = FrameReader()
        self.output = bytearray()

    def until(self, pattern: bytes, timeout: float = 20) -> re.Match:
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while not (found := re.search(pattern, bytes(self.output), re.S)):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} within {timeout} s: {bytes(self.output[-300:])!r}"
            if select.select([fd], [], [], left)[0]:
                data = os.read(fd, 1 << 20)
                assert data, f"the exec ended: {self.process.stderr.read()!r}"
                for kind, payload in self.reader.feed(data):
                    if kind == b"o":
                        self.output += payload
        return found

    def type(self, text: str) -> None:
        self.process.stdin.write(encode_input(text.encode()))
        self.process.stdin.flush()

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def image_keeps_screens() -> bool:
    out = subprocess.run(["docker", "run", "--rm", "--entrypoint", "grep", IMAGE, "-c",
                          SCREEN_ENV, "/usr/local/src/capsule-keeper.c"],
                         capture_output=True, text=True)
    return out.stdout.strip() not in ("", "0")


@pytest.fixture
def container():
    if not image_keeps_screens():
        pytest.skip(f"the keeper of {IMAGE} keeps no screen (older than the image's source)")
    instance = f"screen-{uuid.uuid4().hex[:8]}"
    api = docker_client().api
    made = api.create_container(IMAGE, command=["sleep", "infinity"], user="developer",
                                labels={"io.capsule.managed": "true", LABEL_INSTANCE: instance},
                                host_config=api.create_host_config(init=True))
    api.start(made["Id"])
    yield made["Id"]
    remove_instance_containers(instance, api)


def screen_file(container: str) -> bytes:
    out = subprocess.run(["docker", "exec", container, "cat", SCREEN_PATH], capture_output=True)
    return out.stdout if out.returncode == 0 else b""


def test_a_stopped_and_started_container_shows_the_screen_it_had(container):
    first = Exec(container, 0)
    first.until(rb"\$ $")
    first.type("echo before-$((6*7))\r")
    first.until(rb"before-42\r\n.*\$ $")
    had = len(first.output) - len(first.until(PREAMBLE.pattern).group(0))
    # Saved while it runs (at most 2 s after the output).
    deadline = time.monotonic() + 20
    while b"before-42\r\n" not in parse_screen(screen_file(container))[0]:
        assert time.monotonic() < deadline, screen_file(container)[-300:]
        time.sleep(0.2)
    first.close()
    api = docker_client().api
    api.stop(container, timeout=10)
    assert api.inspect_container(container)["State"]["Running"] is False
    api.start(container)

    # The client that had it all: the marker, then a new shell.
    again = Exec(container, had)
    found = again.until(PREAMBLE.pattern)
    assert (int(found.group(1)), int(found.group(2))) == (had, 0)
    again.until(RESUMED.pattern + rb".*\$ $")
    assert b"before-42" not in again.output
    again.type("echo after-$((6*8))\r")
    again.until(rb"after-48\r\n")
    again.close()
    # One from 0 (a new tab): the screen it had first, then the same.
    fresh = Exec(container, 0)
    fresh.until(rb"before-42\r\n.*" + RESUMED.pattern + rb".*after-48\r\n")
    fresh.close()
