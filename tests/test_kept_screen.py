"""
capsule's side of the screen a keeper keeps across a stop (see "The screen
across a stop" in docker/keeper/capsule-keeper.c): every exec that may start
a session's keeper tells it where to keep the screen, through the exec's
environment (never its argv: an older keeper would refuse an option it
does not know, and ignores a variable); and the screen file's format.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from capsule.core.keeper import (SCREEN_ENV, SCREEN_MAX_END, encode_screen, keeper_argv,
                                 keeper_start_argv, parse_screen)
from capsule.core.kept import duration_text, screen_path
from capsule.core.spec import ContainerSpec
from capsule.engine.keeper_direct import DirectKeeper
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.sessions.session import LABEL_INSTANCE, LABEL_SESSION
from tests.support.fakes import FakeDockerAPI, RecordingClient
from tests.test_direct_path import Network, start_ok
from tests.test_session import SID, recovered_manager

SPEC = ContainerSpec(image="capsule-runtime:latest", memory="1g", cpus=1, pids=64)


def test_the_relay_exec_tells_the_keeper_where_the_screen_is():
    docker = FakeDockerAPI()
    manager = SessionManager(docker, Clock(), SessionConfig(spec=SPEC, instance="t", grace=60,
                                                            replay_bytes=16))
    session = manager.create(RecordingClient(), 80, 24)
    [process] = docker.processes
    assert process.argv == tuple(keeper_argv(("bash", "-l"), 0, 16))
    # The session's own file: a fork (a copy under a new id) or another
    # session of a user whose home is a shared volume has another.
    assert process.env[SCREEN_ENV] == screen_path(session.id)
    assert session.id in screen_path(session.id)
    assert screen_path(session.id) not in process.argv


def test_the_exec_resuming_a_recovered_session_tells_it_too():
    """
    A session found in its container (after capsule restarted, or a kept
    one started again) is attached to by a relay exec that starts the
    keeper when none runs: it must know where the screen is.
    """
    docker = FakeDockerAPI()
    docker.add_container("alive", {"io.capsule.managed": "true", LABEL_INSTANCE: "t",
                                   LABEL_SESSION: SID})
    docker.keeper_output["alive"] = (100, 500)
    manager = recovered_manager(docker, Clock())
    manager.reconnect(SID, RecordingClient(), offset=300)
    [process] = docker.processes
    assert process.argv[:6] == ("capsule-keeper", "-r", "-b", str(1024 * 1024), "-o", "300")
    assert process.env[SCREEN_ENV] == screen_path(SID)


def test_the_direct_start_exec_tells_the_keeper_where_the_screen_is():
    docker = FakeDockerAPI()
    docker.default_address = "172.30.0.5"
    start_ok(docker)
    network = Network()
    clock = Clock()
    manager = SessionManager(docker, clock, SessionConfig(spec=SPEC, instance="t", grace=60,
                                                          replay_bytes=1024),
                             direct=DirectKeeper(clock, docker, connect=network.connect))
    session = manager.create(RecordingClient(), 80, 24)
    [run] = docker.commands_run
    assert run["argv"] == tuple(keeper_start_argv(("bash", "-l"), 1024))
    assert run["env"][SCREEN_ENV] == screen_path(session.id)


def test_without_the_keeper_the_shell_is_not_told():
    """
    --no-keeper: the exec is the shell itself, whose environment is the
    profile's only.
    """
    docker = FakeDockerAPI()
    manager = SessionManager(docker, Clock(), SessionConfig(spec=SPEC, instance="t", grace=60,
                                                            keeper=False))
    manager.create(RecordingClient(), 80, 24)
    [process] = docker.processes
    assert process.argv == ("bash", "-l")
    assert SCREEN_ENV not in process.env


def test_a_screen_file_round_trips():
    content = encode_screen(b"$ ls\r\nfile\r\n$ ", 1000)
    assert content == b"\x1b_capsule-screen;start=986\x1b\\$ ls\r\nfile\r\n$ "
    assert parse_screen(content) == (b"$ ls\r\nfile\r\n$ ", 1000)


TOO_FAR = b"\x1b_capsule-screen;start=%d\x1b\\ab" % (SCREEN_MAX_END + 1)


@pytest.mark.parametrize("content", [
    b"plain bytes",
    TOO_FAR,  # past the largest end a keeper believes
    b"\x1b_capsule-screen;start=\x1b\\ab",
    b"\x1b_capsule-screen;start=12",
    b"\x1b_capsule-screen;start=12345678901234567\x1b\\ab",  # 17 digits
    b"\x1b_capsule-screen;start=-1\x1b\\ab",
    b" \x1b_capsule-screen;start=9\x1b\\ab",
    b"\x1b_capsule-screen;end=9\x1b\\ab",
])
def test_a_screen_file_without_a_right_header_is_all_screen(content):
    """
    The whole file is the screen, ending at offset its length.
    """
    assert parse_screen(content) == (content, len(content))


def test_the_header_gives_the_offset_of_the_first_byte():
    assert parse_screen(b"\x1b_capsule-screen;start=2\x1b\\abcd") == (b"abcd", 6)
    assert parse_screen(b"\x1b_capsule-screen;start=7\x1b\\") == (b"", 7)


def test_encode_screen_refuses_what_no_keeper_believes():
    with pytest.raises(ValueError):
        encode_screen(b"abc", 2)
    with pytest.raises(ValueError):
        encode_screen(b"", SCREEN_MAX_END + 1)


@pytest.mark.parametrize("seconds, said", [
    (7 * 86400, "7 days"), (86400, "1 day"), (36 * 3600, "1 day"), (12 * 3600, "12 hours"),
    (3600, "1 hour"), (5400, "1 hour"), (120, "2 minutes"), (90, "90 seconds"), (1, "1 second"),
])
def test_a_retention_as_people_say_it(seconds, said):
    assert duration_text(seconds) == said
