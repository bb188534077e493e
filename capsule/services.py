"""
The service tree of a capsule server, and L{make_service}, which builds it
from a L{CapsuleConfig}: every object is given what it needs as it is made.
"""

from __future__ import annotations

import atexit
import os
import resource
import signal

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import (CancelledError, Deferred, DeferredList, maybeDeferred,
                                    succeed)
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger

from capsule.auth.checkers import AuthThreadPool
from capsule.auth.gate import Authenticator
from capsule.config import CapsuleConfig
from capsule.core.addresses import overlapping
from capsule.core.admission import AdmissionControl, AdmissionPolicy, parse_network
from capsule.core.memory import MemoryBudget
from capsule.core.profiles import DEFAULT_PROFILE
from capsule.core.errors import CapsuleError
from capsule.engine.docker import DockerAPI
from capsule.engines import make_engine
from capsule.engine.channels import KeeperChannelEndpoint
from capsule.engine.keeper_direct import DirectKeeper
from capsule.engine.kube_startup import NetworkPoliciesAtStart
from capsule.engine.firewall import Firewall
from capsule.engine.network import FENCED_NETWORK, NotFenced, SessionNetwork
from capsule.gateway.anthropic import AnthropicGateway, GatewayLimits
from capsule.gateway.credentials import (KEY_ENV as GATEWAY_KEY_ENV, Keys, PlaceholderStore,
                                         load_key)
from capsule.gateway.door import SessionDoor, door_url
from capsule.gateway.egress import DoorFactory, EgressLimits, EgressProxy, proxy_environment
from capsule.gateway.git import GitGateway, session_callers
from capsule.gateway.git_rules import GitTokens, git_session_environment
from capsule.gateway.site import SessionEnvironment, make_gateway_site
from capsule.gateway.usage import Usage, UsageCollector
from capsule.sessions.by_address import SessionsByAddress
from capsule.web.preview import PreviewLimits
from capsule.core.preview_access import PreviewAccess
from capsule.ops.logformat import json_observer
from capsule.ops.metrics import Metrics
from capsule.ops.recording import SessionRecorder
from capsule.core.shares import ShareStore
from capsule.sessions.spectators import Spectators
from capsule.sessions.cleanup import CleanupService
from capsule.sessions.replicas import Replicas, ReplicaService
from capsule.sessions.idle import IdlePolicy, IdleService
from capsule.sessions.disk import DiskWatchService, scan_held
from capsule.sessions.owners import OwnerFile, default_state_dir
from capsule.sessions.drain import Drain
from capsule.sessions.host_memory import HostMemory
from capsule.sessions.keeping import KeepingConfig
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.web.connections import (ConnectionLimits, connection_budget,
                                     recommended_descriptors)
from capsule.web.export import ExportLimits
from capsule.web.headers import HostPolicy
from capsule.web.http import ClientAddresses
from capsule.web.site import make_site

# The namespace these lines always had (capsule is ready, recovery, the
# memory budget): operators' log filters name it.
_log = Logger(namespace="capsule.tap")


class DockerService(Service):
    """
    The Docker API's thread pools: started first, stopped last.
    """

    def __init__(self, docker: DockerAPI) -> None:
        self.docker = docker

    def startService(self) -> None:
        super().startService()
        self.docker.start()

    def stopService(self) -> None:
        super().stopService()
        self.docker.stop()


