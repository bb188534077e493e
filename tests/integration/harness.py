"""
The integration tests' live capsule: L{tests.support.live} and
L{tests.support.clients}, with the test image and small container limits.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.clients import BlockingTerminal, TerminalClient
from tests.support.live import CapsuleServer as LiveServer
from tests.support.live import (
    LABEL_INSTANCE,
    WaitFailed,
    docker_client,
    eventually,
    free_port,
    instance_containers,
    poll,
    remove_instance_containers,
    remove_instance_volumes,
    session_container,
    sleep,
    wait_for,
    with_timeout,
)

# What the tests import from here.
__all__ = [
    "IMAGE", "LABEL_INSTANCE", "ROOT", "BlockingTerminal", "CapsuleServer", "TerminalClient",
    "WSClient", "WaitFailed", "docker_client", "eventually", "free_port",
    "instance_containers", "poll", "remove_instance_containers", "remove_instance_volumes",
    "session_container", "sleep",
    "wait_for", "with_timeout",
]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("CAPSULE_TEST_IMAGE", "capsule-runtime:latest")

# A real WebSocket client speaking capsule's protocols (see TerminalClient).
WSClient = TerminalClient


class CapsuleServer(LiveServer):
    """
    C{twistd -n capsule} on a free loopback port, with its own instance name,
    the test image, and containers of 512 MiB and one CPU (C{extra} may
    override them).
    """

    def __init__(self, tmp_path: Path, *extra: str, env: dict | None = None,
                 instance: str | None = None, tuning: dict | None = None) -> None:
        # Every test client comes from 127.0.0.1: admission limits are off
        # unless a test sets them (its options come after these, and win).
        super().__init__(tmp_path, "--memory", "512m", "--cpus", "1", "--max-sessions", "256",
                         "--max-sessions-per-client", "256", "--session-rate", "1000/1",
                         "--memory-budget", "off", *extra,
                         image=IMAGE, env=env, instance=instance, tuning=tuning)
