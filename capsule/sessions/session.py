"""
Sessions: one container and one shell in it, outliving any one client.

Each session's state and its transitions belong to its lifecycle
(L{capsule.core.lifecycle}): a pure state machine.  The manager here is what that
machine acts through: it owns the table of live sessions, speaks to Docker
only through an L{IDockerAPI} (every outcome fed back to the machine as an
input), and takes time from the clock it is given.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from functools import partial

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from capsule.core.spec import ContainerSpec
from capsule.core.errors import CapsuleError, ContainerGone, DockerUnavailable, SessionNotFound
from capsule.core.interfaces import IExecProcess
from capsule.core.keeper import (DEFAULT_SOCKET, RELAY_FRAMES, FrameError, FrameReader, PreambleReader,
                     check_preamble, encode_input, encode_window, exit_status, keeper_argv)
from capsule.core.lifecycle import ISessionEffects, SessionCore, make_lifecycle
from capsule.ops.metrics import UNCOUNTED
from capsule.sessions.pool import WarmPool, WarmPools
from capsule.core.profiles import (DEFAULT_PROFILE, LABEL_PROFILE, LABEL_USER, LABEL_VOLUME, BadRepository,
                       Profile, Secrets, agent_volume_name, check_repository, parse_profile_name,
                       start_command)
from capsule.core.ratelog import RateLimitedLog
from capsule.core.replay import ReplayBuffer

_log = Logger()

LABEL_MANAGED = "io.capsule.managed"
LABEL_INSTANCE = "io.capsule.instance"
LABEL_SESSION = "io.capsule.session"

# How often a session whose engine went away asks for it again: from the
# first delay, doubling up to the last.
ENGINE_RETRY_FIRST = 0.5
ENGINE_RETRY_MAX = 5.0

# The terminal size a warm session's shell starts at; the client's own is
# applied when it is taken.
WARM_SIZE = (80, 24)


@dataclass(frozen=True)
class SessionConfig:
    """
    @ivar spec: how containers are made (labels are added per session).
    @ivar instance: the name of this server; its containers carry it.
    @ivar grace: seconds a session is kept after its last client left (and
        how long a session waits for an engine that went away).
    """

    spec: ContainerSpec
    instance: str = "default"
    grace: float = 60.0
    shell: tuple[str, ...] = ("bash", "-l")
    replay_bytes: int = 1024 * 1024
    max_pending_input: int = 64 * 1024
    # Input a client may send after it was asked to wait (its socket is no
    # longer read) before it is closed with 1008.
    max_input_overrun: int = 1024 * 1024
    # Seconds after which a session ends however busy (0: never), and after
    # which one with no input and no output ends, client or not (0: never).
    max_lifetime: float = 0.0
    idle_timeout: float = 0.0
    pool_size: int = 0
    pool_max_age: float = 3600.0
    # Run the shell under capsule-keeper, so that it outlives capsule.
    keeper: bool = True
    keeper_socket: str = DEFAULT_SOCKET
    # The profiles by name (capsule.core.profiles); None: only "shell", made of
    # the fields above.  The values of their secrets.
    profiles: dict | None = None
    secrets: Secrets = Secrets()


def shell_profile(config: SessionConfig) -> Profile:
    """
    The C{shell} profile a config's own fields describe.
    """
    return Profile(name=DEFAULT_PROFILE, spec=config.spec, command=tuple(config.shell),
                   idle_timeout=config.idle_timeout, max_lifetime=config.max_lifetime,
                   pool=config.pool_size, description="a login shell")


class Session:
    """
    A session: its data (C{core}) and its lifecycle (C{events}, the inputs
    of its state machine).
    """

    def __init__(self, core: SessionCore) -> None:
        self.core = core
        core.owner = self
        self.events = make_lifecycle(core)
        # The exec of the shell now in use: output and ends of any older one
        # are not heard.
        self.shell: _ShellProtocol | None = None
        # Its profile's name, the profile itself (capsule.core.profiles), and the
        # git repository cloned into its /workspace at start, if any.
        self.profile: str = DEFAULT_PROFILE
        # Whether a warm pool holds it (not recorded until it is taken).
        self.pooled = False
        self.settings: Profile | None = None
        self.repository: str | None = None

    def __repr__(self) -> str:
        return f"<Session {self.id[:8]} {self.status()}>"

    @property
    def id(self) -> str:
        return self.core.id

    @property
    def container_id(self) -> str | None:
        return self.core.container_id

    @property
    def client(self):
        return self.core.client

    @property
    def warm(self) -> bool:
        return self.core.warm

    @property
    def replay(self) -> ReplayBuffer:
        return self.core.replay

    def status(self) -> str:
        return self.events.status()

    def output_producer(self) -> IPushProducer:
        """
        The producer a client's connection pauses while it is full.
        """
        return _OutputThrottle(self.core)


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


@dataclass
class ShellFacts:
    """
    What a shell's stream said before it closed: the exit status the keeper
    reported, the end of its stderr, and the reason the stream gave.
    """

    exit_status: int | None = None
    stderr: bytes = b""
    reason: Failure | None = None


class _ShellProtocol(ProcessProtocol):
    """
    Feeds what one exec of the shell does into its session's lifecycle.
    Under the keeper, the exec's stdout carries the keeper's frames (output,
    whose first piece is the preamble; the exit status) and its stderr any
    error the keeper or Docker reports.  An exec the session no longer uses
    (it was replaced, or the session let it go) is not heard.

    Every byte of the relay's stdout is the session user's to choose: a
    frame of a kind or size the relay does not send, a preamble that does
    not parse or says what cannot be, or an exit status no shell has ends
    the session at once (L{MALFORMED}), with one line in the log, and
    nothing more of that stream is read or held.

    @param wanted: the offset the exec asks the keeper for (C{None}: not
        known), against which its preamble is checked.
    """

    MALFORMED = "the session's relay sent malformed data"

    # Errors a session's user can cause at will: logged once per kind per
    # session per minute, with a count.
    _errors = RateLimitedLog(_log)

    class _Malformed(Exception):
        "What the relay sent is impossible (the sentence says why)."

    def __init__(self, session: Session, keeper: bool, wanted: int | None = None) -> None:
        self._session = session
        self._frames = FrameReader(RELAY_FRAMES) if keeper else None
        self._preamble = PreambleReader() if keeper else None
        self._wanted = wanted
        self.facts = ShellFacts()
        self.process = None

    def makeConnection(self, transport) -> None:
        self.process = KeeperProcess(transport) if self._frames is not None else transport
        super().makeConnection(transport)
        if not self._current():
            transport.loseConnection()
            return
        self._session.events.stream_up(self.process)
        if self._frames is None:
            self._session.events.stream_started(self._session.replay.end, 0)

    def _current(self) -> bool:
        return self._session.shell is self

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if not self._current():
            return
        if self._frames is not None and childFD == 2:
            self.facts.stderr = (self.facts.stderr + data)[-2000:]
            return
        # An error in passing output on (a client's fault) must not break the
        # connection to the shell: log it and keep the shell.
        try:
            if self._frames is None:
                self._deliver(data)
            else:
                self._relayed(data)
        except self._Malformed as e:
            self._malformed(e.args[0])
        except Exception:
            self._errors.failure(self._session.core.now(), self._session.id, "output",
                                 "handling output of session {session_id} failed")

    def _relayed(self, data: bytes) -> None:
        try:
            frames = self._frames.feed(data)
            problem = None
        except FrameError as e:
            frames, problem = e.frames, e.message
        for kind, payload in frames:
            if not self._current():
                return
            if kind == b"o":
                self._output(payload)
            elif kind == b"x":
                try:
                    self.facts.exit_status = exit_status(payload)
                except ValueError as e:
                    raise self._Malformed(str(e)) from None
        if problem is not None and self._current():
            raise self._Malformed(problem)

    def _output(self, data: bytes) -> None:
        if not self._preamble.done:
            preamble, data = self._preamble.feed(data)
            if self._preamble.missing:
                raise self._Malformed("output without the keeper's preamble first")
            if preamble is None:
                return
            problem = check_preamble(preamble, self._wanted)
            if problem is not None:
                raise self._Malformed(f"a preamble with {problem}")
            self._session.events.stream_started(preamble.offset, preamble.dropped)
            if not data:
                return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        recorder = self._session.core.effects.recorder
        if recorder is not None and not self._session.pooled:
            recorder.output(self._session, data)
        self._session.events.output(data)

    def _malformed(self, problem: str) -> None:
        """
        The relay broke its framing or said what cannot be: stop reading
        it and end the session.  Its exec's end, which follows, is not
        heard.
        """
        session = self._session
        if not self._current():
            return
        session.shell = None
        self._errors.error(session.core.now(), session.id, "malformed",
                           "session {session_id} ended: its relay sent malformed data"
                           " ({problem})", problem=problem)
        self.process.loseConnection()
        # A relay that does not read either must not keep what was written
        # to it waiting in capsule: drop the exec's connection.
        connection = getattr(self.transport, "transport", None)
        if connection is not None and hasattr(connection, "abortConnection"):
            connection.abortConnection()
        session.events.end(None, self.MALFORMED)

    def processEnded(self, reason: Failure) -> None:
        if self._current():
            self._session.shell = None
            self.facts.reason = reason
            self._session.events.stream_closed(self.facts)


@implementer(IExecProcess, IPushProducer)
class KeeperProcess:
    """
    The shell under capsule-keeper, through a relay exec: input and terminal
    sizes go to the keeper as its frames; the rest is the exec's.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self.exec_id = stream.exec_id

    def write(self, data: bytes) -> None:
        self._stream.write(encode_input(data))

    def resize(self, cols: int, rows: int) -> None:
        self._stream.write(encode_window(cols, rows))

    def throttle_input(self, producer) -> None:
        self._stream.throttle_input(producer)

    def loseConnection(self) -> None:
        self._stream.loseConnection()

    def pauseProducing(self) -> None:
        self._stream.pauseProducing()

    def resumeProducing(self) -> None:
        self._stream.resumeProducing()

    def stopProducing(self) -> None:
        self._stream.stopProducing()