class SessionService(Service):
    """
    The sessions.  On start, finds the sessions of an earlier run (and
    retries while the engine does not answer); C{ready} fires once that is
    done or has failed once, so that the listeners open only when a
    reconnecting client can be answered.  The warm pool starts filling once
    the leftovers of the earlier run are gone.  On stop, lets the sessions
    go (they live on in their containers) and waits briefly for their
    clients to hear it.
    """

    RECOVERY_RETRY = 5.0

    def __init__(self, manager: SessionManager, clock, websocket_factory=None,
                 admission: AdmissionControl | None = None, docker=None,
                 network: SessionNetwork | None = None, trusted_proxies=(),
                 user_header: str | None = None, refuse=None, host=None, door=None,
                 fenced: SessionNetwork | None = None) -> None:
        self.manager = manager
        # The fenced sessions' network (no route out), when a profile's
        # egress is not open: made ready after the other one.
        self.fenced = fenced
        # The session door (capsule.gateway.door), opened on the network's
        # host side once the network is known.
        self._door = door
        # The engine host's reading (capsule.sessions.host_memory), started
        # once the engine says its memory and is found to be this host.
        self._host = host
        # Made ready before the sessions of an earlier run are looked for.
        self.network = network
        # A --trusted-proxy range must not hold the sessions' own addresses:
        # once the network is known, refuse(sentence) stops capsule.
        self._trusted_proxies = tuple(trusted_proxies)
        self._user_header = user_header
        self._refuse = refuse
        self.clock = clock
        self.websocket_factory = websocket_factory
        self.ready: Deferred = Deferred()
        # Sessions of the earlier run found (None: not known yet).
        self.recovered: int | None = None
        self._recovery: Deferred | None = None
        # Given both, the memory budget and reserve follow the engine's
        # memory, once known.
        self._admission = admission
        self._docker = docker
        self._budget: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._recovery = Deferred.fromCoroutine(self._recover())
        self._recovery.addErrback(
            lambda f: None if f.check(CancelledError) else _log.failure(
                "looking for the sessions of an earlier run failed", f))
        if (self._admission is not None and self._admission.memory is not None
                and self._docker is not None):
            self._budget = Deferred.fromCoroutine(self._learn_memory_budget())
            self._budget.addErrback(
                lambda f: None if f.check(CancelledError) else _log.failure(
                    "learning the engine's memory failed", f))

    async def _learn_memory_budget(self) -> None:
        # docker info runs on the Docker pool; until it answers, no budget.
        warned = False
        while True:
            try:
                info = await self._docker.info()
            except CapsuleError as e:
                if not warned:
                    _log.warn("could not learn the engine's memory (retrying every"
                              " {delay:g} s): {message}", delay=self.RECOVERY_RETRY,
                              message=e.message)
                    warned = True
                await deferLater(self.clock, self.RECOVERY_RETRY, lambda: None)
                continue
            break
        try:
            total = int(info["MemTotal"])
        except (KeyError, TypeError, ValueError):
            _log.warn("the engine did not say its memory: no --memory-budget check")
            return
        watched = self._host is not None and self._host.engine_is(total, self._docker.host)
        memory = self._admission.memory
        memory.host_is(total, watched)
        _log.info("memory budget: {budget}, reserve {reserve} (the engine's host has"
                  " {total} bytes)", total=total,
                  budget="off" if memory.budget is None else f"{memory.budget} bytes",
                  reserve="not watched" if memory.reserve is None or not watched
                  else f"{memory.reserve} bytes")

    async def _recover(self) -> None:
        warned = False
        recovery = self.manager.recovery
        recovery.expect()
        while True:
            try:
                if self.network is not None:
                    await self.network.ensure()
                    problem = self.network.refusal or self._proxies_hold_sessions()
                    if problem is not None:
                        if self._refuse is not None:
                            self._refuse(problem)
                        return
                    if self._door is not None:
                        await self._door.listen(self.network.gateways())
                if self.fenced is not None:
                    try:
                        await self.fenced.ensure()
                    except NotFenced as e:
                        if self._refuse is not None:
                            self._refuse(str(e))
                        return
                    if self.fenced.refusal is not None:
                        if self._refuse is not None:
                            self._refuse(self.fenced.refusal)
                        return
                    if self._door is not None:
                        await self._door.listen(self.fenced.gateways())
                count = await recovery.recover()
            except CapsuleError as e:
                if not warned:
                    _log.warn("could not look for the sessions of an earlier run (retrying"
                              " every {delay:g} s): {message}", delay=self.RECOVERY_RETRY,
                              message=e.message)
                    warned = True
                self._open()
                await deferLater(self.clock, self.RECOVERY_RETRY, lambda: None)
                continue
            break
        if warned:
            _log.info("found the sessions of the earlier run: {count}", count=count)
        self.recovered = count
        self._open()
        self.manager.pool.start()
        await recovery.check_engine()
        await recovery.check_profile_images()

    def _proxies_hold_sessions(self) -> str | None:
        """
        What is wrong when a --trusted-proxy range holds addresses of the
        sessions' network: a session could then say who it is.
        """
        found = overlapping(self._trusted_proxies, self.network.subnets())
        if not found:
            return None
        trusted, subnet = found[0]
        claim = (f"any session could name any user in {self._user_header}"
                 if self._user_header else
                 "any session could claim any client address in X-Forwarded-For")
        return (f"--trusted-proxy {trusted} holds addresses of the sessions' network"
                f" {self.network.name} ({subnet}): {claim}. Give the proxy's own addresses"
                f" only (e.g. --trusted-proxy 10.0.0.5/32), or put the sessions on another"
                f" network (--network)")

    def _open(self) -> None:
        if not self.ready.called:
            self.ready.callback(None)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._recovery is not None and not self._recovery.called:
            # A stop during start-up: no recovery and no pool after it.
            self._recovery.cancel()
        if self._budget is not None and not self._budget.called:
            self._budget.cancel()
        if self._host is not None:
            self._host.stop()
        d = Deferred.fromCoroutine(self._stop())
        # The reactor drops errors of shutdown triggers without a word.
        d.addErrback(lambda f: _log.failure("stopping the sessions failed", f))
        return d

    async def _stop(self) -> None:
        await self.manager.shutdown()
        if self.websocket_factory is not None:
            # Let the clients' close handshakes finish (they were told to
            # come back), but not for long.
            await self.websocket_factory.wait_closed(3.0)


