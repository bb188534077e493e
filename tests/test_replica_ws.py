"""
A session another replica served, on the WebSocket, in memory (the client
of L{tests.in_memory}, an engine that says which replica holds each
container): it is taken over and attached with replay from the client's
offset; another user's, or none, is a 4404 as a missing one; one another
replica takes at the same moment is a 4503 to try again; a client whose
session another replica takes over hears a takeover (4409).
"""

from __future__ import annotations

import pytest

from capsule.sessions.replicas import Replicas
from capsule.sessions.service import SessionService
from capsule.sessions.session import LABEL_SESSION
from capsule.web.websocket_factory import CapsuleServerFactory

from .in_memory import Link, clock, make_manager  # noqa: F401 (fixtures)
from .test_kube_replicas import ClusterEngine, owned, replaced

SID = "6f9619ff-8b86-4011-b42d-00c04fc964ff"


@pytest.fixture
def docker():
    return ClusterEngine()


@pytest.fixture
def manager(docker, clock):
    manager = make_manager(docker, clock)
    manager.replicas = Replicas(manager, docker, clock, "ra")
    docker.add_container("pod", {**manager.labels, LABEL_SESSION: SID})
    docker.holders["pod"], docker.annotations["pod"] = "rb", owned(None)
    docker.keeper_output["pod"] = (0, 900)
    return manager


def connect(clock, manager, query: str) -> Link:
    factory = CapsuleServerFactory(manager, clock, sessions=SessionService(manager))
    return Link(clock, factory, query)


def test_another_replicas_session_is_taken_over_and_replayed(clock, manager, docker):
    link = connect(clock, manager, f"session_id={SID}&cols=100&rows=30")
    connected = link.new()[0]
    assert connected["type"] == "connected" and connected["session_id"] == SID
    assert connected["resumed"] is True
    assert docker.holders["pod"] == "ra" and SID in manager.sessions
    assert docker.processes[-1].argv[:2] == ("capsule-keeper", "-r")


def test_another_users_session_is_not_found(clock, manager, docker):
    docker.annotations["pod"] = owned("alice")
    link = connect(clock, manager, f"session_id={SID}")
    [error] = link.new()
    assert error["code"] == "session_not_found"
    assert link.client.closed[1] == 4404
    assert docker.holders["pod"] == "rb" and SID not in manager.sessions


def test_a_session_another_replica_takes_first_is_a_try_again(clock, manager, docker):
    docker.beaten["pod"] = "rc"
    link = connect(clock, manager, f"session_id={SID}")
    [error] = link.new()
    assert error["code"] == "docker_unavailable"
    assert "try again" in error["message"]
    assert link.client.closed[1] == 4503


def test_a_client_whose_session_another_replica_took_hears_a_takeover(clock, manager,
                                                                        docker):
    """
    The session this client is attached to here is taken over by replica
    rb (the pod says rb, and the keeper replaced this replica's attach):
    the client is told as a tab another tab displaced is (C{taken_over},
    4409), not that the session ended; the pod is left alone.
    """
    link = connect(clock, manager, f"session_id={SID}&cols=100&rows=30")
    assert link.new()[0]["type"] == "connected"
    shell = docker.processes[-1]
    docker.holders["pod"] = "rb"
    replaced(shell)
    link.flush()
    frames = link.new()
    assert [f.get("type") for f in frames] == ["error"], frames
    assert frames[0]["code"] == "taken_over"
    assert link.client.closed[1] == 4409
    assert SID not in manager.sessions
    assert "pod" in docker.containers and docker.removed == []
