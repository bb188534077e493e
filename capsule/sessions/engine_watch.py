"""
When a session's shell stream closes: find out why (the shell exited, its
container stopped or was removed, or the engine cannot be reached), and
while the engine is away, ask again until it answers or the grace period
runs out.  Each finding goes back to the session's lifecycle as an input.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.task import deferLater
from twisted.logger import Logger

from capsule.core.errors import CapsuleError, DockerUnavailable
from capsule.core.session_core import State

_log = Logger()

# How often a session whose engine went away asks for it again: from the
# first delay, doubling up to the last.
ENGINE_RETRY_FIRST = 0.5
ENGINE_RETRY_MAX = 5.0


class EngineWatch:
    """
    Diagnoses closed streams and waits out engine outages, for the sessions
    of one server.

    @param spec_of: the container spec of a session (its image and limits,
        named in what the client is told).
    @param keeper: whether shells run under the keeper (which reports their
        exit status).
    @param grace: how long a session waits for an engine that went away.
    @param stopped: called with a session and a sentence when its
        container stopped under it (not its shell's own exit: the host or
        the engine restarted, or it was stopped); returns whether it put
        the session away (L{capsule.sessions.keeping.Keeping.stopped}),
        else the session ends.
    """

    def __init__(self, docker, clock, spec_of, keeper: bool, grace: float,
                 stopped=None) -> None:
        self._docker = docker
        self._stopped = stopped or (lambda session, message: False)
        self._clock = clock
        self._spec_of = spec_of
        self._keeper = keeper
        self._grace = grace
        # What a session runs in: a container, or (Kubernetes) a pod,
        # which is deleted rather than removed.
        self._unit = getattr(docker, "session_unit", "container")
        self._removed = "deleted" if self._unit == "pod" else "removed"
        self._engine = ("the Kubernetes API server" if self._unit == "pod"
                        else "the Docker engine")

    # -- a stream closed ---------------------------------------------------

    def diagnose(self, session, facts) -> None:
        d = Deferred.fromCoroutine(self._diagnose(session, facts))
        d.addErrback(lambda f: _log.failure("ending session {session_id} failed", f,
                                            session_id=session.id[:8]))

    async def _diagnose(self, session, facts) -> None:
        reason = facts.reason
        code = 0 if reason is None or reason.check(ProcessDone) else getattr(
            reason.value, "exitCode", None)
        stderr = facts.stderr.decode("utf-8", "replace").strip()
        away = stopped = None
        if self._keeper and facts.exit_status is not None:
            code = facts.exit_status
        elif self._keeper and "capsule-keeper" in stderr and (
                "not found" in stderr or "no such" in stderr.lower()):
            code, message = None, (
                f"the image {self._spec_of(session).image} has no capsule-keeper: build it from"
                " capsule's docker/Dockerfile, or start capsule with --no-keeper")
        elif self._keeper or code is None:
            # The stream ended without the shell's status: find out why.
            code = None
            message, away, stopped = await self._why_gone(session)
            if stderr and not away:
                message = f"{message}: {stderr.splitlines()[-1]}"
        if code == 137:
            message = ("the shell was killed (signal 9; most often it ran out of memory"
                       f" under the {self._spec_of(session).memory} limit)")
        elif code is not None:
            message = f"the shell exited with code {code}"
        if stopped and self._stopped(session, message):
            return
        if away:
            _log.warn("session {session_id} lost its shell's stream: {message}; waiting"
                      " up to {grace:g} s for the engine", session_id=session.id[:8],
                      message=message, grace=self._grace)
            session.events.engine_lost(message)
        else:
            session.events.end(code, message)

    async def _why_gone(self, session) -> tuple[str, bool, bool]:
        """
        Why a session's stream closed: a sentence, whether the cause is
        that the engine cannot be reached (the container may well run on),
        and whether its container stopped (and is still there).
        """
        # A container being killed may still say it runs for a moment.
        for attempt in range(6):
            try:
                state = await self._docker.container_state(session.container_id)
            except DockerUnavailable as e:
                return f"the connection to the shell was lost ({e.message})", True, False
            except CapsuleError as e:
                return f"the connection to the shell was lost ({e.message})", False, False
            if (state is None or not state.get("Running") or attempt == 5
                    or gone_message(state, self._unit) is not None):
                break
            await deferLater(self._clock, 0.2, lambda: None)
        if state is None:
            return f"the session's {self._unit} was {self._removed}", False, False
        if (message := gone_message(state, self._unit)) is not None:
            # A pod evicted or deleted under its session leaves the
            # session's volume claim: keepable, as a stopped container is.
            return message, False, self._unit == "pod"
        if state.get("OOMKilled"):
            return (f"the session's {self._unit} ran out of memory (limit "
                    f"{self._spec_of(session).memory}) and was stopped"), False, True
        if not state.get("Running"):
            return (f"the session's {self._unit} stopped (exit code {state.get('ExitCode')})",
                    False, True)
        return "the connection to the shell was lost", False, False

    # -- the engine went away ----------------------------------------------

    def await_engine(self, session) -> None:
        d = Deferred.fromCoroutine(self._await_engine(session))
        d.addErrback(lambda f: _log.failure("waiting for the engine for session {session_id}"
                                            " failed", f, session_id=session.id[:8]))

    async def _await_engine(self, session) -> None:
        deadline = self._clock.seconds() + self._grace
        delay = ENGINE_RETRY_FIRST
        while True:
            try:
                state = await self._docker.container_state(session.container_id)
            except CapsuleError:
                if self._clock.seconds() >= deadline:
                    session.events.end(None, f"{self._engine} did not come back within"
                                             f" {self._grace:g} s")
                    return
                await deferLater(self._clock, delay, lambda: None)
                delay = min(delay * 2, ENGINE_RETRY_MAX)
                # Ended, or let go, meanwhile: nothing to wait for.
                if session.state is not State.INTERRUPTED:
                    return
                continue
            if state is None:
                session.events.end(None, f"the session's {self._unit} is gone: it was"
                                         f" {self._removed} while {self._engine} was away")
            elif (message := gone_message(state, self._unit)) is not None:
                if self._unit != "pod" or not self._stopped(session, message):
                    session.events.end(None, message)
            elif not state.get("Running"):
                message = (f"the session's {self._unit} stopped while {self._engine} was away"
                           f" (exit code {state.get('ExitCode')})")
                if not self._stopped(session, message):
                    session.events.end(None, message)
            else:
                _log.info("the engine answers again: attaching to session {session_id}",
                          session_id=session.id[:8])
                session.events.engine_back()
            return


def gone_message(state: dict, unit: str = "container") -> str | None:
    """
    What ended a session whose engine says C{state} of its container,
    when the engine took it away: evicted by the cluster (C{Reason}
    C{Evicted}, its message in C{Error}), or being deleted (C{Status}
    C{removing}: a pod's deletionTimestamp, a node lost) or deleted (a pod
    gone, not by capsule, whose volume claim is left: C{Reason}
    C{Deleted}).  C{None}: neither.
    """
    if state.get("Reason") == "Evicted":
        why = (state.get("Error") or "").strip()
        return f"the session's {unit} was evicted" + (f": {why}" if why else "")
    if state.get("Status") == "removing" or state.get("Reason") == "Deleted":
        return f"the session's {unit} was {'deleted' if unit == 'pod' else 'removed'}"
    return None