class ListenerService(MultiService):
    """
    The listening ports, as children: opened once C{ready} fires (the
    sessions of an earlier run are known), closed first on stop.  Once they
    are open, says where to go: C{capsule is ready: URL (N sessions recovered)}.

    @param recovered: how many sessions of an earlier run were found (C{None}:
        not known yet).
    """

    def __init__(self, ready: Deferred, recovered=lambda: None,
                 public_url: str | None = None) -> None:
        super().__init__()
        self._ready = ready
        self._recovered = recovered
        self._public_url = public_url

    def privilegedStartService(self) -> None:
        # twistd asks services to bind their ports before startService: the
        # ports would accept connections before the sessions are known.
        # They are bound in _open instead (a port below 1024 then needs the
        # right to bind it, e.g. CAP_NET_BIND_SERVICE, rather than twistd's
        # --uid dropping root after binding).
        Service.privilegedStartService(self)

    def startService(self) -> None:
        # Not MultiService's: the children start later.
        Service.startService(self)
        self._ready.addCallback(self._open)

    def _open(self, _=None) -> None:
        if self.running:
            for service in self:
                service.privilegedStartService()
                service.startService()
            self._announce()

    def _announce(self) -> None:
        waiting = []
        for service in self:
            d = getattr(service, "_waitingForPort", None)
            if d is not None:
                tls = type(getattr(service, "endpoint", None)).__name__.startswith("SSL")
                waiting.append(Deferred())
                d.addCallback(lambda port, w=waiting[-1], tls=tls: (
                    w.callback((port, tls)), port)[1])
        gathered = DeferredList(waiting)

        def say(results) -> None:
            urls = [listening_url(port, tls) for _, (port, tls) in results if port is not None]
            if not urls:
                _log.error("capsule could not open any of its --listen ports")
                return
            count = self._recovered()
            recovered = ("the sessions of an earlier run are not known yet" if count is None
                         else f"{count} session{'' if count == 1 else 's'} recovered")
            _log.info("capsule is ready: {urls} ({recovered})", recovered=recovered,
                      urls=", ".join([self._public_url.rstrip("/") + "/"] if self._public_url
                                     else urls))
        gathered.addCallback(say)
        gathered.addErrback(lambda f: _log.failure("saying where capsule listens failed", f))

    def stopService(self) -> Deferred:
        if not self._ready.called:
            Service.stopService(self)
            return succeed(None)
        return super().stopService()


def listening_url(port, tls: bool) -> str:
    """
    The URL of a listening port, as this machine reaches it.
    """
    address = port.getHost()
    host = getattr(address, "host", None)
    if host is None:
        return f"unix:{getattr(address, 'name', address)}"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{address.port}/"


