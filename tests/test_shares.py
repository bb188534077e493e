"""
Read-only share links: the store (tokens, expiry, revocation, constant-time
checks), the spectators of a session over in-memory WebSockets (replay,
live output, input refused, revocation, expiry, the session's end, the cap,
a slow spectator), and the share routes of the session API.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock

from capsule.core import shares as shares_module
from capsule.core.shares import ShareRefused, ShareStore, digest
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.sessions.spectators import Spectators
from capsule.web.websocket_factory import CapsuleServerFactory

from .in_memory import (  # noqa: F401 (fixtures)
    SPEC, Link, clock, docker)

WINDOW = 4096
SID = "0" * 8 + "-0000-4000-8000-" + "0" * 12


# -- the store ---------------------------------------------------------------------------

def test_a_token_is_random_and_kept_only_as_its_digest():
    store = ShareStore(Clock())
    share, token = store.create(SID)
    other, token2 = store.create(SID)
    assert token != token2 and len(token) >= 43
    assert share.digest == digest(token)
    assert token not in repr(vars(share)) and token.encode() not in share.digest
    assert store.find(token) is share and store.find(token2) is other
    assert store.find(token[:-1]) is None and store.find("") is None
    assert store.find("x" * 10_000) is None and store.find(None) is None


def test_a_share_expires_by_the_clock():
    clock = Clock()
    store = ShareStore(clock, default_ttl=60, max_ttl=600)
    share, token = store.create(SID)
    short, short_token = store.create(SID, ttl=10)
    assert share.expires_at == 60 and short.expires_at == 10
    clock.advance(9.9)
    assert store.find(short_token) is short
    clock.advance(0.1)
    assert store.find(short_token) is None and store.find(token) is share
    clock.advance(50)
    assert store.find(token) is None and len(store) == 0


def test_a_lifetime_past_the_maximum_is_refused():
    store = ShareStore(Clock(), default_ttl=60, max_ttl=600)
    for ttl in (0, -1, 601, float("inf"), float("nan"), True, "60"):
        with pytest.raises(ShareRefused) as e:
            store.create(SID, ttl=ttl)
        assert e.value.code == "bad_request"
    assert store.create(SID, ttl=600)[0].expires_at == 600


def test_revoking_and_a_session_s_end_forget_shares():
    store = ShareStore(Clock())
    share, token = store.create(SID)
    kept, kept_token = store.create("other")
    assert store.get(SID, share.id) is share and store.get(SID, kept.id) is None
    store.revoke(share)
    assert store.find(token) is None and store.of_session(SID) == []
    assert store.drop_session("other") == [kept] and store.find(kept_token) is None


def test_a_session_has_a_bounded_number_of_shares():
    store = ShareStore(Clock(), per_session=2)
    store.create(SID)
    store.create(SID)
    with pytest.raises(ShareRefused) as e:
        store.create(SID)
    assert e.value.code == "too_many_shares"


def test_a_found_token_is_compared_in_constant_time(monkeypatch):
    compared = []
    real = shares_module.hmac.compare_digest

    def compare(a, b):
        compared.append((a, b))
        return real(a, b)
    monkeypatch.setattr(shares_module.hmac, "compare_digest", compare)
    store = ShareStore(Clock())
    share, token = store.create(SID)
    assert store.find(token) is share
    assert compared == [(share.digest, digest(token))]


# -- spectators over the WebSocket -----------------------------------------------------------

@pytest.fixture
def spectators(clock):
    return Spectators(clock, ShareStore(clock, default_ttl=60, max_ttl=600), per_session=2)


@pytest.fixture
def manager(docker, clock, spectators):
    return SessionManager(docker, clock, SessionConfig(spec=SPEC, instance="t", grace=60,
                                                       replay_bytes=64 * 1024),
                          observers=[spectators])


@pytest.fixture
def factory(manager, clock, spectators):
    return CapsuleServerFactory(manager, clock, max_message_size=1024, flow_window=WINDOW,
                                spectators=spectators, watch_backlog=8192)


@pytest.fixture
def connect(clock, factory):
    def connect(query: str = "", binary: bool = True) -> Link:
        return Link(clock, factory, query, binary)
    return connect


def owned(connect, manager, docker):
    """
    An owner's connection with a session that printed a prompt.
    """
    owner = connect()
    owner.send({"type": "resize", "cols": 80, "rows": 24})
    [session] = manager.sessions.values()
    docker.processes[0].emit(b"welcome\r\n$ ")
    owner.flush()
    owner.new()
    return owner, session


def output(link: Link) -> bytes:
    return b"".join(m for m in link.new() if isinstance(m, bytes))


def test_a_spectator_gets_the_replay_then_live_output(connect, manager, docker, spectators):
    owner, session = owned(connect, manager, docker)
    share, token = spectators.share(session)
    watcher = connect(f"watch={token}")
    [connected, replay] = watcher.new()
    assert connected == {"type": "connected", "session_id": None, "resumed": False,
                         "read_only": True, "expires_in": 60, "replay": 11,
                         "cols": 80, "rows": 24, "offset": 0, "window": WINDOW}
    assert replay == b"welcome\r\n$ "
    # The owner is still attached, and hears that one watches.
    assert session.client is owner.server
    owner.flush()
    assert owner.new() == [{"type": "watchers", "count": 1}]
    docker.processes[0].emit(b"ls\r\n")
    watcher.flush()
    owner.flush()
    assert output(watcher) == b"ls\r\n" and output(owner) == b"ls\r\n"
    # The owner's size is the spectator's.
    owner.send({"type": "resize", "cols": 132, "rows": 43})
    watcher.flush()
    assert watcher.new() == [{"type": "size", "cols": 132, "rows": 43}]
    assert spectators.shares(session)[0]["watchers"] == 1


def test_a_spectator_cannot_type_or_resize(connect, manager, docker, spectators):
    owner, session = owned(connect, manager, docker)
    _, token = spectators.share(session)
    watcher = connect(f"watch={token}")
    watcher.new()
    process = docker.processes[0]
    written, resizes = list(process.written), list(process.resizes)
    watcher.send_raw(b"rm -rf /\r", binary=True)
    watcher.send({"type": "input", "data": "reboot\r"})
    watcher.send({"type": "resize", "cols": 10, "rows": 5})
    assert process.written == written and process.resizes == resizes
    [error] = watcher.new()
    assert error["type"] == "error" and error["code"] == "read_only"
    watcher.still_open()
    assert session.client is owner.server and session.core.size == (80, 24)


def test_a_spectator_never_takes_the_owner_over(connect, manager, docker, spectators):
    owner, session = owned(connect, manager, docker)
    _, token = spectators.share(session)
    watchers = [connect(f"watch={token}"), connect(f"watch={token}")]
    assert all(w.is_open for w in watchers)
    owner.flush()
    assert owner.new() == [{"type": "watchers", "count": 1}, {"type": "watchers", "count": 2}]
    owner.still_open()
    assert session.client is owner.server


def test_past_the_cap_a_spectator_is_refused(connect, manager, docker, spectators):
    _, session = owned(connect, manager, docker)
    _, token = spectators.share(session)
    connect(f"watch={token}")
    connect(f"watch={token}")
    third = connect(f"watch={token}")
    [error] = third.new()
    assert error["code"] == "too_many_watchers"
    assert third.client.closed[1] == 4429


def test_a_spectator_is_not_a_session(connect, manager, docker, spectators):
    _, session = owned(connect, manager, docker)
    _, token = spectators.share(session)
    connect(f"watch={token}")
    assert list(manager.sessions) == [session.id] and len(docker.processes) == 1


def test_a_bad_token_is_refused_with_4410(connect, manager, docker, spectators):
    owned(connect, manager, docker)
    watcher = connect("watch=nothing-like-a-token")
    [error] = watcher.new()
    assert error["code"] == "share_not_found"
    assert watcher.client.closed[1] == 4410


def test_revoking_closes_its_spectators(connect, manager, docker, spectators):
    owner, session = owned(connect, manager, docker)
    share, token = spectators.share(session)
    other, other_token = spectators.share(session)
    watcher, stays = connect(f"watch={token}"), connect(f"watch={other_token}")
    watcher.new()
    stays.new()
    owner.flush()
    owner.new()
    assert spectators.revoke(session, share.id)
    watcher.flush()
    [error] = watcher.new()
    assert error["code"] == "share_not_found" and "revoked" in error["message"]
    assert watcher.client.closed[1] == 4410
    stays.still_open()
    owner.flush()
    assert owner.new() == [{"type": "watchers", "count": 1}]
    assert not spectators.revoke(session, share.id)
    assert connect(f"watch={token}").client.closed[1] == 4410


def test_an_expired_link_closes_its_spectators(connect, manager, docker, spectators, clock):
    _, session = owned(connect, manager, docker)
    _, token = spectators.share(session, ttl=30)
    watcher = connect(f"watch={token}")
    watcher.new()
    clock.advance(30)
    watcher.flush()
    [error] = watcher.new()
    assert "expired" in error["message"] and watcher.client.closed[1] == 4410
    assert connect(f"watch={token}").client.closed[1] == 4410


def test_a_link_dies_with_its_session(connect, manager, docker, spectators):
    _, session = owned(connect, manager, docker)
    _, token = spectators.share(session)
    watcher = connect(f"watch={token}")
    watcher.new()
    manager.end(session, "ended by a test")
    watcher.flush()
    [error] = watcher.new()
    assert "the session ended" in error["message"] and watcher.client.closed[1] == 4410
    assert spectators.store.of_session(session.id) == []
    assert connect(f"watch={token}").client.closed[1] == 4410


def test_a_spectator_that_acks_nothing_is_closed_and_never_slows_the_session(
        connect, manager, docker, spectators):
    owner, session = owned(connect, manager, docker)
    _, token = spectators.share(session)
    watcher = connect(f"watch={token}")
    watcher.new()
    process = docker.processes[0]
    # The owner acknowledges all it gets; the spectator nothing.
    for i in range(20):
        process.emit(bytes([65 + i % 26]) * 1000)
        owner.flush()
        got = sum(len(m) for m in owner.new() if isinstance(m, bytes))
        owner.send({"type": "ack", "offset": owner.server._sent})
        assert got == 1000
        if not watcher.is_open:
            break
    watcher.flush()
    errors = [m for m in watcher.new() if isinstance(m, dict)]
    assert errors[-1]["code"] == "too_slow"
    assert watcher.client.closed[1] == 4411
    # Nothing was paused for it.
    assert session.client is owner.server and not process.paused
    assert spectators.count(session.id) == 0


def test_an_acking_spectator_gets_everything(connect, manager, docker, spectators, clock):
    _, session = owned(connect, manager, docker)
    _, token = spectators.share(session)
    watcher = connect(f"watch={token}")
    got = output(watcher)
    process = docker.processes[0]
    sent = b"welcome\r\n$ "
    for i in range(30):
        chunk = bytes([65 + i % 26]) * 700
        sent += chunk
        process.emit(chunk)
        watcher.flush()
        got += output(watcher)
        watcher.send({"type": "ack", "offset": watcher.server._sent})
        clock.advance(0.01)
        watcher.flush()
        got += output(watcher)
    assert got == sent and watcher.is_open


def test_the_access_log_leaves_the_token_out():
    from capsule.web.site import _WATCH_TOKEN
    line = '127.0.0.1 - - [x] "GET /ws?watch=abc-DEF_123&x=1 HTTP/1.1" 101 0 "-" "-"'
    assert "abc-DEF_123" not in _WATCH_TOKEN.sub(r"\1...", line)
    assert "watch=...&x=1" in _WATCH_TOKEN.sub(r"\1...", line)


def test_an_owner_that_comes_back_hears_how_many_watch(connect, manager, docker, spectators,
                                                       clock):
    owner, session = owned(connect, manager, docker)
    _, token = spectators.share(session)
    watcher = connect(f"watch={token}")
    watcher.new()
    owner.close()
    back = connect(f"session_id={session.id}")
    clock.advance(0)
    back.flush()
    assert {"type": "watchers", "count": 1} in back.new()
    # The spectator watched on meanwhile.
    docker.processes[-1].emit(b"still here\r\n")
    watcher.flush()
    assert b"still here" in output(watcher)


def test_a_json_spectator_gets_base64_output_and_no_offsets(connect, manager, docker,
                                                            spectators):
    _, session = owned(connect, manager, docker)
    _, token = spectators.share(session)
    watcher = connect(f"watch={token}", binary=False)
    connected, replay = watcher.new()
    assert connected["read_only"] is True and "offset" not in connected
    assert replay["type"] == "output"
