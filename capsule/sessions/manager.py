"""
The registry of a server's sessions: makes, finds, reconnects, ends and
expires them, and does the work their lifecycles ask for
(L{ISessionEffects}) through the engine it is given (an L{IDockerAPI}),
with the clock it is given.

Its other jobs have modules of their own: the shell's stream
(L{capsule.engine.keeper_stream}) and starting it
(L{capsule.sessions.shell_start}), why a stream closed and waiting out the
engine (L{capsule.sessions.engine_watch}), CPU fair share
(L{capsule.sessions.fair_share}), recovery after a restart
(L{capsule.sessions.recovery}); opening a session for a client is
L{capsule.sessions.service}'s, and who watches sessions
L{capsule.sessions.observers}'.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from functools import partial

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from capsule.core.errors import CapsuleError, ContainerGone, DockerUnavailable, SessionNotFound
from capsule.core.kept import Snapshot
from capsule.core.keeper import SECRET_BYTES, SECRET_LABEL, has_own_address, parse_secret
from capsule.core.session_core import ISessionEffects, SessionCore, State
from capsule.core.profiles import (DEFAULT_PROFILE, LABEL_PROFILE, LABEL_USER, LABEL_VOLUME,
                                   BadRepository, Profile, agent_volume_name, check_repository,
                                   parse_profile_name)
from capsule.core.replay import ReplayBuffer
from capsule.core.spec import ContainerSpec
from capsule.sessions.engine_watch import EngineWatch
from capsule.sessions.fair_share import FairShare
from capsule.sessions.forks import from_snapshot, holder_spec
from capsule.sessions.keeping import LABEL_WARM, Keeping
from capsule.core.counting import Uncounted
from capsule.sessions.observers import SessionObservers
from capsule.sessions.pool import WarmPool, WarmPools
from capsule.sessions.recovery import Recovery
from capsule.sessions.shell_start import ShellStarter
from capsule.sessions.session import (LABEL_INSTANCE, LABEL_MANAGED, LABEL_SESSION, WARM_SIZE,
                                      Session, SessionConfig, shell_profile)

_log = Logger()


def _message(failure: Failure) -> tuple[str, str]:
    if failure.check(CapsuleError):
        return failure.value.message, failure.value.code
    return f"the session could not be started: {failure.getErrorMessage()}", "start_failed"


@implementer(ISessionEffects)
class SessionManager:
    """
    Creates, reconnects, ends and expires sessions; does the work their
    lifecycles ask for.

    @param metrics: what it counts into (L{capsule.ops.metrics}), also told
        what happens to sessions; default: nothing is counted.
    @param owners: the users of sessions, kept across a restart
        (L{capsule.sessions.owners}); told what happens to sessions, and
        asked whose an earlier run's session is.
    @param observers: others told what happens to sessions (recordings).
    @param pool_room: whether the server has room for one more warm session
        beyond a pool's size (see L{WarmPool}); default: always.
    @param keeping: how sessions are kept (L{capsule.sessions.keeping.KeepingConfig});
        C{None} (the default): never (C{keeping} is C{None}; sessions are
        removed as they end).
    @param session_environment: callables C{(session_id, profile)} each
        returning variables for the environment of that session's container
        (a feature's: the credential gateway's placeholder, git's and the
        egress proxy's settings), merged in turn over the profile's when the
        container is made.

    @ivar sessions: the live sessions by id.
    @ivar recovery: finds the sessions of an earlier run (L{Recovery}).
    @ivar keeping: the kept sessions, and putting away, resuming, forking
        (L{Keeping}); C{None}: sessions are never kept.
    """

    # When a client last sent input to any session (the warm pools refill
    # between keystrokes, see capsule.sessions.pool).
    typed_at = float("-inf")

    def __init__(self, docker, clock, config: SessionConfig, *, metrics=None, owners=None,
                 observers=(), memory=None, direct=None, pool_room=None,
                 door=None, session_environment=(), keeping=None) -> None:
        self._docker = docker
        # The session door (capsule.gateway.door: its port and factory), or
        # None: a session without a network reaches it over its keeper's
        # channels (capsule.engine.channels).
        self._door = door
        # What sessions' environments get besides their profile's: each a
        # callable (session id, profile) -> dict (the gateway's door URL and
        # placeholders, the egress proxy's variables).
        self._session_environment = tuple(session_environment)
        # The memory accounting (capsule.core.memory.MemoryBudget): a warm
        # pool refills only while its next session fits.
        self.memory = memory
        # The direct path to keepers (capsule.engine.keeper_direct), or None:
        # relay execs only.
        self._direct = direct if config.keeper else None
        self._clock = clock
        self.config = config
        self.sessions: dict[str, Session] = {}
        self.metrics = metrics if metrics is not None else Uncounted()
        self.observers = SessionObservers([self.metrics, owners, *observers])
        # Starting sessions' shells in their containers (and attaching again).
        self.shells = ShellStarter(
            docker, lambda: self.config, settings=lambda s: s.settings or self.profiles[DEFAULT_PROFILE],
            has_volume=self._has_volume, direct=self._direct, door=door,
            observers=self.observers)
        self.recovery = Recovery(self, docker, owners)
        # The other replicas on a cluster (capsule.sessions.replicas), or
        # None: this server is the only one.
        self.replicas = None
        self.keeping = (Keeping(self, docker, clock, keeping, owners) if keeping is not None
                        else None)
        self.fair_share = FairShare(docker, self.sessions, config.spec.cpu_shares)
        self.engine_watch = EngineWatch(docker, clock, self._spec_of, config.keeper,
                                        config.grace,
                                        stopped=self.keeping and self.keeping.stopped)
        # Container removals under way, and containers being made (created
        # and started: one ended meanwhile is removed once its id is known),
        # which a stopping server waits for.
        self._removals: set[Deferred] = set()
        self._creating: set[Deferred] = set()
        self.profiles: dict[str, Profile] = dict(config.profiles or {
            DEFAULT_PROFILE: shell_profile(config)})
        # A warm pool per profile that wants one (see capsule.sessions.pool); none for
        # a profile with a user's volume, which cannot be made ahead of its user.
        self.pool = WarmPools({
            name: WarmPool(clock, settings.pool, partial(self._warm_session, settings),
                           max_age=config.pool_max_age, name=name,
                           typed_at=lambda: self.typed_at, observer=self.observers,
                           busy=self._clients_starting, grow_by=config.pool_grow_by,
                           window=config.pool_window, room=pool_room,
                           fits=None if memory is None else partial(self._warm_fits, settings))
            for name, settings in self.profiles.items()
            if settings.pool > 0 and not settings.agent_volume})
        for name, settings in self.profiles.items():
            if settings.pool > 0 and settings.agent_volume:
                _log.warn("profile {profile} gets no warm pool: its sessions have a user's"
                          " volume, which cannot be made before its user comes", profile=name)
        # Profiles with an agent volume whose sessions had none (no users):
        # said once each.
        self._volume_refused: set[str] = set()

    def _warm_fits(self, settings: Profile) -> bool:
        return self.memory.room_for_warm(self.sessions.values(), self.pool.held, settings)

    def give_up_warm(self) -> int:
        """
        End warm sessions while the live and warm ones together are over
        the memory budget (a user's session took their place); how many.
        """
        if self.memory is None:
            return 0
        return self.pool.give_up(
            lambda: self.memory.excess(self.sessions.values(), self.pool.held))

    def _clients_starting(self) -> bool:
        """
        Whether a client's session is being made (the warm pools' refills
        wait for them: users first).
        """
        return any(s.starting for s in self.sessions.values())

    @property
    def labels(self) -> dict[str, str]:
        """
        The labels every container of this server carries.
        """
        return {LABEL_MANAGED: "true", LABEL_INSTANCE: self.config.instance}

    def _new_session(self, session_id: str, size: tuple[int, int], **fields) -> Session:
        now = self._clock.seconds()
        session = Session(SessionCore(
            id=session_id, clock=self._clock, effects=self,
            replay=ReplayBuffer(self.config.replay_bytes), size=size,
            max_pending_input=self.config.max_pending_input,
            max_input_overrun=self.config.max_input_overrun, created_at=now, active_at=now,
            **fields))
        self.sessions[session_id] = session
        return session

    def recovered_session(self, session_id: str, container_id: str,
                          user: str | None) -> Session:
        """
        A session of an earlier run, found in its container (see
        L{Recovery}): registered, its lifecycle not yet told.
        """
        session = self._new_session(session_id, WARM_SIZE, container_id=container_id,
                                    user=user)
        session.ran = True
        return session

    # -- what clients ask for --------------------------------------------

    def create(self, client, cols: int, rows: int, user: str | None = None,
               profile: str | None = None, repository: str | None = None,
               snapshot: Snapshot | None = None, fork_of: str | None = None) -> Session:
        """
        Start a new session for C{client} (acting for C{user}), which is told
        through C{session_started} or C{session_failed}.

        @param profile: the name of its profile (default: C{shell}).
        @param repository: an https git URL cloned into its /workspace at
            start (default: its profile's, if any).
        @raise UnknownProfile: naming the profiles there are (nothing made).
        @raise BadRepository: for a repository capsule refuses.
        @param snapshot: a snapshot (L{capsule.core.kept.Snapshot}) whose
            image the container is made of and whose volumes it mounts and
            owns (L{Keeping}); its profile's repository is not cloned again.
        @param fork_of: a container whose files the container's are a copy
            of (L{IDockerAPI.fork_container}: a fork, L{Keeping}); its
            profile's repository is not cloned again.

        Without a client (C{client} is C{None}), the session is made all the
        same and, once its shell runs, kept for the grace period like one
        whose client left: a client attaches with L{reconnect} (from offset
        0 it gets all the output so far).  One that could not be made is
        forgotten, its C{core.message} saying why.
        """
        settings = parse_profile_name(
            self.config.default_profile if profile is None else profile, self.profiles)
        if repository is not None:
            try:
                check_repository(repository)
            except (TypeError, ValueError) as e:
                raise BadRepository(f"repository: {e}") from None
        # A warm session has no user's volume and cloned only its profile's
        # repository.
        pooled = snapshot is None and fork_of is None and repository in (None, settings.repository) and not (
            settings.agent_volume and self._has_volume(user))
        warm = self.pool.take(settings.name) if pooled else None
        if warm is not None:
            return self._hand_warm(warm, client, cols, rows, user)
        session = self._new_session(str(uuid.uuid4()), (cols, rows), client=client, user=user)
        session.profile, session.settings = settings.name, settings
        session.repository = repository or settings.repository
        if snapshot is not None:
            session.repository = None
            session.snapshot, session.own_volumes = snapshot, dict(snapshot.volumes)
        if fork_of is not None:
            session.repository, session.fork_of = None, fork_of
        if client is None:
            session.events.prepare()
        else:
            session.events.start()
        return session

    def _warm_session(self, settings: Profile) -> Session:
        """
        A session for the warm pool of profile C{settings}: made like any
        other, at the size most terminals open with, and known to nobody
        until it is taken.
        """
        session = self._new_session(str(uuid.uuid4()), WARM_SIZE, warm=True)
        del self.sessions[session.id]
        session.pooled = True
        session.profile, session.settings = settings.name, settings
        session.repository = settings.repository
        return session

    def _hand_warm(self, session: Session, client, cols: int, rows: int,
                   user: str | None) -> Session:
        """
        Give a warm session to C{client} (C{None}: nobody yet) acting for
        C{user}, without a Docker call: attach the client, which gets all the
        output so far, and resize the terminal to its size (the shell
        redraws its prompt on SIGWINCH).
        """
        core = session.core
        now = self._clock.seconds()
        waited = now - core.created_at
        core.user, core.warm = user, True
        # Its container says it was warm: stopped, it is a kept session only
        # if recorded as taken.
        if self.keeping is not None:
            self.keeping.taken(session)
        # Its lifetime and idleness count from now: it is this client's now.
        core.created_at = core.active_at = now
        self.sessions[session.id] = session
        session.pooled = False
        if client is None:
            core.left_at = now
        else:
            session.events.take(client)
        self.resize(session, cols, rows)
        printed, _ = core.replay.since(core.replay.start)
        if printed:
            # Its recording begins with what it printed while it waited.
            self.observers.session_output(session, printed)
        self.observers.session_started(session, True, 0.0)
        _log.info("session {session_id}{who} started in 0 ms (warm, ready for {waited:.0f} s,"
                  " container {container})", session_id=session.id[:8], waited=waited,
                  container=core.container_id[:12],
                  who=f" of {user}" if user else "", user=user)
        core.cpu_shares = session.settings.spec.cpu_shares
        self.fair_share.share(user)
        return session

    def find(self, session_id: str, user: str | None = None) -> Session | None:
        """
        The live session C{session_id} if C{user} may use it: a session of
        another user is, to that user, a session that does not exist.
        """
        session = self.sessions.get(session_id)
        if session is None or session.core.user != user:
            return None
        return session

    def of_user(self, user: str | None) -> list[Session]:
        """
        The live sessions C{user} created.
        """
        return [s for s in self.sessions.values() if s.core.user == user]

    def reconnect(self, session_id: str, client, offset: int | None = None,
                  user: str | None = None) -> Session:
        """
        Attach C{client} to an existing session.  A client already attached
        is let go (told C{session_taken_over}).

        @param offset: the offset up to which the client has the output; if
            C{None}, what was handed to the previous client counts.

        @raise SessionNotFound: if there is no such live session.
        """
        session = self.find(session_id, user)
        if session is None and self.recovery.pending:
            raise DockerUnavailable(
                "capsule has not found the sessions of its earlier run yet (the Docker engine"
                " does not answer): try again shortly")
        if session is None:
            raise SessionNotFound(
                f"session {session_id} does not exist: it ended, or expired"
                f" {self.config.grace:g} s after its last client left"
            )
        if session.client is not None:
            _log.info("session {session_id}{who} taken over by a new connection",
                      session_id=session_id[:8],
                      who=f" of {session.core.user}" if session.core.user else "",
                      user=session.core.user)
        else:
            _log.info("session {session_id}{who} reconnected", session_id=session_id[:8],
                      who=f" of {session.core.user}" if session.core.user else "",
                      user=session.core.user)
        self.observers.session_reconnected(session)
        session.events.attach(client, offset)
        return session

    def detach(self, session: Session, client, unsent: int = 0) -> None:
        """
        C{client} has gone away, and the last C{unsent} bytes of output
        handed to it never went out.  The session lives on for the grace
        period.
        """
        if session.client is not client:
            return
        session.events.detach(client, unsent)
        if session.state in (State.DETACHED, State.INTERRUPTED, State.REATTACHING):
            _log.info("client left session {session_id}{who}; it is kept for {grace:g} s",
                      session_id=session.id[:8], grace=self.config.grace,
                      who=f" of {session.core.user}" if session.core.user else "",
                      user=session.core.user)

    def after_last_client(self, session: Session) -> tuple[float, bool]:
        """
        What becomes of C{session} once its last client has left: the
        seconds it lives on (the grace period), and whether anything keeps
        it past them (its profile's retention: it is then kept, its
        /workspace with it; else it ends, and its container goes).  Its
        client is told, so that a page can say so before its tab is closed.
        """
        settings = session.settings or self.profiles[DEFAULT_PROFILE]
        kept = self.keeping is not None and self.keeping.retention_of(settings) > 0
        return self.config.grace, kept

    def visited(self, session: Session) -> None:
        """
        Someone used C{session} without a client (the API): that counts as a
        visit (one without a client is kept for the grace period from now)
        and as activity (for the idle timeout).
        """
        now = self._clock.seconds()
        core = session.core
        core.active_at = max(core.active_at, now)
        if core.left_at is not None:
            core.left_at = now

    def write(self, session: Session, data: bytes) -> None:
        self.typed_at = self._clock.seconds()
        session.events.write(data)

    def resize(self, session: Session, cols: int, rows: int) -> None:
        session.events.resize(cols, rows)
        self.observers.session_resized(session, cols, rows)

    def expire(self, session: Session) -> bool:
        """
        End a session whose grace period is over, or put it away where its
        profile keeps sessions (L{Keeping}); return whether it ended.  (With
        replicas, once its holder is known to be this replica: see
        L{capsule.sessions.replicas.Replicas.may_expire}.)
        """
        if self.replicas is not None and not self.replicas.may_expire(session):
            return False
        if self.keeping is not None and self.keeping.grace_ended(session):
            return session.over
        expired = session.events.expire()
        if expired:
            _log.info("session {session_id}{who} expired after {grace:g} s without a client",
                      session_id=session.id[:8], grace=self.config.grace,
                      who=f" of {session.core.user}" if session.core.user else "",
                      user=session.core.user)
        return expired

    def end(self, session: Session, message: str, exit_code: int | None = None) -> None:
        session.events.end(exit_code, message)

    # -- ISessionEffects: the work lifecycles ask for ------------------------

    def make(self, session: Session) -> None:
        d = Deferred.fromCoroutine(self._make(session))
        d.addErrback(self._make_failed, session)

    async def _make(self, session: Session) -> None:
        core = session.core
        spec = self._container_spec(session.id, session.settings, core.user,
                                    warm=session.pooled, snapshot=session.snapshot)
        if session.fork_of is not None:
            creating = Deferred.fromCoroutine(self.keeping.forks.make_container(session, spec))
        else:
            creating = self._docker.create_session_container(session.id, spec)
        self._creating.add(creating)

        def created(result):
            self._creating.discard(creating)
            return result
        # Before this coroutine goes on: what it does next (the removal of a
        # container whose session ended meanwhile) is then among the
        # removals by the time a stopping server looks again.
        creating.addBoth(created)
        core.container_id = await creating
        if core.message is not None:
            # It ended while its container was being made (it was ended, or
            # capsule stops): that container is nobody's.
            d = self._remove_container(session)
            self._removals.add(d)
            d.addBoth(lambda _: self._removals.discard(d))
            return
        await self.shells.spawn(session, 0, secret=parse_secret(spec.labels.get(SECRET_LABEL)))

    def _make_failed(self, failure: Failure, session: Session) -> None:
        self.pool.refill()
        message, code = _message(failure)
        session.failed_code = code
        if failure.check(CapsuleError):
            _log.error("session {session_id} failed to start: {message}",
                       session_id=session.id[:8], message=message)
        else:
            _log.failure("session {session_id} failed to start", failure,
                         session_id=session.id[:8])
        session.events.stream_failed(message, code)

    def reattach(self, session: Session, offset: int) -> None:
        d = Deferred.fromCoroutine(self.shells.spawn(session, offset))
        d.addErrback(self._reattach_failed, session)

    def _reattach_failed(self, failure: Failure, session: Session) -> None:
        message, _ = _message(failure)
        if failure.check(ContainerGone):
            session.events.end(None, "the session's container is gone: it stopped while"
                                     " capsule was away from it")
            return
        _log.error("session {session_id} could not be attached to again: {message}",
                   session_id=session.id[:8], message=message)
        session.events.engine_lost(message)

    def diagnose(self, session: Session, facts) -> None:
        if self.replicas is not None and getattr(facts, "replaced", False):
            # Another attach took the shell: on a cluster, most often
            # another replica that took the session over.
            self.replicas.replaced(session, lambda: self.engine_watch.diagnose(session, facts))
            return
        self.engine_watch.diagnose(session, facts)

    def await_engine(self, session: Session) -> None:
        self.engine_watch.await_engine(session)

    def remove(self, session: Session) -> None:
        d = self._remove_container(session)
        self._removals.add(d)

        def done(_):
            self._removals.discard(d)
            session.events.removed()
        d.addBoth(done)

    def keep(self, session: Session) -> None:
        d = self.keeping.store(session)
        self._removals.add(d)
        d.addBoth(lambda _: self._removals.discard(d))

    def forget(self, session: Session) -> None:
        session.went_away()
        if self.keeping is not None:
            self.keeping.forgotten(session)
        pool = self.pool.holder(session)
        if pool is not None:
            # A warm session, never taken: the pool says what became of it.
            pool.lost(session)
            return
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self.observers.session_ended(session)
            self.fair_share.share(session.core.user)
        if session.core.message is not None:
            _log.info("session {session_id}{who} ended: {message}", session_id=session.id[:8],
                      message=session.core.message,
                      duration=round(self._clock.seconds() - session.core.created_at, 3),
                      who=f" of {session.core.user}" if session.core.user else "",
                      user=session.core.user)

    def went_live(self, session: Session, resumed: bool) -> None:
        core = session.core
        session.ran = True
        pool = self.pool.holder(session)
        if pool is not None:
            pool.went_live(session)
            return
        elapsed_ms = (self._clock.seconds() - core.created_at) * 1000
        if resumed:
            _log.info("session {session_id} attached to its shell again",
                      session_id=session.id[:8])
            return
        session.went_live()
        self.observers.session_started(session, core.warm, elapsed_ms / 1000)
        _log.info("session {session_id}{who} started in {ms:.0f} ms ({how}, container"
                  " {container})", session_id=session.id[:8], ms=elapsed_ms,
                  how="warm" if core.warm else "cold", container=core.container_id[:12],
                  who=f" of {session.core.user}" if session.core.user else "",
                  user=session.core.user)
        session.core.cpu_shares = self.config.spec.cpu_shares
        self.fair_share.share(session.core.user)
        self.pool.refill()

    # -- containers ----------------------------------------------------

    def _has_volume(self, user: str | None) -> bool:
        """
        Whether a session of C{user} gets its profile's agent volume: a
        user's, or without users (L{SessionConfig.local_volumes}) the one
        local user's.
        """
        return user is not None or self.config.local_volumes


    def _spec_of(self, session: Session) -> ContainerSpec:
        """
        The spec of a session's profile (its image, its limits).
        """
        return (session.settings or self.profiles[DEFAULT_PROFILE]).spec

    def _container_spec(self, session_id: str, settings: Profile | None = None,
                        user: str | None = None, warm: bool = False,
                        snapshot: Snapshot | None = None) -> ContainerSpec:
        """
        How the container of session C{session_id}, of profile C{settings}
        (default: C{shell}) for C{user}, is made: its labels, its secrets,
        the features' environment (C{session_environment}), the user's
        agent volume; a warm one's is labelled so (stopped, it is a
        leftover, not a kept session); one made from C{snapshot} has its
        image and mounts its volumes, which it owns (a label says which).
        """
        settings = settings or self.profiles[DEFAULT_PROFILE]
        spec = settings.spec
        volumes, volume_labels = (), {}
        if settings.agent_volume and not self._has_volume(user):
            if settings.name not in self._volume_refused:
                self._volume_refused.add(settings.name)
                _log.info("sessions of profile {profile} without a user get no agent volume:"
                          " a volume is never shared between users", profile=settings.name)
        elif settings.agent_volume:
            volumes = ((agent_volume_name(self.config.instance, settings.name, user),
                        settings.agent_volume),)
            # The local user's volume has an empty user label: no user's name.
            volume_labels = {**self.labels, LABEL_USER: user or "",
                             LABEL_PROFILE: settings.name, LABEL_VOLUME: "agent"}
        secret = ({SECRET_LABEL: os.urandom(SECRET_BYTES).hex()}
                  if self._direct is not None and has_own_address(spec.network) else {})
        environment = dict(spec.environment)
        for more in self._session_environment:
            environment.update(more(session_id, settings))
        if self.keeping is not None:
            environment.update(self.keeping.environment(settings))
        labels = {**spec.labels, **self.labels, LABEL_SESSION: session_id,
                  LABEL_PROFILE: settings.name, **secret}
        if warm:
            labels[LABEL_WARM] = "true"
        spec = replace(spec, labels=labels, environment=environment,
                       secrets=self.config.secrets.for_profile(settings), volumes=volumes,
                       volume_labels=volume_labels)
        return spec if snapshot is None else from_snapshot(spec, snapshot)

    def snapshot_holder_spec(self, holder_id: str, snapshot: Snapshot,
                             profile: str) -> ContainerSpec:
        """
        A container that mounts a named snapshot's volumes, to be copied
        from (L{capsule.sessions.forks.Forks.start_snapshot}): a session's spec without secrets,
        never given to anyone.
        """
        settings = self.profiles.get(profile) or self.profiles[DEFAULT_PROFILE]
        return holder_spec(self._container_spec(holder_id, settings, None, snapshot=snapshot))

    def _remove_container(self, session: Session) -> Deferred:
        container_id = session.container_id
        if container_id is None:
            return succeed(None)
        if self.replicas is not None:
            # Never a container another live replica serves now.
            return self.replicas.unless_elsewhere(
                session, lambda: self._remove_own_container(session, container_id))
        return self._remove_own_container(session, container_id)

    def _remove_own_container(self, session: Session, container_id: str) -> Deferred:
        d = self._docker.remove_container(container_id)
        if session.own_volumes:
            # Copies of a snapshot's volumes (a fork's): the engine removes
            # only anonymous ones with a container; these (labelled with the
            # session) go now, however new.
            d.addCallback(lambda _: self._docker.prune_snapshots(
                {**self.labels, LABEL_SESSION: session.id}, grace=0))
            # A session from a named snapshot's copies (not labelled with it).
            d.addCallback(lambda _: self.keeping.release_volumes() if self.keeping is not None
                          else self._docker.prune_snapshots(self.labels))
        d.addErrback(lambda f: _log.error(
            "could not remove container {container} of session {session_id}: {error}",
            container=container_id[:12], session_id=session.id[:8], error=f.getErrorMessage()))
        return d

    @property
    def removing(self) -> int:
        """
        Containers of ended sessions the engine is still removing.
        """
        return len(self._removals)

    # -- the server's start and stop -------------------------------------

    def shutdown(self) -> Deferred:
        """
        The server is stopping.  With the keeper, sessions live on in their
        containers: clients are told to come back, connections to the shells
        are closed, and only sessions still being made are removed.  Without
        it, every session ends and its container is removed.
        """
        kept = 0
        for session in list(self.sessions.values()):
            try:
                if self.config.keeper:
                    kept += session.events.let_go("capsule is restarting: reconnect to resume")
                else:
                    session.events.end(None, "the capsule server shut down")
            except Exception:
                _log.failure("letting session {session_id} go failed", session_id=session.id[:8])
        self.sessions.clear()
        if kept:
            _log.info("shutting down: {count} session(s) keep running in their containers"
                      " and can be resumed after a restart", count=kept)
        pool_stopped = self.pool.stop()
        if self._removals or self._creating:
            _log.info("shutting down: removing {count} session container(s)",
                      count=len(self._removals) + len(self._creating))
        return Deferred.fromCoroutine(self._settle(pool_stopped))

    async def _settle(self, pool_stopped: Deferred) -> None:
        """
        Wait for the pool's stop, the removals under way and the containers
        being made, then for the removals these lead to (a warm container
        still being created when capsule stops is removed once it exists),
        until none is left.
        """
        await pool_stopped
        while self._removals or self._creating:
            await DeferredList([*self._removals, *self._creating], consumeErrors=True)