class CapsuleService(MultiService):
    """
    The whole server.  Its children start in this order and stop in the
    reverse one: the Docker pools, the sessions, the cleanup timer, the
    listeners.
    """

    def __init__(self, docker: DockerAPI, sessions: SessionService, listeners: ListenerService,
                 websocket_factory=None, log_observer=None) -> None:
        super().__init__()
        self.docker = docker
        self.manager = sessions.manager
        self.sessions = sessions
        self.listeners = listeners
        self.websocket_factory = websocket_factory
        # What twistd logs to (--log-format json), or None: twistd's own.
        self.log_observer = log_observer

    def stopService(self) -> Deferred:
        """
        Stop the children one after the other, in the reverse order of their
        start, each once the one before it has stopped (MultiService stops
        them all at once): the Docker pools stop only after the sessions'
        containers are removed, since a call handed to a stopped pool is
        dropped and never answers.
        """
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                _log.failure("stopping {service} failed", service=child)

    def setServiceParent(self, parent) -> None:
        # twistd's application: twistd logs to the observer it carries.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)


def stop_on_signals(reactor) -> None:
    """
    Stop the reactor on SIGTERM and SIGINT, as twistd's own handlers do, but
    without logging inside the signal handler: twistd's log that the signal
    came, and a log call of the main thread that the signal interrupted, can
    wait for one another's lock for ever (seen: a twistd that never stopped
    on SIGTERM).  The handler only hands the stop to the reactor's thread,
    which logs it.
    """
    def stop(name: str) -> None:
        _log.info("received {signal}: stopping", signal=name)
        try:
            reactor.stop()
        except ReactorNotRunning:
            # A second signal while stopping (Ctrl-C under `make run` reaches
            # twistd and the shell, which passes it on): stopping already.
            pass

    def handler(signum, frame) -> None:
        reactor.callFromThread(stop, signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)



# capsule's own out-of-memory score adjustment: under dockerd's (-500),
# over containerd's (-999); sessions' processes have 1000
# (capsule.core.spec.SESSION_OOM_SCORE_ADJ).
CAPSULE_OOM_SCORE_ADJ = -900


def protect_from_oom(path: str = "/proc/self/oom_score_adj",
                     value: int = CAPSULE_OOM_SCORE_ADJ) -> bool:
    """
    Lower capsule's out-of-memory score adjustment to C{value}, unless it
    is already that low: when the host runs out of memory the kernel kills
    a session's process, not capsule.  Lowering it takes CAP_SYS_RESOURCE
    (root): without it, the log says what the service manager must set.
    Whether capsule's is C{value} or lower now.
    """
    try:
        with open(path) as f:
            current = int(f.read().strip())
    except (OSError, ValueError) as e:
        _log.warn("could not read capsule's out-of-memory score ({path}: {error})",
                  path=path, error=e)
        return False
    if current <= value:
        return True
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
    except OSError as e:
        _log.warn("could not lower capsule's out-of-memory score adjustment from {current} to"
                  " {value} ({error}): when the host runs out of memory the kernel may kill"
                  " capsule rather than a session; set OOMScoreAdjust={value} in its systemd"
                  " unit (or oom_score_adj in Compose)", current=current, value=value,
                  error=e.strerror or e)
        return False
    _log.info("capsule's out-of-memory score adjustment is {value} (was {current})",
              value=value, current=current)
    return True


def refuse_to_start(reactor, message: str) -> None:
    """
    Stop capsule during its start for a reason its operator must fix: the
    log says why, and the process exits with status 1 (twistd itself would
    say 0).
    """
    _log.critical("capsule cannot start: {message}", message=message)
    atexit.register(os._exit, 1)
    if reactor.running:
        reactor.stop()


def session_config(config: CapsuleConfig) -> SessionConfig:
    """
    What the session manager is told.
    """
    return SessionConfig(
        spec=config.spec, instance=config.instance, grace=config.grace, shell=config.shell,
        replay_bytes=config.replay_bytes, pool_size=config.pool_size,
        pool_max_age=config.tuning.pool_max_age, pool_grow_by=config.tuning.pool_grow_by,
        pool_window=config.tuning.pool_window, max_lifetime=config.max_lifetime,
        idle_timeout=config.idle_timeout, keeper=config.keeper,
        profiles=dict(config.profiles), secrets=config.secrets,
        default_profile=config.default_profile, local_volumes=not config.users,
        door_port=config.door_port)


def keeping_config(config: CapsuleConfig) -> KeepingConfig:
    """
    How sessions are kept (capsule.sessions.keeping): the options', the
    records beside the owners' file.
    """
    return KeepingConfig(retention=config.retention, max_kept=config.max_kept_per_user,
                         max_kept_bytes=config.max_kept_bytes_per_user,
                         max_snapshots=config.max_snapshots_per_user,
                         state_dir=config.state_dir or default_state_dir())


