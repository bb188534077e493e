"""
A session: one container and one shell in it, outliving any one client.

Its data is a L{SessionCore} and its states and transitions its lifecycle
(L{capsule.core.lifecycle}); what callers ask of it are typed questions
(C{state}, C{starting}, C{over}, C{attached}) and Deferreds (L{Session.started},
L{Session.ended}), never its state's name.  The registry that makes and finds
sessions is L{capsule.sessions.manager}.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer

from capsule.core.errors import CapsuleError
from capsule.core.keeper import DEFAULT_SOCKET
from capsule.core.lifecycle import make_lifecycle
from capsule.core.session_core import SessionCore, State
from capsule.core.profiles import DEFAULT_PROFILE, Profile, Secrets
from capsule.core.replay import ReplayBuffer
from capsule.core.spec import ContainerSpec
from capsule.engine.keeper_stream import OutputThrottle

LABEL_MANAGED = "io.capsule.managed"
LABEL_INSTANCE = "io.capsule.instance"
LABEL_SESSION = "io.capsule.session"

# The terminal size a warm session's shell starts at; the client's own is
# applied when it is taken.
WARM_SIZE = (80, 24)


class SessionEnded(CapsuleError):
    """
    The session ended (or could not be started) before what was waited for.
    """

    code = "start_failed"


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
    # Warm sessions a pool may hold beyond its size while takes come fast,
    # and the seconds over which takes are counted (capsule.sessions.pool).
    pool_grow_by: int = 0
    pool_window: float = 30.0
    # Run the shell under capsule-keeper, so that it outlives capsule.
    keeper: bool = True
    keeper_socket: str = DEFAULT_SOCKET
    # The profiles by name (capsule.core.profiles); None: only "shell", made of
    # the fields above.  The values of their secrets.
    profiles: dict | None = None
    secrets: Secrets = Secrets()
    # The profile a session gets when none is named (--default-profile).
    default_profile: str = DEFAULT_PROFILE
    # Whether sessions without a user get the agent volumes of the one local
    # user (capsule has no users: everyone is that user); else they get none
    # (a volume is never shared between users).
    local_volumes: bool = False
    # The session door's port (capsule.gateway.door; 0: none), which the
    # keeper of a session without a network carries: not the session's own.
    door_port: int = 0


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
        self.shell = None
        # Its profile's name, the profile itself (capsule.core.profiles), and the
        # git repository cloned into its /workspace at start, if any.
        self.profile: str = DEFAULT_PROFILE
        # Whether a warm pool holds it (not recorded until it is taken).
        self.pooled = False
        self.settings: Profile | None = None
        self.repository: str | None = None
        # The TCP ports listening in its container, ascending, as its keeper
        # read them (capsule's own left out); whether the keeper said at all
        # (an older one never does); how many more listen than it named.
        self.listening_ports: tuple[int, ...] = ()
        self.ports_known = False
        self.ports_more = 0
        # Whether its shell ran (in this run of capsule, or in an earlier
        # one): only then is there anything to keep.
        self.ran = False
        # A warm container of an earlier run that nobody took: nobody's work,
        # never kept.
        self.untaken = False
        # A resumed kept session: when it was put away (the connected
        # frame's resumed_from); C{None}: it was not.
        self.resumed_from: float | None = None
        # The snapshot it is made from (capsule.sessions.keeping: a fork),
        # and the volumes it owns, copies of that snapshot's, by mount point:
        # removed with its container.
        self.snapshot = None
        self.own_volumes: dict[str, str] = {}
        # The container it is a fork of (its files are copied from it).
        self.fork_of: str | None = None
        # Why its container could not be made (an error's code, e.g.
        # cluster_full: the cluster's quota is used up), or None.
        self.failed_code: str | None = None
        # Who waits for its shell to run, and for its end.
        self._started: list[Deferred] = []
        self._ended: list[Deferred] = []

    def __repr__(self) -> str:
        return f"<Session {self.id[:8]} {self.state}>"

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

    # -- what it is doing ------------------------------------------------

    @property
    def state(self) -> State:
        return self.events.status()

    def status(self) -> str:
        "Its state's name, for the API and the log."
        return self.state.value

    @property
    def starting(self) -> bool:
        "Its shell has not run yet."
        return self.state.starting

    @property
    def over(self) -> bool:
        "It ended, or is ending."
        return self.state.over

    @property
    def attached(self) -> bool:
        "A client is attached."
        return self.core.client is not None

    @property
    def ready(self) -> bool:
        "Its shell has run and it is not over: its container can be worked in."
        return not self.starting and not self.over and self.container_id is not None

    def started(self) -> Deferred:
        """
        Fire with this session once its shell runs (at once if it has), or
        fail with L{SessionEnded} if it ends first.  Cancelling the returned
        Deferred stops waiting, nothing more.
        """
        if self.over:
            return fail(SessionEnded(self.core.message or "the session could not be started"))
        if not self.starting:
            return succeed(self)
        d = Deferred(lambda d: self._started.remove(d) if d in self._started else None)
        self._started.append(d)
        return d

    def ended(self) -> Deferred:
        """
        Fire with this session once it is over (at once if it is).
        """
        if self.over:
            return succeed(self)
        d = Deferred(lambda d: self._ended.remove(d) if d in self._ended else None)
        self._ended.append(d)
        return d

    def went_live(self) -> None:
        """
        Its shell runs: those waiting for it hear so, once the transition
        that says so is over (what they do may ask the session anything).
        """
        if self._started:
            self.core.clock.callLater(0, self._tell_started)

    def went_away(self) -> None:
        "It is over: those waiting for its start or its end hear so, likewise."
        if self._started or self._ended:
            self.core.clock.callLater(0, self._tell_ended)

    def _tell_started(self) -> None:
        waiting, self._started = self._started, []
        for d in waiting:
            d.callback(self)

    def _tell_ended(self) -> None:
        waiting, self._started = self._started, []
        for d in waiting:
            d.errback(SessionEnded(self.core.message or "the session could not be started"))
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(self)

    def output_producer(self) -> IPushProducer:
        """
        The producer a client's connection pauses while it is full.
        """
        return OutputThrottle(self.core)
