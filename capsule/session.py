"""
Sessions: one container and one shell in it, outliving any one client.

A session is in one of four phases: C{STARTING} (its container and shell
are being made, or its shell is being attached to again), C{RUNNING},
C{RECOVERED} (found again after capsule restarted: its container and shell
run, and it waits for its client to come back) and C{ENDED}.  Independently of the phase, at
most one client is attached to it; while none is, its output keeps flowing
into its replay buffer and the time it was left is remembered, so that the
cleanup loop can expire it after the grace period.

The manager owns the sessions.  It speaks to Docker only through an
L{IDockerAPI}, to clients only through L{ISessionClient}, and takes time
from the clock it is given.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, field, replace

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import deferLater
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .docker_api import ContainerSpec
from .interfaces import IExecProcess
from .keeper import (DEFAULT_SOCKET, FrameReader, PreambleReader, encode_input, encode_window,
                     keeper_argv)
from .errors import CapsuleError, ContainerGone, SessionNotFound
from .pool import WarmPool
from .protocol import ProtocolError
from .replay import ReplayBuffer

_log = Logger()

LABEL_MANAGED = "io.capsule.managed"
LABEL_INSTANCE = "io.capsule.instance"
LABEL_SESSION = "io.capsule.session"


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RECOVERED = "recovered"
    ENDED = "ended"


@dataclass(frozen=True)
class SessionConfig:
    """
    @ivar spec: how containers are made (labels are added per session).
    @ivar instance: the name of this server; its containers carry it.
    @ivar grace: seconds a session is kept after its last client left.
    """

    spec: ContainerSpec
    instance: str = "default"
    grace: float = 60.0
    shell: tuple[str, ...] = ("bash", "-l")
    replay_bytes: int = 1024 * 1024
    max_pending_input: int = 64 * 1024
    pool_size: int = 0
    pool_max_age: float = 3600.0
    # Run the shell under capsule-keeper, so that it outlives capsule.
    keeper: bool = True
    keeper_socket: str = DEFAULT_SOCKET


@dataclass(eq=False)
class Session:
    id: str
    size: tuple[int, int]
    replay: ReplayBuffer
    created_at: float
    phase: Phase = Phase.STARTING
    client: object | None = None
    # When the last client left; None while one is attached.
    detached_at: float | None = None
    container_id: str | None = None
    process: object | None = None
    exit_code: int | None = None
    # Whether any client has been told the session id (sent "connected").
    announced: bool = False
    # The offset up to which the last client that left had been sent output.
    sent_offset: int = 0
    # Whether the container came from the warm pool.
    warm: bool = False
    # While a recovered session's shell is being attached to again, and the
    # offset its client asked for (None: from what the keeper holds).
    reattaching: bool = False
    resume_from: int | None = None
    pending_input: list[bytes] = field(default_factory=list)

    @property
    def attached(self) -> bool:
        return self.client is not None


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


class _ShellProtocol(ProcessProtocol):
    """
    Feeds what the shell's exec does into the manager.  Under the keeper,
    the exec's stdout carries the keeper's frames (output, whose first piece
    is the preamble; the exit status) and its stderr any error the keeper or
    Docker reports.
    """

    def __init__(self, manager: "SessionManager", session: Session, keeper: bool) -> None:
        self._manager = manager
        self._session = session
        self._frames = FrameReader() if keeper else None
        self._preamble = PreambleReader() if keeper else None
        self.exit_status: int | None = None
        self.stderr = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # An error in passing output on (a client's fault) must not break the
        # connection to the shell: log it and keep the shell.
        try:
            if self._frames is None:
                self._manager._output(self._session, data)
            elif childFD == 2:
                self.stderr = (self.stderr + data)[-2000:]
            else:
                for kind, payload in self._frames.feed(data):
                    if kind == b"o":
                        self._output(payload)
                    elif kind == b"x" and len(payload) == 4:
                        self.exit_status = struct.unpack(">I", payload)[0]
        except Exception:
            _log.failure("handling output of session {session_id} failed",
                         session_id=self._session.id)

    def _output(self, data: bytes) -> None:
        if not self._preamble.done:
            preamble, data = self._preamble.feed(data)
            if preamble is not None:
                self._manager._stream_started(self._session, preamble.offset,
                                              preamble.dropped)
            elif self._preamble.missing:
                self._manager._stream_started(self._session, 0, 0)
            if not data:
                return
        self._manager._output(self._session, data)

    def processEnded(self, reason: Failure) -> None:
        self._manager._process_ended(self._session, reason, self)


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

    def __init__(self, session: Session) -> None:
        self._session = session

    def pauseProducing(self) -> None:
        if self._session.process is not None and self._session.phase is Phase.RUNNING:
            self._session.process.pauseProducing()

    def resumeProducing(self) -> None:
        if self._session.process is not None and self._session.phase is Phase.RUNNING:
            self._session.process.resumeProducing()

    def stopProducing(self) -> None:
        self.resumeProducing()


class SessionManager:
    """
    Creates, reconnects, ends and expires sessions.

    @ivar sessions: the live sessions by id.
    """

    def __init__(self, docker, clock, config: SessionConfig) -> None:
        self._docker = docker
        self._clock = clock
        self.config = config
        self.sessions: dict[str, Session] = {}
        self._stopping = False
        self.pool = WarmPool(docker, clock, config.pool_size, self._container_spec,
                             max_age=config.pool_max_age)

    @property
    def labels(self) -> dict[str, str]:
        """
        The labels every container of this server carries.
        """
        return {LABEL_MANAGED: "true", LABEL_INSTANCE: self.config.instance}

    # -- what clients ask for --------------------------------------------

    def create(self, client, cols: int, rows: int) -> Session:
        """
        Start a new session for C{client}, which is told through
        C{session_started} or C{session_failed}.
        """
        warm = self.pool.take()
        session = Session(
            id=warm.session_id if warm else str(uuid.uuid4()),
            size=(cols, rows),
            replay=ReplayBuffer(self.config.replay_bytes),
            created_at=self._clock.seconds(),
            client=client,
            container_id=warm.container_id if warm else None,
            warm=warm is not None,
        )
        self.sessions[session.id] = session
        d = Deferred.fromCoroutine(self._start(session))
        d.addErrback(self._start_failed, session)
        return session

    def reconnect(self, session_id: str, client, offset: int | None = None) -> Session:
        """
        Attach C{client} to an existing session.  A client already attached
        is let go (told C{session_taken_over}): the newest connection wins,
        since the older one is most often a dead socket from before a
        network change.

        @param offset: the offset up to which the client has the output; if
            C{None}, what was sent to the previous client counts.

        @raise SessionNotFound: if there is no such live session.
        """
        session = self.sessions.get(session_id)
        if session is None or session.phase is Phase.ENDED:
            raise SessionNotFound(
                f"session {session_id} does not exist: it ended, or expired"
                f" {self.config.grace:g} s after its last client left"
            )
        previous, session.client = session.client, client
        session.detached_at = None
        if previous is not None:
            session.sent_offset = previous.sent_offset
            _log.info("session {session_id} taken over by a new connection",
                      session_id=session_id)
            previous.pause_output_producer(None)
            previous.session_taken_over()
        else:
            _log.info("session {session_id} reconnected", session_id=session_id)
        if session.phase is Phase.RUNNING:
            self._announce(session, resumed=True, offset=offset)
        elif session.phase is Phase.RECOVERED:
            session.phase = Phase.STARTING
            session.reattaching = True
            session.resume_from = offset
            d = Deferred.fromCoroutine(self._reattach(session, 0 if offset is None else offset))
            d.addErrback(self._reattach_failed, session)
        return session

    def detach(self, session: Session, client) -> None:
        """
        C{client} has gone away.  The session lives on for the grace period.
        """
        if session.client is not client:
            return
        session.client = None
        if session.phase is Phase.ENDED:
            return
        if session.announced:
            session.sent_offset = client.sent_offset
        session.detached_at = self._clock.seconds()
        if session.process is not None:
            # Nobody is watching, but the work must not stall.
            session.process.resumeProducing()
        if session.announced:
            _log.info("client left session {session_id}; it is kept for {grace:g} s",
                      session_id=session.id, grace=self.config.grace)

    async def _spawn_shell(self, session: Session, offset: int):
        """
        Start (or, under the keeper, attach to) the session's shell.
        """
        spec = self.config.spec
        protocol = _ShellProtocol(self, session, self.config.keeper)
        if not self.config.keeper:
            return await self._docker.spawn_exec(
                protocol, session.container_id, list(self.config.shell), spec.user,
                spec.workdir, spec.environment, session.size)
        argv = keeper_argv(self.config.shell, offset, self.config.replay_bytes,
                           self.config.keeper_socket)
        stream = await self._docker.spawn_exec(
            protocol, session.container_id, argv, spec.user, spec.workdir,
            spec.environment, None, tty=False)
        process = KeeperProcess(stream)
        process.resize(*session.size)
        return process

    def write(self, session: Session, data: bytes) -> None:
        if session.phase is Phase.RUNNING:
            session.process.write(data)
        elif session.phase is Phase.STARTING:
            pending = sum(map(len, session.pending_input))
            if pending + len(data) > self.config.max_pending_input:
                raise ProtocolError(
                    "the session is still starting and its input buffer is full:"
                    " input was dropped", "input_dropped")
            session.pending_input.append(data)

    def resize(self, session: Session, cols: int, rows: int) -> None:
        session.size = (cols, rows)
        if session.phase is Phase.RUNNING:
            session.process.resize(cols, rows)

    # -- starting --------------------------------------------------------

    def _container_spec(self, session_id: str) -> ContainerSpec:
        return replace(self.config.spec, labels={
            **self.config.spec.labels, **self.labels, LABEL_SESSION: session_id})

    async def _start(self, session: Session) -> None:
        started = self._clock.seconds()
        spec = self._container_spec(session.id)
        while True:
            if session.container_id is None:
                session.warm = False
                session.container_id = await self._docker.create_session_container(
                    session.id, spec)
            if session.phase is Phase.ENDED:
                # Ended (server stopping) while the container was being made.
                await self._remove_container(session)
                return
            try:
                session.process = await self._spawn_shell(session, 0)
            except ContainerGone as e:
                if not session.warm:
                    raise
                # A warm container died while it waited: never hand it out.
                _log.warn("warm container {container} was broken ({message}): starting"
                          " session {session_id} cold", container=session.container_id[:12],
                          message=e.message, session_id=session.id)
                await self._remove_container(session)
                session.container_id = None
                continue
            break
        if session.phase is Phase.ENDED:
            session.process.loseConnection()
            return
        session.phase = Phase.RUNNING
        elapsed_ms = (self._clock.seconds() - started) * 1000
        if session.client is None:
            _log.info("session {session_id} started in {ms:.0f} ms, but its client had"
                      " left: removing it", session_id=session.id, ms=elapsed_ms)
            await self._end(session, None, "the client left before the session started")
            self.pool.refill()
            return
        _log.info("session {session_id} started in {ms:.0f} ms ({how}, container {container})",
                  session_id=session.id, ms=elapsed_ms, how="warm" if session.warm else "cold",
                  container=session.container_id[:12])
        pending, session.pending_input = session.pending_input, []
        for data in pending:
            session.process.write(data)
        self._announce(session, resumed=False)
        self.pool.refill()

    async def _reattach(self, session: Session, offset: int) -> None:
        """
        Attach to the keeper of a session found again after a restart; the
        client is told once the keeper says where its output resumes.
        """
        try:
            process = await self._spawn_shell(session, offset)
        except ContainerGone:
            await self._end(session, None, "the session's container is gone: it stopped"
                                           " while capsule was down")
            return
        if session.phase is Phase.ENDED:
            process.loseConnection()
            return
        session.process = process
        _log.info("session {session_id} attached to again after a restart",
                  session_id=session.id)

    def _reattach_failed(self, failure: Failure, session: Session) -> None:
        message = failure.value.message if failure.check(CapsuleError) else failure.getErrorMessage()
        code = failure.value.code if failure.check(CapsuleError) else "start_failed"
        _log.error("session {session_id} could not be attached to again: {message}",
                   session_id=session.id, message=message)
        if session.phase is Phase.ENDED:
            return
        # It stays recoverable: the client may try again (Docker may be back).
        session.phase = Phase.RECOVERED
        session.reattaching = False
        client, session.client = session.client, None
        session.detached_at = self._clock.seconds()
        if client is not None:
            client.session_failed(message, code)

    def _stream_started(self, session: Session, offset: int, dropped: int) -> None:
        """
        The keeper said the output that follows begins at C{offset}.
        """
        if session.replay.end != offset:
            session.replay.restart_at(offset)
        if not session.reattaching or session.phase is not Phase.STARTING:
            return
        # A recovered session: its client learns where the output resumes.
        wanted, session.resume_from = session.resume_from, None
        session.reattaching = False
        session.phase = Phase.RUNNING
        client = session.client
        if client is None:
            session.detached_at = self._clock.seconds()
            return
        restarted = not dropped and wanted is not None and wanted > offset
        self._hand_over(session, client, True, offset, dropped,
                        b"\r\n[capsule: the session's shell was restarted]\r\n" if restarted else b"")

    def _start_failed(self, failure: Failure, session: Session) -> None:
        self.pool.refill()
        if failure.check(CapsuleError):
            message, code = failure.value.message, failure.value.code
            _log.error("session {session_id} failed to start: {message}",
                       session_id=session.id, message=message)
        else:
            message, code = f"the session could not be started: {failure.getErrorMessage()}", "start_failed"
            _log.failure("session {session_id} failed to start", failure, session_id=session.id)
        client = session.client
        ended = session.phase is Phase.ENDED
        self._forget(session)
        if client is not None and not ended:
            client.session_failed(message, code)
        d = self._remove_container(session)
        d.addErrback(lambda f: None)

    def _announce(self, session: Session, resumed: bool, offset: int | None = None) -> None:
        """
        Tell the session's client it is attached, then send it the output
        it has not had: from C{offset}, or from what the last client was
        sent.
        """
        client = session.client
        session.announced = True
        data, dropped = session.replay.since(
            session.sent_offset if offset is None else offset)
        first = session.replay.end - len(data)
        self._hand_over(session, client, resumed, first, dropped, data)

    def _hand_over(self, session: Session, client, resumed: bool, first: int, dropped: int,
                   data: bytes) -> None:
        """
        Attach C{client}: tell it where the output it gets begins, let its
        connection pause the shell's output, then send it what it missed.
        """
        client.session_started(session, resumed, first)
        if session.client is not client:
            return
        client.pause_output_producer(_OutputThrottle(session))
        if dropped:
            client.session_dropped(dropped, first)
        if data:
            client.session_output(data)

    # -- the shell's side ----------------------------------------------

    def _output(self, session: Session, data: bytes) -> None:
        session.replay.append(data)
        if session.client is not None and session.announced and session.phase is Phase.RUNNING:
            session.client.session_output(data)

    def _process_ended(self, session: Session, reason: Failure, shell: _ShellProtocol) -> None:
        if session.phase is not Phase.RUNNING or self._stopping:
            return
        d = Deferred.fromCoroutine(self._shell_ended(session, reason, shell))
        d.addErrback(lambda f: _log.failure("ending session {session_id} failed", f,
                                            session_id=session.id))

    async def _shell_ended(self, session: Session, reason: Failure, shell: _ShellProtocol) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        stderr = shell.stderr.decode("utf-8", "replace").strip()
        if self.config.keeper:
            if shell.exit_status is not None:
                code = shell.exit_status
            elif "capsule-keeper" in stderr and ("not found" in stderr or "no such" in stderr.lower()):
                await self._end(session, None, (
                    f"the image {self.config.spec.image} has no capsule-keeper: build it from"
                    " capsule's docker/Dockerfile, or start capsule with --no-keeper"))
                return
            else:
                # The relay ended without the shell's status: find out why.
                message = await self._why_gone(session)
                if stderr:
                    message = f"{message}: {stderr.splitlines()[-1]}"
                await self._end(session, None, message)
                return
        if code == 137:
            message = ("the shell was killed (signal 9; most often it ran out of memory"
                       f" under the {self.config.spec.memory} limit)")
        elif code is not None:
            message = f"the shell exited with code {code}"
        else:
            message = await self._why_gone(session)
        await self._end(session, code, message)

    async def _why_gone(self, session: Session) -> str:
        # A container being killed may still say it runs for a moment.
        for attempt in range(6):
            try:
                state = await self._docker.container_state(session.container_id)
            except CapsuleError as e:
                return f"the connection to the shell was lost ({e.message})"
            if state is None or not state.get("Running") or attempt == 5:
                break
            await deferLater(self._clock, 0.2, lambda: None)
        if state is None:
            return "the session's container was removed"
        if state.get("OOMKilled"):
            return ("the session's container ran out of memory (limit "
                    f"{self.config.spec.memory}) and was stopped")
        if not state.get("Running"):
            return f"the session's container stopped (exit code {state.get('ExitCode')})"
        return "the connection to the shell was lost"

    # -- ending ----------------------------------------------------------

    async def _end(self, session: Session, exit_code: int | None, message: str) -> None:
        if session.phase is Phase.ENDED and session.id not in self.sessions:
            return
        session.phase = Phase.ENDED
        session.exit_code = exit_code
        client = session.client
        self._forget(session)
        _log.info("session {session_id} ended: {message}", session_id=session.id, message=message)
        if session.process is not None:
            session.process.loseConnection()
        if client is not None:
            client.pause_output_producer(None)
            client.session_ended(exit_code, message)
        await self._remove_container(session)

    def _forget(self, session: Session) -> None:
        session.phase = Phase.ENDED
        self.sessions.pop(session.id, None)

    def _remove_container(self, session: Session) -> Deferred:
        if session.container_id is None:
            return succeed(None)
        d = self._docker.remove_container(session.container_id)
        d.addErrback(lambda f: _log.error(
            "could not remove container {container} of session {session_id}: {error}",
            container=session.container_id[:12], session_id=session.id,
            error=f.getErrorMessage()))
        return d

    def expire(self, session: Session) -> Deferred:
        """
        End a session whose grace period is over, and remove its container.
        """
        _log.info("session {session_id} expired after {grace:g} s without a client",
                  session_id=session.id, grace=self.config.grace)
        return Deferred.fromCoroutine(self._end(session, None, "the session expired"))

    def shutdown(self) -> Deferred:
        """
        The server is stopping.  With the keeper, sessions live on in their
        containers: clients are told to come back, connections to the shells
        are closed, and only sessions still being made are removed.  Without
        it, every session ends and its container is removed.
        """
        self._stopping = self.config.keeper
        sessions = list(self.sessions.values())
        ends = []
        kept = 0
        for session in sessions:
            if self.config.keeper and session.announced:
                kept += 1
                client, session.client = session.client, None
                try:
                    if client is not None:
                        client.pause_output_producer(None)
                        client.session_interrupted("capsule is restarting: reconnect to resume")
                    if session.process is not None:
                        session.process.loseConnection()
                except Exception:
                    _log.failure("letting session {session_id} go failed",
                                 session_id=session.id)
            else:
                ends.append(Deferred.fromCoroutine(
                    self._end(session, None, "the capsule server shut down")))
        if kept:
            _log.info("shutting down: {count} session(s) keep running in their containers"
                      " and can be resumed after a restart", count=kept)
        if ends:
            _log.info("shutting down: removing {count} session container(s)", count=len(ends))
        return DeferredList([self.pool.stop(), *ends], consumeErrors=True)

    async def recover(self) -> int:
        """
        At start-up: find the sessions of an earlier run whose containers
        still run (with the keeper, their shells do too) and keep them for
        the grace period, waiting for their clients; remove every other
        container of this server.
        """
        found = await self._docker.list_containers(self.labels)
        now = self._clock.seconds()
        recovered = []
        for container in found:
            session_id = container["labels"].get(LABEL_SESSION)
            if (self.config.keeper and container["state"] == "running" and session_id
                    and session_id not in self.sessions and _is_uuid(session_id)):
                self.sessions[session_id] = Session(
                    id=session_id, size=(80, 24), replay=ReplayBuffer(self.config.replay_bytes),
                    created_at=now, phase=Phase.RECOVERED, detached_at=now,
                    container_id=container["id"], announced=True)
                recovered.append(session_id)
        if recovered:
            _log.info("found {count} session(s) of an earlier run; each waits {grace:g} s"
                      " for its client: {ids}", count=len(recovered), grace=self.config.grace,
                      ids=", ".join(recovered))
        # Everything else of this server's is a leftover.
        await self.remove_leftovers()
        return len(recovered)

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
