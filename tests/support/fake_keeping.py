"""
A keeping in memory for the web's tests (the API and the WebSocket): what
L{capsule.sessions.keeping.Keeping} offers, done on the manager and the fake
engine the simplest way, with each call recorded, and the disk copies (fork,
snapshot) held until a test lets them go (L{FakeKeeping.hold_copies}).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed

from capsule.core.errors import CapsuleError, SessionNotFound
from capsule.core.kept import (KEPT_LIMIT, SNAPSHOT_NOT_FOUND, KeptSession, Snapshot,
                               closing_outcome)
from capsule.core.profiles import LABEL_PROFILE, LABEL_USER

RETENTION = 7 * 86400.0


class FakeKeeping:
    def __init__(self, manager, docker, clock, retention: float = RETENTION,
                 max_snapshots: int = 20) -> None:
        self.manager, self.docker, self.clock = manager, docker, clock
        self.retention = retention
        self.max_snapshots = max_snapshots
        self.kept_sessions: dict[str, KeptSession] = {}
        self.named: list[Snapshot] = []
        self.calls: list[tuple] = []
        # While set, forks and snapshots wait for their Deferred here.
        self.held: list[Deferred] | None = None

    def hold_copies(self) -> None:
        self.held = []

    def release_copies(self) -> None:
        held, self.held = self.held or [], None
        for d in held:
            d.callback(None)

    def _copy(self) -> Deferred:
        if self.held is None:
            return succeed(None)
        d = Deferred()
        self.held.append(d)
        return d

    # -- what is kept ------------------------------------------------------------

    def retention_of(self, settings) -> float:
        own = getattr(settings, "retention", None)
        return self.retention if own is None else float(own)

    def on_close(self, session) -> dict:
        return closing_outcome(self.retention, self.manager.config.grace, self.clock.seconds())

    def kept(self, user):
        return sorted((k for k in self.kept_sessions.values() if k.user == user),
                      key=lambda k: k.kept_at)

    def kept_all(self):
        return sorted(self.kept_sessions.values(), key=lambda k: k.kept_at)

    def find(self, session_id, user):
        kept = self.kept_sessions.get(session_id)
        return kept if kept is not None and kept.user == user else None

    def add(self, session_id: str, user=None, profile="shell", kept_at=None) -> KeptSession:
        """
        A kept session, as if put away earlier (its container stopped).
        """
        container_id = f"kept-{session_id[:8]}"
        self.docker.add_container(container_id, {**self.manager.labels,
                                                 "io.capsule.session": session_id})
        self.docker.containers[container_id]["state"] = "exited"
        now = self.clock.seconds()
        kept = KeptSession(id=session_id, container_id=container_id, user=user,
                           profile=profile, created=now - 100,
                           kept_at=now if kept_at is None else kept_at,
                           retention=self.retention, reason="put_away", size=4096,
                           command="bash -l")
        self.kept_sessions[session_id] = kept
        return kept

    # -- the work --------------------------------------------------------------------

    def put_away(self, session, reason):
        self.calls.append(("put_away", session.id, reason))
        kept = self.add(session.id, session.core.user, session.profile)
        # The live session goes; its container is the kept one's.
        self.manager.end(session, "put away")
        return succeed(kept)

    def resume(self, session_id, user):
        self.calls.append(("resume", session_id, user))
        kept = self.find(session_id, user)
        if kept is None:
            return fail(SessionNotFound(f"session {session_id} does not exist"))
        del self.kept_sessions[session_id]
        self.docker.containers[kept.container_id]["state"] = "running"
        session = self.manager.recovered_session(session_id, kept.container_id, user)
        session.events.recover()
        return succeed(session)

    def delete(self, session_id, user):
        self.calls.append(("delete", session_id, user))
        kept = self.kept_sessions.pop(session_id)
        self.docker.containers.pop(kept.container_id, None)
        return succeed(None)

    def _source(self, session_id, user):
        live = self.manager.find(session_id, user)
        if live is not None:
            return live.profile
        kept = self.find(session_id, user)
        if kept is None:
            raise SessionNotFound(f"session {session_id} does not exist")
        return kept.profile

    def fork(self, session_id, user):
        self.calls.append(("fork", session_id, user))
        profile = self._source(session_id, user)
        d = self._copy()
        d.addCallback(lambda _: self.manager.create(None, 80, 24, user=user,
                                                    profile=profile).id)
        return d

    def snapshots(self, user):
        return succeed([s for s in self.named if s.labels.get(LABEL_USER) == (user or "")])

    def snapshot(self, session_id, user, name):
        self.calls.append(("snapshot", session_id, user, name))
        profile = self._source(session_id, user)
        mine = [s for s in self.named if s.labels.get(LABEL_USER) == (user or "")]
        if any(s.name == name for s in mine):
            return fail(CapsuleError(f"there is a snapshot named {name} already",
                                     "snapshot_exists"))
        if len(mine) >= self.max_snapshots:
            return fail(CapsuleError(f"you keep {len(mine)} snapshots, the most allowed",
                                     KEPT_LIMIT))
        snapshot = Snapshot(image=f"capsule-snapshot:t-{name}", volumes={},
                            labels={**self.manager.labels, "io.capsule.snapshot": name,
                                    LABEL_USER: user or "", LABEL_PROFILE: profile},
                            created=self.clock.seconds(), size=1234)
        d = self._copy()

        def made(_):
            self.named.append(snapshot)
            return snapshot
        return d.addCallback(made)

    def delete_snapshot(self, name, user):
        self.calls.append(("delete_snapshot", name, user))
        self.named = [s for s in self.named
                      if not (s.name == name and s.labels.get(LABEL_USER) == (user or ""))]
        return succeed(None)

    def start_snapshot(self, name, user):
        self.calls.append(("start_snapshot", name, user))
        for s in self.named:
            if s.name == name and s.labels.get(LABEL_USER) == (user or ""):
                d = self._copy()
                d.addCallback(lambda _: self.manager.create(
                    None, 80, 24, user=user, profile=s.labels.get(LABEL_PROFILE)).id)
                return d
        return fail(CapsuleError(f"there is no snapshot named {name}", SNAPSHOT_NOT_FOUND))
