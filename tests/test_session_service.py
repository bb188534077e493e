"""
The one way a session is opened (capsule.sessions.service), and what callers
ask of a session instead of its state's name: typed questions and Deferreds.
Against the in-memory engine and a Clock.
"""

import pytest

from capsule.core.admission import (QUOTA_EXCEEDED, SERVER_FULL, AdmissionControl,
                                    AdmissionPolicy, AdmissionRefused)
from capsule.core.profiles import BadRepository, UnknownProfile
from capsule.core.session_core import State
from capsule.core.spec import ContainerSpec
from capsule.sessions.drain import DRAIN_REFUSAL, DRAINING, Drain
from capsule.sessions.manager import SessionManager
from capsule.sessions.observers import SessionObserver
from capsule.sessions.service import OpenRequest, SessionService
from capsule.sessions.session import SessionConfig, SessionEnded
from tests.support.fakes import RecordingClient

from .in_memory import clock, docker  # noqa: F401 (fixtures)


class Opened(SessionObserver):
    def __init__(self):
        self.opened, self.ended = [], []

    def session_opened(self, session):
        self.opened.append(session.id)

    def session_ended(self, session):
        self.ended.append(session.id)


@pytest.fixture
def observer():
    return Opened()


@pytest.fixture
def manager(docker, clock, observer):
    return SessionManager(docker, clock, SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest"), instance="t", grace=60),
        observers=[observer])


def service_of(manager, clock, **policy):
    admission = AdmissionControl(manager, clock, AdmissionPolicy(
        **{"max_sessions": 10, "max_per_client": 10, "rate": None, **policy}))
    return SessionService(manager, admission, Drain(manager, clock))


def test_open_makes_a_session_counts_its_creator_and_tells_the_observers(
        manager, clock, observer):
    service = service_of(manager, clock, max_per_client=1)
    client = RecordingClient()
    session = service.open(client, OpenRequest(user="ann", address="192.0.2.1",
                                               size=(100, 30)))
    assert manager.sessions == {session.id: session}
    assert session.core.user == "ann" and session.core.size == (100, 30)
    assert client.kinds() == ["started"]
    assert observer.opened == [session.id]
    # Its creator was counted: a second one from the same address is over quota.
    with pytest.raises(AdmissionRefused) as caught:
        service.open(RecordingClient(), OpenRequest(user="ann", address="192.0.2.1"))
    assert caught.value.code == QUOTA_EXCEEDED
    assert len(manager.sessions) == 1 and observer.opened == [session.id]


def test_a_full_server_refuses_with_nothing_made(manager, docker, clock, observer):
    service = service_of(manager, clock, max_sessions=0)
    with pytest.raises(AdmissionRefused) as caught:
        service.open(None, OpenRequest(user=None, address="192.0.2.1", door="api"))
    assert caught.value.code == SERVER_FULL
    assert manager.sessions == {} and docker.containers == {} and observer.opened == []


def test_a_draining_server_refuses_before_admission_counts(manager, docker, clock):
    service = service_of(manager, clock, rate=(1, 3600))
    service.drain.start()
    with pytest.raises(AdmissionRefused) as caught:
        service.open(None, OpenRequest(user=None, address="192.0.2.1"))
    assert (caught.value.code, caught.value.message) == (DRAINING, DRAIN_REFUSAL)
    service.drain.stop()
    # The refused attempt cost nothing of the rate of one per hour.
    session = service.open(None, OpenRequest(user=None, address="192.0.2.1"))
    assert manager.sessions == {session.id: session}


@pytest.mark.parametrize("request_, error", [
    (OpenRequest(user=None, address="192.0.2.1", profile="nope"), UnknownProfile),
    (OpenRequest(user=None, address="192.0.2.1", repository="http://example.com/r.git"),
     BadRepository),
])
def test_what_a_request_names_is_refused_before_anything_is_counted(
        manager, docker, clock, request_, error):
    service = service_of(manager, clock, rate=(1, 3600))
    with pytest.raises(error):
        service.open(None, request_)
    assert docker.containers == {}
    service.open(None, OpenRequest(user=None, address="192.0.2.1"))
    assert len(manager.sessions) == 1


def test_without_admission_or_drain_anyone_may_open(manager):
    session = SessionService(manager).open(None, OpenRequest(user=None, address=None))
    assert manager.sessions == {session.id: session}


def test_started_fires_after_the_transition_and_may_ask_the_session_anything(
        manager, docker, clock):
    docker.hold_create = True
    session = SessionService(manager).open(None, OpenRequest(user=None, address=None))
    assert session.starting and not session.ready and session.state is State.STARTING
    heard = []
    session.started().addCallback(lambda s: heard.append((s.status(), s.ready)))
    docker.release_create()
    # Told once the lifecycle's transition is over, not from inside it.
    assert heard == []
    clock.advance(0)
    assert heard == [("detached", True)]
    assert not session.starting and not session.over and not session.attached
    # Asked again once it runs: at once.
    session.started().addCallback(heard.append)
    assert heard[-1] is session


def test_started_fails_when_the_session_ends_first(manager, docker, clock):
    docker.hold_create = True
    session = manager.create(RecordingClient(), 80, 24)
    failures = []
    session.started().addErrback(failures.append)
    ended = []
    session.ended().addCallback(ended.append)
    manager.end(session, "it was ended")
    clock.advance(0)
    [failure] = failures
    assert failure.check(SessionEnded) and failure.value.message == "it was ended"
    assert ended == [session] and session.over
    # Asked once it is over: at once.
    session.started().addErrback(failures.append)
    assert failures[-1].check(SessionEnded)
    session.ended().addCallback(ended.append)
    assert ended[-1] is session


def test_a_cancelled_wait_is_forgotten(manager, docker, clock):
    docker.hold_create = True
    session = manager.create(RecordingClient(), 80, 24)
    d = session.started()
    d.addErrback(lambda f: None)
    d.cancel()
    docker.release_create()
    clock.advance(0)
    assert session._started == []


def test_the_observers_hear_of_the_end_once(manager, observer, clock):
    session = manager.create(RecordingClient(), 80, 24)
    manager.end(session, "bye")
    manager.end(session, "again")
    assert observer.ended == [session.id]


def test_an_observer_that_fails_is_logged_and_the_session_goes_on(docker, clock):
    class Broken(SessionObserver):
        def session_output(self, session, data):
            raise ValueError("broken observer")

    seen = Opened()
    manager = SessionManager(docker, clock, SessionConfig(
        spec=ContainerSpec(image="capsule-runtime:latest"), instance="t"),
        observers=[Broken(), seen])
    client = RecordingClient()
    session = manager.create(client, 80, 24)
    docker.processes[0].emit(b"$ ")
    assert client.output == b"$ "
    manager.end(session, "bye")
    assert seen.ended == [session.id]