@implementer(IPushProducer)
class _OutputThrottle:
    """
    Stands between a client's connection and a session's exec: the client's
    transport pauses the exec when it is full.  When the client's connection
    closes it calls C{stopProducing}, which must not end the shell, so this
    proxy only lets the exec resume.
    """

    def __init__(self, core: SessionCore) -> None:
        self._core = core

    def pauseProducing(self) -> None:
        if self._core.stream is not None:
            self._core.stream.pauseProducing()

    def resumeProducing(self) -> None:
        if self._core.stream is not None:
            self._core.stream.resumeProducing()

    def stopProducing(self) -> None:
        self.resumeProducing()


def _message(failure: Failure) -> tuple[str, str]:
    if failure.check(CapsuleError):
        return failure.value.message, failure.value.code
    return f"the session could not be started: {failure.getErrorMessage()}", "start_failed"


@implementer(ISessionEffects)
class SessionManager:
    """
    Creates, reconnects, ends and expires sessions; does the work their
    lifecycles ask for.

    @ivar sessions: the live sessions by id.
    @ivar owners: the users of an earlier run's sessions, by id (see
        L{capsule.sessions.owners}).
    """

    owners: dict = {}
    # When a client last sent input to any session (the warm pools refill
    # between keystrokes, see capsule.sessions.pool).
    typed_at = float("-inf")
    # Where sessions' output is recorded (capsule.ops.recording), if anywhere.
    recorder = None
    # What it counts into (capsule.ops.metrics): a server's metrics watch it.
    metrics = UNCOUNTED

    def __init__(self, docker, clock, config: SessionConfig) -> None:
        self._docker = docker
        self._clock = clock
        self.config = config
        self.sessions: dict[str, Session] = {}
        # While the sessions of an earlier run are not known yet (the engine
        # did not answer at start), a reconnect cannot be told "no such
        # session".
        self.recovery_pending = False
        # Container removals under way, which a stopping server waits for.
        self._removals: set[Deferred] = set()
        self.profiles: dict[str, Profile] = dict(config.profiles or {
            DEFAULT_PROFILE: shell_profile(config)})
        # A warm pool per profile that wants one (see capsule.sessions.pool); none for
        # a profile with a user's volume, which cannot be made ahead of its user.
        self.pool = WarmPools({
            name: WarmPool(clock, settings.pool, partial(self._warm_session, settings),
                           max_age=config.pool_max_age, name=name,
                           typed_at=lambda: self.typed_at)
            for name, settings in self.profiles.items()
            if settings.pool > 0 and not settings.agent_volume})
        for name, settings in self.profiles.items():
            if settings.pool > 0 and settings.agent_volume:
                _log.warn("profile {profile} gets no warm pool: its sessions have a user's"
                          " volume, which cannot be made before its user comes", profile=name)
        # Profiles with an agent volume whose sessions had none (no users):
        # said once each.
        self._volume_refused: set[str] = set()

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

    # -- what clients ask for --------------------------------------------

    def create(self, client, cols: int, rows: int, user: str | None = None,
               profile: str | None = None, repository: str | None = None) -> Session:
        """
        Start a new session for C{client} (acting for C{user}), which is told
        through C{session_started} or C{session_failed}.

        @param profile: the name of its profile (default: C{shell}).
        @param repository: an https git URL cloned into its /workspace at
            start (default: its profile's, if any).
        @raise UnknownProfile: naming the profiles there are (nothing made).
        @raise BadRepository: for a repository capsule refuses.

        Without a client (C{client} is C{None}), the session is made all the
        same and, once its shell runs, kept for the grace period like one
        whose client left: a client attaches with L{reconnect} (from offset
        0 it gets all the output so far).  One that could not be made is
        forgotten, its C{core.message} saying why.
        """
        settings = parse_profile_name(
            DEFAULT_PROFILE if profile is None else profile, self.profiles)
        if repository is not None:
            try:
                check_repository(repository)
            except (TypeError, ValueError) as e:
                raise BadRepository(f"repository: {e}") from None
        # A warm session has no user's volume and cloned only its profile's
        # repository.
        pooled = repository in (None, settings.repository) and not (
            settings.agent_volume and user is not None)
        warm = self.pool.take(settings.name) if pooled else None
        if warm is not None:
            return self._hand_warm(warm, client, cols, rows, user)
        session = self._new_session(str(uuid.uuid4()), (cols, rows), client=client, user=user)
        session.profile, session.settings = settings.name, settings
        session.repository = repository or settings.repository
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
        if self.recorder is not None and printed:
            # Its recording begins with what it printed while it waited.
            self.recorder.output(session, printed)
        self.metrics.session_started(True, 0.0)
        _log.info("session {session_id}{who} started in 0 ms (warm, ready for {waited:.0f} s,"
                  " container {container})", session_id=session.id[:8], waited=waited,
                  container=core.container_id[:12],
                  who=f" of {user}" if user else "", user=user)
        core.cpu_shares = session.settings.spec.cpu_shares
        self._share_cpu(user)
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
        if session is None and self.recovery_pending:
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
        self.metrics.reconnected()
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
        if session.status() in ("detached", "interrupted", "reattaching"):
            _log.info("client left session {session_id}{who}; it is kept for {grace:g} s",
                      session_id=session.id[:8], grace=self.config.grace,
                      who=f" of {session.core.user}" if session.core.user else "",
                      user=session.core.user)

    def write(self, session: Session, data: bytes) -> None:
        self.typed_at = self._clock.seconds()
        session.events.write(data)

    def resize(self, session: Session, cols: int, rows: int) -> None:
        session.events.resize(cols, rows)
        if self.recorder is not None:
            self.recorder.resize(session, cols, rows)

    def expire(self, session: Session) -> bool:
        """
        End a session whose grace period is over; return whether it ended.
        """
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
        spec = self._container_spec(session.id, session.settings, core.user)
        core.container_id = await self._docker.create_session_container(session.id, spec)
        if core.message is not None:
            # It ended while its container was being made (it was ended, or
            # capsule stops): that container is nobody's.
            d = self._remove_container(session)
            self._removals.add(d)
            d.addBoth(lambda _: self._removals.discard(d))
            return
        await self._spawn_shell(session, 0)

    def _make_failed(self, failure: Failure, session: Session) -> None:
        self.pool.refill()
        message, code = _message(failure)
        if failure.check(CapsuleError):
            _log.error("session {session_id} failed to start: {message}",
                       session_id=session.id[:8], message=message)
        else:
            _log.failure("session {session_id} failed to start", failure,
                         session_id=session.id[:8])
        session.events.stream_failed(message, code)

    async def _spawn_shell(self, session: Session, offset: int) -> None:
        """
        Start (or, under the keeper, attach to) the session's shell: its
        protocol feeds the lifecycle.
        """
        settings = session.settings or self.profiles[DEFAULT_PROFILE]
        spec = settings.spec
        command, environment = start_command(
            settings, session.repository,
            volume=bool(settings.agent_volume and session.core.user is not None))
        protocol = session.shell = _ShellProtocol(session, self.config.keeper, offset)
        if not self.config.keeper:
            await self._docker.spawn_exec(
                protocol, session.container_id, list(command), spec.user,
                spec.workdir, environment, None)
            return
        argv = keeper_argv(command, offset, self.config.replay_bytes,
                           self.config.keeper_socket)
        await self._docker.spawn_exec(
            protocol, session.container_id, argv, spec.user, spec.workdir,
            environment, None, tty=False)

    def reattach(self, session: Session, offset: int) -> None:
        d = Deferred.fromCoroutine(self._spawn_shell(session, offset))
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

    def diagnose(self, session: Session, facts: ShellFacts) -> None:
        d = Deferred.fromCoroutine(self._diagnose(session, facts))
        d.addErrback(lambda f: _log.failure("ending session {session_id} failed", f,
                                            session_id=session.id[:8]))

    async def _diagnose(self, session: Session, facts: ShellFacts) -> None:
        reason = facts.reason
        code = 0 if reason is None or reason.check(ProcessDone) else getattr(
            reason.value, "exitCode", None)
        stderr = facts.stderr.decode("utf-8", "replace").strip()
        away = None
        if self.config.keeper and facts.exit_status is not None:
            code = facts.exit_status
        elif self.config.keeper and "capsule-keeper" in stderr and (
                "not found" in stderr or "no such" in stderr.lower()):
            code, message = None, (
                f"the image {self._spec_of(session).image} has no capsule-keeper: build it from"
                " capsule's docker/Dockerfile, or start capsule with --no-keeper")
        elif self.config.keeper or code is None:
            # The stream ended without the shell's status: find out why.
            code = None
            message, away = await self._why_gone(session)
            if stderr and not away:
                message = f"{message}: {stderr.splitlines()[-1]}"
        if code == 137:
            message = ("the shell was killed (signal 9; most often it ran out of memory"
                       f" under the {self._spec_of(session).memory} limit)")
        elif code is not None:
            message = f"the shell exited with code {code}"
        if away:
            _log.warn("session {session_id} lost its shell's stream: {message}; waiting"
                      " up to {grace:g} s for the engine", session_id=session.id[:8],
                      message=message, grace=self.config.grace)
            session.events.engine_lost(message)
        else:
            session.events.end(code, message)

    async def _why_gone(self, session: Session) -> tuple[str, bool]:
        """
        Why a session's stream closed: a sentence, and whether the cause is
        that the engine cannot be reached (the container may well run on).
        """
        # A container being killed may still say it runs for a moment.
        for attempt in range(6):
            try:
                state = await self._docker.container_state(session.container_id)
            except DockerUnavailable as e:
                return f"the connection to the shell was lost ({e.message})", True
            except CapsuleError as e:
                return f"the connection to the shell was lost ({e.message})", False
            if state is None or not state.get("Running") or attempt == 5:
                break
            await deferLater(self._clock, 0.2, lambda: None)
        if state is None:
            return "the session's container was removed", False
        if state.get("OOMKilled"):
            return ("the session's container ran out of memory (limit "
                    f"{self._spec_of(session).memory}) and was stopped"), False
        if not state.get("Running"):
            return f"the session's container stopped (exit code {state.get('ExitCode')})", False
        return "the connection to the shell was lost", False

    def await_engine(self, session: Session) -> None:
        d = Deferred.fromCoroutine(self._await_engine(session))
        d.addErrback(lambda f: _log.failure("waiting for the engine for session {session_id}"
                                            " failed", f, session_id=session.id[:8]))

    async def _await_engine(self, session: Session) -> None:
        deadline = self._clock.seconds() + self.config.grace
        delay = ENGINE_RETRY_FIRST
        while True:
            try:
                state = await self._docker.container_state(session.container_id)
            except CapsuleError:
                if self._clock.seconds() >= deadline:
                    session.events.end(None, "the Docker engine did not come back within"
                                             f" {self.config.grace:g} s")
                    return
                await deferLater(self._clock, delay, lambda: None)
                delay = min(delay * 2, ENGINE_RETRY_MAX)
                # Ended, or let go, meanwhile: nothing to wait for.
                if session.status() != "interrupted":
                    return
                continue
            if state is None:
                session.events.end(None, "the session's container is gone: it was removed"
                                         " while the Docker engine was away")
            elif not state.get("Running"):
                session.events.end(None, "the session's container stopped while the Docker"
                                         f" engine was away (exit code {state.get('ExitCode')})")
            else:
                _log.info("the engine answers again: attaching to session {session_id}",
                          session_id=session.id[:8])
                session.events.engine_back()
            return

    def remove(self, session: Session) -> None:
        d = self._remove_container(session)
        self._removals.add(d)

        def done(_):
            self._removals.discard(d)
            session.events.removed()
        d.addBoth(done)

    def user_cpu_shares(self, user: str | None) -> int:
        """
        The CPU weight of each of C{user}'s sessions: the sessions of one
        user share one weight (C{--cpu-shares}), split equally, so that ten
        sessions of one user cannot take ten times the CPU of one user's
        single session.  Without users, each session has the full weight.
        """
        base = self.config.spec.cpu_shares
        if user is None:
            return base
        count = sum(1 for s in self.sessions.values()
                    if s.core.user == user and s.container_id is not None)
        # Docker's smallest weight is 2.
        return max(2, base // max(1, count))

    def _share_cpu(self, user: str | None) -> None:
        """
        Give each live session of C{user} its share of the user's weight.
        """
        if user is None:
            return
        shares = self.user_cpu_shares(user)
        for session in self.of_user(user):
            if session.container_id is None or session.core.cpu_shares == shares:
                continue
            session.core.cpu_shares = shares
            d = self._docker.set_cpu_shares(session.container_id, shares)
            d.addErrback(lambda f, sid=session.id: _log.warn(
                "could not set the CPU weight of session {session_id}: {error}",
                session_id=sid[:8], error=f.getErrorMessage()))

    def forget(self, session: Session) -> None:
        if self.recorder is not None:
            self.recorder.end(session)
        pool = self.pool.holder(session)
        if pool is not None:
            # A warm session, never taken: the pool says what became of it.
            pool.lost(session)
            return
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self.metrics.session_ended(session.core.exit_code, session.core.message)
            self._share_cpu(session.core.user)
        if session.core.message is not None:
            _log.info("session {session_id}{who} ended: {message}", session_id=session.id[:8],
                      message=session.core.message,
                      duration=round(self._clock.seconds() - session.core.created_at, 3),
                      who=f" of {session.core.user}" if session.core.user else "",
                      user=session.core.user)

    def went_live(self, session: Session, resumed: bool) -> None:
        core = session.core
        pool = self.pool.holder(session)
        if pool is not None:
            pool.went_live(session)
            return
        elapsed_ms = (self._clock.seconds() - core.created_at) * 1000
        if resumed:
            _log.info("session {session_id} attached to its shell again",
                      session_id=session.id[:8])
            return
        self.metrics.session_started(core.warm, elapsed_ms / 1000)
        _log.info("session {session_id}{who} started in {ms:.0f} ms ({how}, container"
                  " {container})", session_id=session.id[:8], ms=elapsed_ms,
                  how="warm" if core.warm else "cold", container=core.container_id[:12],
                  who=f" of {session.core.user}" if session.core.user else "",
                  user=session.core.user)
        session.core.cpu_shares = self.config.spec.cpu_shares
        self._share_cpu(session.core.user)
        self.pool.refill()

    # -- containers ----------------------------------------------------

    def _spec_of(self, session: Session) -> ContainerSpec:
        """
        The spec of a session's profile (its image, its limits).
        """
        return (session.settings or self.profiles[DEFAULT_PROFILE]).spec

    def _container_spec(self, session_id: str, settings: Profile | None = None,
                        user: str | None = None) -> ContainerSpec:
        """
        How the container of session C{session_id}, of profile C{settings}
        (default: C{shell}) for C{user}, is made: its labels, its secrets,
        the user's agent volume.
        """
        settings = settings or self.profiles[DEFAULT_PROFILE]
        spec = settings.spec
        volumes, volume_labels = (), {}
        if settings.agent_volume and user is None:
            if settings.name not in self._volume_refused:
                self._volume_refused.add(settings.name)
                _log.info("sessions of profile {profile} get no agent volume: capsule has no"
                          " users, and a volume is never shared", profile=settings.name)
        elif settings.agent_volume:
            volumes = ((agent_volume_name(self.config.instance, settings.name, user),
                        settings.agent_volume),)
            volume_labels = {**self.labels, LABEL_USER: user, LABEL_PROFILE: settings.name,
                             LABEL_VOLUME: "agent"}
        return replace(spec, labels={**spec.labels, **self.labels, LABEL_SESSION: session_id,
                                     LABEL_PROFILE: settings.name},
                       secrets=self.config.secrets.for_profile(settings), volumes=volumes,
                       volume_labels=volume_labels)

    def _remove_container(self, session: Session) -> Deferred:
        container_id = session.container_id
        if container_id is None:
            return succeed(None)
        d = self._docker.remove_container(container_id)
        d.addErrback(lambda f: _log.error(
            "could not remove container {container} of session {session_id}: {error}",
            container=container_id[:12], session_id=session.id[:8], error=f.getErrorMessage()))
        return d

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
        if self._removals:
            _log.info("shutting down: removing {count} session container(s)",
                      count=len(self._removals))
        return DeferredList([self.pool.stop(), *self._removals], consumeErrors=True)

    async def check_live_restore(self) -> bool | None:
        """
        Warn when the engine runs without live-restore, which no server can
        make up for: restarting dockerd then stops every container.  Return
        the engine's setting (C{None}: it did not say).
        """
        try:
            info = await self._docker.info()
        except CapsuleError as e:
            _log.warn("could not ask the Docker engine whether live-restore is on: {message}",
                      message=e.message)
            return None
        enabled = info.get("LiveRestoreEnabled")
        if enabled is False:
            _log.warn(
                "the Docker engine runs without live-restore: restarting or upgrading dockerd"
                " stops every container, and so ends every session. Turn it on with"
                " {{\"live-restore\": true}} in /etc/docker/daemon.json, then"
                " `sudo systemctl reload docker` (no container is stopped by that).")
        return enabled

    async def check_profile_images(self) -> list[str]:
        """
        Warn, once at start, of each profile whose image the engine does not
        have (its sessions would fail to start); return those profiles' names.
        """
        missing = []
        for name, settings in sorted(self.profiles.items()):
            image = settings.spec.image
            try:
                present = await self._docker.image_exists(image)
            except CapsuleError as e:
                _log.warn("could not check the images of the profiles: {message}",
                          message=e.message)
                return missing
            if not present:
                missing.append(name)
                _log.warn("profile {profile}: its image {image} is missing, so its sessions"
                          " cannot start: build it (`make image`, or docker/build-image.sh)"
                          " or name another image", profile=name, image=image)
        return missing

    async def recover(self) -> int:
        """
        At start-up: find the sessions of an earlier run whose containers
        still run (with the keeper, their shells do too) and keep them for
        the grace period, waiting for their clients; remove every other
        container of this server.
        """
        found = await self._docker.list_containers(self.labels)
        recovered = []
        for container in found:
            session_id = container["labels"].get(LABEL_SESSION)
            if (self.config.keeper and container["state"] == "running" and session_id
                    and session_id not in self.sessions and _is_uuid(session_id)):
                session = self._new_session(session_id, (80, 24),
                                            container_id=container["id"],
                                            user=self.owners.get(session_id))
                self._recovered_profile(session, container["labels"].get(LABEL_PROFILE))
                session.events.recover()
                recovered.append(session_id)
        if recovered:
            _log.info("found {count} session(s) of an earlier run; each waits {grace:g} s"
                      " for its client: {ids}", count=len(recovered), grace=self.config.grace,
                      ids=", ".join(i[:8] for i in recovered))
        # Everything else of this server's is a leftover.
        await self.remove_leftovers()
        return len(recovered)

    def _recovered_profile(self, session: Session, name: str | None) -> None:
        """
        A session of an earlier run keeps its profile (its container's
        label); one whose profile is no longer configured gets the default
        profile's limits, under its own name.
        """
        name = name or DEFAULT_PROFILE
        settings = self.profiles.get(name)
        if settings is None:
            _log.warn("session {session_id} of an earlier run has profile {profile}, which is"
                      " no longer configured: the limits of {default} apply to it",
                      session_id=session.id[:8], profile=name[:64], default=DEFAULT_PROFILE)
            settings = self.profiles[DEFAULT_PROFILE]
        session.profile, session.settings = name[:64], settings

    async def remove_leftovers(self, why: str = "left by an earlier run") -> int:
        """
        Remove this server's containers that no live session or warm slot
        owns: those left by an earlier run, or whose removal failed (Docker
        was unreachable when their session ended).
        """
        found = await self._docker.list_containers(self.labels)
        live = {s.container_id for s in self.sessions.values()} | self.pool.container_ids
        owners = self.sessions.keys() | self.pool.pending
        stale = [c for c in found if c["id"] not in live
                 and c["labels"].get(LABEL_SESSION) not in owners]
        for container in stale:
            await self._docker.remove_container(container["id"])
        if stale:
            _log.info("removed {count} leftover container(s) {why}: {names}",
                      count=len(stale), why=why, names=", ".join(c["name"] for c in stale))
        return len(stale)