# The soft limit capsule raises its own to, when the hard one is unlimited.
DESCRIPTORS_WANTED = 65536


def descriptor_limit(limits=resource) -> int:
    """
    capsule's file descriptor limit (C{RLIMIT_NOFILE}), its soft limit
    raised to the hard one first when lower (systemd's default soft limit
    is 1024 under a hard one of 524288).
    """
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    target = DESCRIPTORS_WANTED if hard == limits.RLIM_INFINITY else hard
    if soft != limits.RLIM_INFINITY and soft < target:
        try:
            limits.setrlimit(limits.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            _log.warn("could not raise the file descriptor limit from {soft} to {target}:"
                      " {error}", soft=soft, target=target, error=e)
            return soft
        _log.info("raised the file descriptor limit from {soft} to {target}", soft=soft,
                  target=target)
        return target
    return DESCRIPTORS_WANTED if soft == limits.RLIM_INFINITY else soft


def connection_limits(config: CapsuleConfig, descriptors: int) -> ConnectionLimits:
    """
    The site's connection limits under C{descriptors} file descriptors;
    a warning when they are few for C{--max-sessions}.
    """
    tuning = config.tuning
    threads = tuning.docker_threads + tuning.export_threads
    total = connection_budget(descriptors, config.max_sessions, threads)
    wanted = recommended_descriptors(config.max_sessions, threads,
                                     config.max_connections_per_client)
    if descriptors < wanted:
        _log.warn("capsule may open {descriptors} files (RLIMIT_NOFILE), few for"
                  " --max-sessions {sessions}: it holds {total} client connections at most;"
                  " raise LimitNOFILE (systemd) or ulimits: nofile (Compose) to {wanted} or"
                  " more", descriptors=descriptors, sessions=config.max_sessions,
                  total=total, wanted=wanted)
    return ConnectionLimits(
        per_client=config.max_connections_per_client, total=total,
        header_timeout=tuning.http_header_timeout, idle_timeout=tuning.http_idle_timeout,
        exempt=tuple(config.trusted_proxies))


def warm_room(memory: MemoryBudget, manager) -> bool:
    """
    Whether a warm pool may hold one more session beyond its size: while
    the memory budget has room for it and for one more session of the
    largest request besides, so that a pool grown for a burst is not why the
    next user is refused.
    """
    largest = max((memory.request_of(p) for p in manager.profiles.values()), default=0)
    return memory.room_for_warm(manager.sessions.values(), manager.pool.held, None,
                                beside=largest)


def _door_of(port: int, environment: SessionEnvironment, profile) -> str | None:
    """
    The session door's URL for a session of C{profile} (see
    L{SessionEnvironment.door_host}), or C{None}: no door, or none it
    reaches.
    """
    host = environment.door_host(profile) if port else None
    return door_url(host, port) if host is not None else None


def make_service(config: CapsuleConfig, reactor, descriptors: int | None = None
                 ) -> CapsuleService:
    """
    The server C{config} describes, its objects made in the order they need
    one another: the metrics, the engine, the sessions, who may use them,
    admission, the site, and the services that start and stop them.

    @param descriptors: the file descriptors capsule may open (by default
        its C{RLIMIT_NOFILE}, raised to the hard limit).
    """
    tuning = config.tuning
    if descriptors is None:
        descriptors = descriptor_limit()
    metrics = Metrics()
    # Docker's containers, or a cluster's pods (capsule.engines).
    docker = make_engine(config, reactor, metrics)
    kubernetes = config.kubernetes
    owners = recorder = None
    if config.users:
        owners = OwnerFile(config.state_dir or default_state_dir(), config.instance)
    if config.record is not None:
        recorder = SessionRecorder(config.record, reactor, config.record_max_bytes)
    # Read-only share links: their spectators hear the sessions' output.
    spectators = Spectators(reactor, ShareStore(reactor, tuning.share_ttl,
                                                max(tuning.share_ttl, tuning.share_max_ttl)),
                            tuning.watchers_per_session)
    # What the engine's host has, read when it is this host; the sessions'
    # memory is counted against the budget and the reserve.
    # (A cluster's pods run on its nodes, never this host: not read.)
    host = None if kubernetes else HostMemory(
        reactor, lambda: [s.container_id for s in manager.sessions.values()
                          if s.container_id is not None],
        interval=tuning.host_memory_interval, reserve=lambda: memory.reserve)
    memory = MemoryBudget(config.memory_request, budget=config.memory_budget,
                          reserve=config.memory_reserve, reading=host,
                          budget_from_host=config.memory_budget_from_engine,
                          reserve_from_host=config.memory_reserve_from_engine)
    # The metrics, the owners' file, the recorder and the spectators observe
    # the sessions.
    direct = DirectKeeper(reactor, docker) if config.keeper and tuning.keeper_direct else None
    firewall = Firewall(reactor, config.firewall, door_port=config.door_port,
                        allowed=config.egress_allow_addresses)
    network = SessionNetwork(docker, reactor, config.spec.network, firewall=firewall)
    # The fenced sessions' network (a profile's egress is not open): no route
    # out; the firewall fences what it reaches of the host but the door.
    fenced = None
    if any(p.spec.network == FENCED_NETWORK for p in config.profiles.values()):
        fenced = SessionNetwork(docker, reactor, FENCED_NETWORK, firewall=firewall)
    # The egress proxy behind the session door: fenced sessions' one way out.
    egress = EgressProxy(reactor, allowed=[parse_network(a)
                                           for a in config.egress_allow_addresses],
                         ports=config.egress_ports, metrics=metrics,
                         limits=EgressLimits(tunnels=tuning.egress_tunnels,
                                             idle_timeout=tuning.egress_idle_timeout))
    # The credential gateway: placeholders in sessions, the keys kept here.
    keys = Keys.from_secrets(config.secrets.values)
    placeholders = PlaceholderStore(
        lambda: load_key(config.state_dir or default_state_dir(), config.instance),
        lambda: manager.sessions)
    usage = Usage(reactor, config.anthropic_budget)
    metrics.registry.register(UsageCollector(usage))
    # The session door: on the session networks' gateways, and over the
    # keeper's channels for sessions without a network (the manager's); the
    # gateway and the egress proxy behind it are made once the manager is.
    door = None
    if config.door_port:
        door = SessionDoor(reactor, config.door_port, factory_of=lambda: door_factory)
    # What sessions learn of the door: CAPSULE_DOOR and Anthropic's
    # settings, git's (for a profile naming the github credential), the
    # same placeholder in both, and a fenced session's proxy.
    gateway_environment = SessionEnvironment(config.door_port,
                                             [n for n in (network, fenced) if n is not None],
                                             placeholders, keys)
    git_environment = git_session_environment(
        lambda profile: _door_of(config.door_port, gateway_environment, profile),
        placeholders.issue)
    manager = SessionManager(docker, reactor, session_config(config), metrics=metrics,
                             owners=owners,
                             observers=[o for o in (recorder, spectators, placeholders, usage,
                                                    egress) if o is not None],
                             memory=memory, direct=direct,
                             pool_room=lambda: warm_room(memory, manager), door=door,
                             keeping=keeping_config(config),
                             session_environment=[
                                 gateway_environment, git_environment,
                                 proxy_environment(gateway_environment.door_host,
                                                   config.door_port)])
    metrics.watch(manager)
    replicas = None
    if kubernetes:
        # Replicas share the cluster: any one serves any session.
        replicas = manager.replicas = Replicas(manager, docker, reactor, config.replica,
                                               lease=tuning.replica_lease,
                                               renew=tuning.replica_renew)
        manager.observers.add(replicas)
        if not os.environ.get(GATEWAY_KEY_ENV) and any(
                p.credentials for p in config.profiles.values()):
            _log.warn("{env} is not set: this replica's credential gateway key is its own, so"
                      " a session another replica started or served cannot use the gateway"
                      " here (give every replica the same key from a Secret:"
                      " docs/kubernetes.md)", env=GATEWAY_KEY_ENV)
    for profile, name in config.secrets.missing(config.profiles):
        _log.warn("profile {profile} names the secret {name}, which has no value (neither in"
                  " capsule's environment nor in --secrets-file): its sessions start without"
                  " it", profile=profile, name=name)
    # A request from a session's address never has its proxy headers
    # believed, whatever --trusted-proxy says.
    addresses = ClientAddresses(list(config.trusted_proxies), lambda: network.subnets() + (
        fenced.subnets() if fenced is not None else []))
    authenticator = auth_threads = None
    if config.users:
        auth_threads = AuthThreadPool(reactor)
        authenticator = Authenticator(
            reactor, htpasswd=config.auth, tokens=config.tokens,
            user_header=config.user_header, addresses=addresses,
            public_url=config.public_url, run_blocking=auth_threads.run)
    admission = AdmissionControl(manager, reactor, AdmissionPolicy(
        max_sessions=config.max_sessions, max_per_client=config.max_sessions_per_client,
        rate=config.session_rate, max_per_user=config.max_sessions_per_user,
        max_removing=tuning.max_removing),
        trusted_proxies=list(config.trusted_proxies), memory=memory)
    site = make_site(
        manager, docker, reactor, config.www, admission=admission, spectators=spectators,
        recorder=recorder,
        watch_backlog=tuning.watch_backlog,
        drain=Drain(manager, reactor), metrics=metrics, authenticator=authenticator,
        firewall=firewall,
        client_address=addresses,
        # A new session's container is asked for as its WebSocket opens,
        # unless start-at-first-frame.
        start_at_open=not tuning.start_at_first_frame,
        metrics_token=config.metrics_token, admin_token=config.admin_token,
        admin_usage=usage.describe,
        # Each session's egress refusals, counted by the proxy.
        admin_session_facts=lambda session_id: {
            "egress_refusals": egress.refusals.get(session_id, 0)},
        admin_users=list(config.admin_users),
        # With users, loopback is everyone on the machine: not admin unless said.
        admin_loopback=config.admin_loopback or not config.users,
        max_message_size=tuning.max_message_size,
        allowed_origins=config.allowed_origins,
        host_policy=HostPolicy(public_url=config.public_url,
                               allowed_hosts=list(config.allowed_hosts),
                               allowed_origins=list(config.allowed_origins)),
        ping_interval=tuning.ping_interval, ping_timeout=tuning.ping_timeout,
        stall_timeout=tuning.ws_stall_timeout,
        connection_limits=connection_limits(config, descriptors),
        flow_window=tuning.flow_window, coalesce_delay=tuning.coalesce_delay,
        export_limits=ExportLimits(
            workers=tuning.export_threads, per_client=config.exports_per_client,
            max_bytes=config.export_max_bytes, timeout=config.export_timeout,
            spool=tuning.export_spool_bytes, spool_budget=tuning.export_spool_budget,
            stall=tuning.export_stall),
        public_url=config.public_url, upload_max_bytes=config.upload_max_bytes,
        preview_domain=config.preview_domain, own_ports=(config.door_port,),
        preview_access=PreviewAccess(reactor, ShareStore(
            reactor, tuning.share_ttl, max(tuning.share_ttl, tuning.share_max_ttl))),
        preview_limits=PreviewLimits(per_session=config.preview_connections_per_session,
                                     bytes_per_second=config.preview_bytes_per_second),
        # A session without a network: its ports over its keeper's channels.
        preview_no_network=lambda session, port: succeed(
            KeeperChannelEndpoint(reactor, session, port)),
        access_log=config.access_log,
        spool_max_bytes=config.spool_max_bytes, bodies_per_address=tuning.bodies_per_address,
        answer_write_timeout=tuning.answer_write_timeout,
        # No one user (or client) may hold more than a quarter of the
        # Docker threads with its execs and uploads.
        docker_calls_per_caller=max(1, tuning.docker_threads // 4))
    fenced_profiles = sorted(p.name for p in config.profiles.values() if p.egress.fenced)
    if fenced_profiles and not config.door_port:
        _log.warn("--door-port 0: sessions of {profiles} (egress not open) have no way out at"
                  " all (the egress proxy stands behind the session door)",
                  profiles=", ".join(fenced_profiles))
    anthropic = AnthropicGateway(
        reactor, placeholders, keys, manager.sessions, usage,
        upstream=config.anthropic_upstream,
        limits=GatewayLimits(per_session=tuning.anthropic_requests_per_session,
                             body_bytes=tuning.anthropic_body_bytes,
                             connect_timeout=tuning.anthropic_connect_timeout,
                             answer_timeout=tuning.anthropic_answer_timeout,
                             idle_timeout=tuning.anthropic_idle_timeout),
        profile_of=lambda session: session.settings or manager.profiles[DEFAULT_PROFILE])
    git = GitGateway(reactor, session_callers(placeholders, manager.sessions),
                     GitTokens(keys.get("github"), config.github_tokens),
                     upstream=config.github_upstream, ca_file=config.gateway_ca)
    gateway_site = make_gateway_site(anthropic, reactor, git=git)
    # Who a connection to the door is: the session whose container has its
    # source address (a session without a network is known by its keeper's
    # channel instead: capsule.sessions.manager).
    sessions_by_address = SessionsByAddress(
        manager, docker, reactor, lambda: [n.name for n in (network, fenced)
                                           if n is not None and n.network is not None])
    door_factory = DoorFactory(egress, gateway_site, lambda transport: Deferred.fromCoroutine(
        sessions_by_address.find(transport.getPeer().host)))
    sessions = SessionService(manager, reactor, site.websocket_factory, admission,
                              # (A cluster says no memory of its own.)
                              None if kubernetes else docker, network, trusted_proxies=config.trusted_proxies,
                              user_header=config.user_header,
                              refuse=lambda message: refuse_to_start(reactor, message),
                              host=host, door=door, fenced=fenced)
    listeners = ListenerService(sessions.ready, lambda: sessions.recovered,
                                config.public_url)
    for description in config.listen:
        strports.service(description, site).setServiceParent(listeners)
    service = CapsuleService(
        docker, sessions, listeners, site.websocket_factory,
        log_observer=(json_observer(config.server_options)
                      if config.log_format == "json" else None))
    DockerService(docker).setServiceParent(service)
    if kubernetes:
        # The session namespace's NetworkPolicies, asked for until made.
        NetworkPoliciesAtStart(docker, reactor).setServiceParent(service)
    if replicas is not None:
        # After the engine, before the sessions: says this replica lives
        # before it looks for its sessions, and stops saying so last.
        ReplicaService(replicas).setServiceParent(service)
    if recorder is not None:
        # Before the sessions: it stops after them, and writes what they said.
        recorder.setServiceParent(service)
    if auth_threads is not None:
        auth_threads.setServiceParent(service)
    if door is not None:
        # Before the sessions: it stops after them.
        door.setServiceParent(service)
    sessions.setServiceParent(service)
    if config.idle_timeout or any(p.idle_timeout for p in config.profiles.values()):
        IdleService(manager, reactor, tuning.cleanup_interval, docker,
                    IdlePolicy(tuning.idle_cpu_interval,
                               tuning.idle_cpu_threshold)).setServiceParent(service)
    CleanupService(manager, reactor, tuning.cleanup_interval,
                   tuning.orphan_sweep).setServiceParent(service)
    disk_limits = config.disk_bytes is not None or any(
        p.spec.disk or (p.agent_volume and p.agent_volume_limit is not None)
        for p in config.profiles.values())
    if disk_limits and kubernetes:
        _log.info("the pods' disk limits are the kubelet's to enforce (their ephemeral-storage"
                  " limit): capsule does not watch their disk use")
    elif disk_limits:
        DiskWatchService(
            manager, reactor, config.disk_bytes, tuning.disk_check_interval,
            lambda volumes: docker.disk_usage(manager.labels, volumes),
            enforced=lambda: docker.storage_quota is True,
            scan=lambda container_id, user: scan_held(docker, container_id, user),
            scans=tuning.disk_scans_per_check,
            volume_grace=tuning.agent_volume_grace).setServiceParent(service)
    listeners.setServiceParent(service)
    spec = config.spec
    _log.info("capsule will run sessions in {image} (memory {memory}, {cpus:g} CPUs,"
              " {pids} processes), grace {grace:g} s, {engine}",
              image=spec.image, memory=spec.memory, cpus=spec.cpus, pids=spec.pids,
              grace=config.grace,
              engine=(f"as pods in the namespace {config.kube_namespace} of"
                      f" {config.kubeconfig or 'the default kubeconfig or service account'}"
                      f" (replica {config.replica})" if kubernetes
                      else f"Docker at {docker.host}"))
    if authenticator is None and not config.insecure_no_auth:
        _log.info("capsule has no users (no --auth, --tokens or --user-header): it listens"
                  " on loopback only, and anyone who can reach that port gets a terminal")
    elif authenticator is None:
        _log.warn("--insecure-no-auth: anyone who reaches {listen} gets a terminal",
                  listen=", ".join(config.listen))
    return service
