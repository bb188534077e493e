"""
C{twistd capsule}: options, and the service tree they describe.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import signal
from urllib.parse import urlsplit

from docker.utils import parse_bytes
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import _parse as _parse_endpoint
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from capsule.core.admission import AdmissionControl, AdmissionPolicy, parse_network, parse_rate
from capsule.auth.checkers import AuthThreadPool
from capsule.auth.gate import Authenticator
from capsule.sessions.cleanup import CleanupService
from capsule.sessions.disk import DiskWatchService
from capsule.core.spec import ContainerSpec
from capsule.engine.docker import DockerAPI
from capsule.core.errors import CapsuleError
from capsule.web.export import ExportLimits
from capsule.web.headers import HostPolicy
from capsule.web.http import ClientAddresses
from capsule.ops.logformat import FORMATS, check_server_options, json_observer
from capsule.ops.metrics import Metrics
from capsule.engine.network import CAPSULE_NETWORK, SessionNetwork
from capsule.core.profiles import (DEFAULT_AGENT_IMAGE, DEFAULT_CLONE_TIMEOUT, Profile, ProfileError,
                       builtin_profiles, load_profiles, load_secrets)
from capsule.sessions.owners import OwnerFile, default_state_dir
from capsule.ops.recording import DEFAULT_MAX_BYTES, SessionRecorder, check_directory
from capsule.sessions.manager import SessionManager
from capsule.sessions.session import SessionConfig
from capsule.web.site import default_www, make_site

_log = Logger()


def _positive(kind):
    def convert(value):
        number = kind(value)
        if number <= 0:
            raise ValueError(f"must be more than 0, got {value}")
        return number
    return convert


def _non_negative_float(value):
    number = float(value)
    if not number >= 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return number


def _non_negative_int(value):
    number = int(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return number


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve browser terminals, each in a fresh, isolated, resource-limited Docker"
        " container. One process serves the page (/), the WebSocket (/ws), /health and"
        " /api/export/{session_id}."
    )

    optParameters = [
        ["image", None, "capsule-runtime:latest", "Docker image of session containers."],
        ["memory", None, "4g", "Memory limit of each container (Docker syntax: 512m, 4g)."],
        ["cpus", None, 2.0, "CPU limit of each container.", _positive(float)],
        ["pids", None, 256, "Process limit of each container.", _positive(int)],
        ["cpu-shares", None, 256,
         "CPU weight of each container when the CPUs are busy (the server's and the"
         " engine's is 1024): sessions yield to capsule and to interactive work.",
         _positive(int)],
        ["disk", None, None,
         "Size each container may write (Docker syntax: 2g); a session past it ends"
         " [default: no limit]. Enforced by the storage driver where it can, else"
         " checked every --disk-check-interval."],
        ["disk-check-interval", None, 30.0,
         "Seconds between checks of the sessions' disk use (where --disk is not"
         " enforced by the storage driver).", _positive(float)],
        ["grace", None, 60.0,
         "Seconds a session (and its container) is kept after its last client left.",
         _positive(float)],
        ["cleanup-interval", None, 5.0, "Seconds between sweeps for expired sessions.",
         _positive(float)],
        ["orphan-sweep", None, 30.0,
         "Seconds between sweeps for containers of this server that no session owns.",
         _positive(float)],
        ["www", None, None, "Directory of the web page [default: the installed one]."],
        ["instance", None, "default",
         "Name of this server. Its containers are labelled with it; at start-up it"
         " removes the leftovers of its own name only."],
        ["shell", None, "bash -l", "The command run in each session's terminal."],
        ["max-message-size", None, 256 * 1024,
         "Largest WebSocket message accepted, in bytes (larger: close 1009).",
         _positive(int)],
        ["replay-buffer", None, 1024 * 1024,
         "Bytes of recent output each session keeps for reconnecting clients.",
         _non_negative_int],
        ["ping-interval", None, 20.0, "Seconds between WebSocket pings to each client.",
         _positive(float)],
        ["ping-timeout", None, 20.0,
         "Seconds without a pong after which a client is considered gone.",
         _positive(float)],
        ["max-lifetime", None, 0.0,
         "Seconds after which a session ends however busy it is (0: no limit).",
         _non_negative_float],
        ["idle-timeout", None, 86400.0,
         "Seconds without input and without output after which a session ends, client"
         " attached or not (0: no limit).", _non_negative_float],
        ["pool-size", None, 2,
         "Started containers kept ready for new sessions (0 disables the warm pool).",
         _non_negative_int],
        ["pool-max-age", None, 3600.0,
         "Seconds after which a warm container is replaced instead of handed out.",
         _positive(float)],
        ["flow-window", None, 1024 * 1024,
         "Bytes a binary-protocol client may have unacknowledged before its output pauses.",
         _positive(int)],
        ["coalesce-ms", None, 2.0,
         "Milliseconds during which output following a send is gathered into one frame.",
         float],
        ["docker-threads", None, 16, "Threads for Docker calls.", _positive(int)],
        ["max-sessions", None, 32, "Sessions at once, in all (more: server_full, close 4503).",
         _positive(int)],
        ["max-sessions-per-client", None, 8,
         "Sessions at once created from one client address (more: quota_exceeded, close"
         " 4429).", _positive(int)],
        ["session-rate", None, "10/60",
         "New sessions one client address may create, as COUNT/SECONDS (a token bucket:"
         " bursts of COUNT); more: quota_exceeded, close 4429."],
        ["memory-budget", None, None,
         "Memory the sessions' and warm containers' --memory limits may add up to"
         " (Docker syntax: 16g); past it a new session is refused with server_full;"
         " off disables [default: the engine's total memory]."],
        ["export-threads", None, 4, "Threads for workspace exports.", _positive(int)],
        ["exports-per-client", None, 2,
         "Exports one client address may have running or waiting (more: 429).",
         _positive(int)],
        ["export-max-bytes", None, 2 * 1024 ** 3,
         "Bytes of archive after which an export is cut off (Docker syntax: 512m, 2g).",
         _positive(parse_bytes)],
        ["export-timeout", None, 600.0, "Seconds after which an export is cut off.",
         _positive(float)],
        ["upload-max-bytes", None, 1024 ** 3,
         "Bytes of archive an upload into /workspace may send (Docker syntax: 512m, 1g);"
         " more: 413.", _positive(parse_bytes)],
        ["auth", None, None,
         "An htpasswd file of bcrypt hashes (htpasswd -B): its users log in (a login page"
         " and a session cookie for browsers, HTTP Basic for programs). Read again when"
         " it changes."],
        ["tokens", None, None,
         "A file of user:token lines: API tokens sent as 'Authorization: Bearer TOKEN'."
         " Read again when it changes."],
        ["metrics-token", None, None,
         "A token that reads /metrics from anywhere, sent as 'Authorization: Bearer TOKEN'"
         " (without it, only loopback peers may read /metrics)."],
        ["metrics-token-file", None, None,
         "A file holding the metrics token (not seen in the process list, unlike"
         " --metrics-token)."],
        ["admin-token", None, None,
         "A token (16 characters or more) that opens the admin API (/api/admin/) from"
         " anywhere, sent as 'Authorization: Bearer TOKEN' (loopback needs none)."],
        ["admin-token-file", None, None,
         "A file holding the admin token (not seen in the process list, unlike"
         " --admin-token)."],
        ["user-header", None, None,
         "A header naming the user, set by an authenticating proxy (e.g."
         " X-Forwarded-User); believed only from --trusted-proxy addresses."],
        ["public-url", None, None,
         "capsule's address as its users reach it (https://capsule.example.com): checks"
         " Host and Origin, and https makes cookies Secure."],
        ["max-sessions-per-user", None, None,
         "Sessions at once of one user (more: quota_exceeded, close 4429) [default: no"
         " limit but --max-sessions].", _positive(int)],
        ["state-dir", None, None,
         "Where capsule keeps who owns which session across restarts [default:"
         " /var/lib/capsule for root, else $XDG_STATE_HOME/capsule]."],
        ["network", None, CAPSULE_NETWORK,
         "The network of session containers: capsule (its own bridge, created if missing,"
         " no traffic between sessions), none, or the name of an existing Docker network."],
        ["runtime", None, None,
         "The OCI runtime of session containers, e.g. runsc (gVisor) [default: the engine's]."],
        ["log-format", None, "text",
         "text (twistd's lines) or json (one JSON object per event and line, to the same"
         " place)."],
        ["record", None, None,
         "A directory where each session's output is recorded as asciicast v2"
         " (asciinema play FILE) [default: not recorded]."],
        ["profiles", None, None,
         "A TOML file of session profiles ([profiles.NAME] tables: image, command,"
         " environment, limits, secrets, agent_volume, repository...); see the README"
         " [default: the built-in shell and claude]."],
        ["agent-image", None, DEFAULT_AGENT_IMAGE, "Docker image of the claude profile."],
        ["secrets-file", None, None,
         "A file of NAME=value lines (mode 600 or 640) holding the secrets profiles name"
         " [default: the secrets come from capsule's environment]."],
        ["clone-timeout", None, DEFAULT_CLONE_TIMEOUT,
         "Seconds a session's git clone may take (a profile may say otherwise).",
         _positive(float)],
        ["record-max-bytes", None, DEFAULT_MAX_BYTES,
         "Bytes after which a session's recording is cut (Docker syntax: 50m).",
         _positive(parse_bytes)],
    ]

    optFlags = [
        ["insecure-no-auth", None,
         "Let anyone who reaches a non-loopback --listen use capsule, without users."],
        ["no-keeper", None,
         "Run the shell directly instead of under capsule-keeper: sessions then end"
         " when capsule stops (for images without capsule-keeper)."],
        ["allow-sudo", None,
         "Give the session user passwordless sudo: root's usual capabilities come back and"
         " no-new-privileges is off (see the README, 'Container hardening')."],
        ["read-only-root", None,
         "Make the containers' root filesystem read-only (/workspace and the home directory"
         " stay writable, /tmp is a tmpfs)."],
        ["start-at-first-frame", None,
         "Make a new session only when its client's first frame arrives, rather than as soon"
         " as its WebSocket upgrade is accepted (the default: the container is made while the"
         " client sends that frame)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["allowed-origin"] = []
        self["allowed-host"] = []
        self["trusted-proxy"] = []
        self["cap-add"] = []
        self["admin-user"] = []

    def opt_admin_user(self, name: str) -> None:
        """A user (of --auth, --tokens or --user-header) who may use the admin API; repeatable"""
        self["admin-user"].append(name)

    def opt_cap_add(self, capability: str) -> None:
        """A Linux capability session containers keep (e.g. NET_BIND_SERVICE); repeatable [default: none, or sudo's with --allow-sudo]"""
        name = capability.strip().upper().removeprefix("CAP_")
        if not name or not name.replace("_", "").isalnum():
            raise usage.UsageError(
                f"--cap-add: not a capability: {capability!r} (try NET_BIND_SERVICE)")
        self["cap-add"].append(name)

    def opt_listen(self, description: str) -> None:
        """Where to listen, as a strports description; repeatable (tcp:3001, tcp:3001:interface=127.0.0.1, ssl:3443:privateKey=key.pem:certKey=cert.pem) [default: tcp:3001 with users or --insecure-no-auth, else tcp:3001:interface=127.0.0.1]"""
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_allowed_origin(self, origin: str) -> None:
        """A browser origin (scheme://host[:port]) allowed to open terminals besides the page's own; repeatable; * allows any"""
        self["allowed-origin"].append(origin)

    def opt_allowed_host(self, name: str) -> None:
        """A name (as in the Host header, without port) that reaches capsule besides its listening addresses and host name, e.g. a DNS name of this machine; repeatable"""
        if not name.strip():
            raise usage.UsageError("--allowed-host must be a host name")
        self["allowed-host"].append(name)

    def opt_trusted_proxy(self, cidr: str) -> None:
        """A proxy (CIDR, e.g. 10.0.0.0/8 or 127.0.0.1/32) whose X-Forwarded-For names the client; repeatable [default: none: the client is the socket's peer]"""
        try:
            self["trusted-proxy"].append(parse_network(cidr))
        except ValueError:
            raise usage.UsageError(f"--trusted-proxy: not a CIDR: {cidr!r} (try 10.0.0.0/8)")

    def _check_users(self) -> None:
        """
        Who may use capsule: without users it listens on loopback only.
        """
        for name in ("auth", "tokens"):
            if self[name] is not None and not os.path.isfile(self[name]):
                raise usage.UsageError(f"--{name}: no such file: {self[name]}")
        if self["user-header"] is not None and not self["trusted-proxy"]:
            raise usage.UsageError(
                "--user-header needs --trusted-proxy CIDR: the addresses of the proxy"
                " whose header names the user (any other client could set it)")
        if self["public-url"] is not None:
            parts = urlsplit(self["public-url"])
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise usage.UsageError(
                    f"--public-url: not an http(s) URL: {self['public-url']!r}"
                    " (try https://capsule.example.com)")
        self["users"] = any(self[name] is not None for name in ("auth", "tokens", "user-header"))
        if not self["listen"]:
            self["listen"] = ["tcp:3001" if self["users"] or self["insecure-no-auth"]
                              else LOOPBACK_LISTEN]
        elif not (self["users"] or self["insecure-no-auth"]):
            exposed = [d for d in self["listen"] if not loopback_only(d)]
            if exposed:
                raise usage.UsageError(
                    f"--listen {exposed[0]} can be reached from other machines, and capsule"
                    " has no users: add --auth FILE (an htpasswd file of bcrypt hashes),"
                    " --tokens FILE, or --user-header HEADER with --trusted-proxy CIDR behind"
                    " an authenticating proxy; or --insecure-no-auth to let anyone in; or"
                    f" listen on loopback only ({LOOPBACK_LISTEN})")
        self._check_admin()

    def _check_admin(self) -> None:
        if self["admin-user"] and not self["users"]:
            raise usage.UsageError("--admin-user needs users: --auth, --tokens or --user-header")
        self._check_token("admin-token")

    def _check_metrics(self) -> None:
        self._check_token("metrics-token")

    def _check_token(self, name: str) -> None:
        """
        Read --NAME-file into --NAME if given, and check the token: 16
        characters or more, no spaces.
        """
        if self[f"{name}-file"] is not None:
            try:
                with open(self[f"{name}-file"], encoding="utf-8") as f:
                    self[name] = f.read().strip()
            except OSError as e:
                raise usage.UsageError(f"--{name}-file: {e.strerror}: {self[f'{name}-file']}")
        token = self[name]
        if token is not None and (len(token) < 16 or any(c.isspace() for c in token)):
            raise usage.UsageError(f"--{name}: 16 characters or more, no spaces (try"
                                   " `openssl rand -hex 32`)")

    def postOptions(self) -> None:
        try:
            parse_bytes(self["memory"])
        except Exception:
            raise usage.UsageError(f"--memory: not a size: {self['memory']!r} (try 512m or 4g)")
        if self["disk"] is not None:
            try:
                if parse_bytes(self["disk"]) <= 0:
                    raise ValueError(self["disk"])
            except Exception:
                raise usage.UsageError(f"--disk: not a size: {self['disk']!r} (try 500m or 10g)")
        try:
            self["session-rate"] = parse_rate(self["session-rate"])
        except ValueError:
            raise usage.UsageError(
                f"--session-rate: not COUNT/SECONDS: {self['session-rate']!r} (try 10/60)")
        if self["memory-budget"] is not None and self["memory-budget"] != "off":
            try:
                if parse_bytes(self["memory-budget"]) <= 0:
                    raise ValueError(self["memory-budget"])
            except Exception:
                raise usage.UsageError(
                    f"--memory-budget: not a size: {self['memory-budget']!r} (try 16g or off)")
        if self["www"] is None:
            self["www"] = default_www()
        if not os.path.isfile(os.path.join(self["www"], "index.html")):
            raise usage.UsageError(
                f"--www: no index.html in {self['www']!r}: point --www at capsule's www/"
                " directory (with its node_modules installed by `make setup`)")
        if self["coalesce-ms"] < 0:
            raise usage.UsageError("--coalesce-ms must be 0 or more")
        if not shlex.split(self["shell"]):
            raise usage.UsageError("--shell must not be empty")
        if not self["network"].strip():
            raise usage.UsageError("--network must be capsule, none or a network's name")
        if self["log-format"] not in FORMATS:
            raise usage.UsageError(
                f"--log-format must be text or json, not {self['log-format']!r}")
        if self["log-format"] == "json":
            check_server_options(getattr(self, "parent", None))
        if self["record"] is not None and (problem := check_directory(self["record"])):
            raise usage.UsageError(f"--record: {problem}")
        self._check_users()
        self._check_metrics()
        self._check_profiles()

    def _check_profiles(self) -> None:
        """
        Read --profiles and --secrets-file: refused at start, naming the
        file, the profile and the key.
        """
        shell = Profile(name="shell", spec=server_spec(self),
                        command=tuple(shlex.split(self["shell"])),
                        idle_timeout=self["idle-timeout"], max_lifetime=self["max-lifetime"],
                        clone_timeout=self["clone-timeout"], pool=self["pool-size"])
        try:
            self["profile-table"] = load_profiles(
                self["profiles"], builtin_profiles(shell, self["agent-image"]))
            self["secrets"] = load_secrets(self["secrets-file"], self["profile-table"])
        except ProfileError as e:
            raise usage.UsageError(f"--profiles: {e}" if self["secrets-file"] is None
                                   or not str(e).startswith(self["secrets-file"])
                                   else f"--secrets-file: {e}")


def server_spec(config) -> ContainerSpec:
    """
    The container spec the options describe (the shell profile's).
    """
    return ContainerSpec(image=config["image"], memory=config["memory"],
                         cpus=config["cpus"], pids=config["pids"],
                         cpu_shares=config["cpu-shares"], disk=config["disk"],
                         network=config["network"], cap_add=tuple(config["cap-add"]),
                         allow_sudo=bool(config["allow-sudo"]),
                         read_only_root=bool(config["read-only-root"]),
                         runtime=config["runtime"])


def loopback_only(description: str) -> bool:
    """
    Whether a strports description listens where only this machine can
    connect: a TCP or TLS port on a loopback interface, or a UNIX socket.
    """
    try:
        args, kwargs = _parse_endpoint(description)
    except Exception:
        return False
    kind = str(args[0]).lower() if args else ""
    if kind == "unix":
        return True
    if kind not in ("tcp", "ssl", "tcp6"):
        return False
    try:
        return ipaddress.ip_address(kwargs.get("interface", "").strip("[]")).is_loopback
    except ValueError:
        return False


LOOPBACK_LISTEN = "tcp:3001:interface=127.0.0.1"


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
                 network: SessionNetwork | None = None) -> None:
        self.manager = manager
        # Made ready before the sessions of an earlier run are looked for.
        self.network = network
        self.clock = clock
        self.websocket_factory = websocket_factory
        self.ready: Deferred = Deferred()
        # Sessions of the earlier run found (None: not known yet).
        self.recovered: int | None = None
        self._recovery: Deferred | None = None
        # Given both, the memory budget is the engine's memory, once known.
        self._admission = admission
        self._docker = docker
        self._budget: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._recovery = Deferred.fromCoroutine(self._recover())
        self._recovery.addErrback(
            lambda f: None if f.check(CancelledError) else _log.failure(
                "looking for the sessions of an earlier run failed", f))
        if self._admission is not None and self._docker is not None:
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
        self._admission.policy.memory_budget = total
        _log.info("memory budget: {budget} bytes (the engine's memory)", budget=total)

    async def _recover(self) -> None:
        warned = False
        recovery = self.manager.recovery
        recovery.pending = True
        while True:
            try:
                if self.network is not None:
                    await self.network.ensure()
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
        recovery.pending = False
        if warned:
            _log.info("found the sessions of the earlier run: {count}", count=count)
        self.recovered = count
        self._open()
        self.manager.pool.start()
        await recovery.check_live_restore()
        await recovery.check_profile_images()

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
                 websocket_factory=None) -> None:
        super().__init__()
        self.docker = docker
        self.manager = sessions.manager
        self.sessions = sessions
        self.listeners = listeners
        self.websocket_factory = websocket_factory
        self.log_observer = None

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
        if reactor.running:
            reactor.stop()

    def handler(signum, frame) -> None:
        reactor.callFromThread(stop, signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def makeService(config: Options, reactor=None) -> CapsuleService:
    if reactor is None:
        from twisted.internet import reactor
        # After twistd's own handlers are installed (reactor.run installs
        # them before it runs these).
        reactor.callWhenRunning(stop_on_signals, reactor)
    docker = DockerAPI(reactor, threads=config["docker-threads"],
                       export_threads=config["export-threads"])
    spec = server_spec(config)
    if "profile-table" not in config:
        config._check_profiles()
    metrics = Metrics()
    owners = recorder = None
    if config["users"]:
        owners = OwnerFile(config["state-dir"] or default_state_dir(), config["instance"])
    if config["record"] is not None:
        recorder = SessionRecorder(config["record"], reactor, config["record-max-bytes"])
    manager = SessionManager(docker, reactor, SessionConfig(
        spec=spec, instance=config["instance"], grace=config["grace"],
        shell=tuple(shlex.split(config["shell"])), replay_bytes=config["replay-buffer"],
        pool_size=config["pool-size"], pool_max_age=config["pool-max-age"],
        max_lifetime=config["max-lifetime"], idle_timeout=config["idle-timeout"],
        keeper=not config["no-keeper"], profiles=config["profile-table"],
        secrets=config["secrets"]), metrics=metrics, owners=owners,
        observers=[recorder] if recorder is not None else ())
    for profile, name in config["secrets"].missing(config["profile-table"]):
        _log.warn("profile {profile} names the secret {name}, which has no value (neither in"
                  " capsule's environment nor in --secrets-file): its sessions start without"
                  " it", profile=profile, name=name)
    authenticator = auth_threads = None
    if config["users"]:
        auth_threads = AuthThreadPool(reactor)
        authenticator = Authenticator(
            reactor, htpasswd=config["auth"], tokens=config["tokens"],
            user_header=config["user-header"],
            addresses=ClientAddresses(config["trusted-proxy"]),
            public_url=config["public-url"], run_blocking=auth_threads.run)
    budget = config["memory-budget"]
    admission = AdmissionControl(manager, reactor, AdmissionPolicy(
        max_sessions=config["max-sessions"], max_per_client=config["max-sessions-per-client"],
        rate=config["session-rate"], session_memory=parse_bytes(config["memory"]),
        memory_budget=None if budget in (None, "off") else parse_bytes(budget),
        max_per_user=config["max-sessions-per-user"]),
        trusted_proxies=config["trusted-proxy"])
    site = make_site(manager, docker, reactor, config["www"], authenticator=authenticator,
                     metrics_token=config["metrics-token"],
                     admin_token=config["admin-token"], admin_users=config["admin-user"],
                     max_message_size=config["max-message-size"],
                     allowed_origins=tuple(config["allowed-origin"]),
                     host_policy=HostPolicy(public_url=config.get("public-url"),
                                            allowed_hosts=config["allowed-host"],
                                            allowed_origins=config["allowed-origin"]),
                     ping_interval=config["ping-interval"],
                     ping_timeout=config["ping-timeout"],
                     flow_window=config["flow-window"],
                     coalesce_delay=config["coalesce-ms"] / 1000,
                     export_limits=ExportLimits(
                         workers=config["export-threads"],
                         per_client=config["exports-per-client"],
                         max_bytes=config["export-max-bytes"],
                         timeout=config["export-timeout"]),
                     public_url=config["public-url"],
                     upload_max_bytes=config["upload-max-bytes"],
                     admission=admission, metrics=metrics,
                     client_address=ClientAddresses(config["trusted-proxy"]))
    # A new session's container is asked for as its WebSocket opens, unless
    # --start-at-first-frame.
    site.websocket_factory.start_at_open = not config["start-at-first-frame"]
    sessions = SessionService(manager, reactor, site.websocket_factory, admission,
                              docker if budget is None else None,
                              SessionNetwork(docker, reactor, config["network"]))
    listeners = ListenerService(sessions.ready, lambda: sessions.recovered,
                                config["public-url"])
    for description in config["listen"]:
        strports.service(description, site).setServiceParent(listeners)
    service = CapsuleService(docker, sessions, listeners, site.websocket_factory)
    if config["log-format"] == "json":
        service.log_observer = json_observer(getattr(config, "parent", None))
    DockerService(docker).setServiceParent(service)
    if recorder is not None:
        # Before the sessions: it stops after them, and writes what they said.
        recorder.setServiceParent(service)
    if auth_threads is not None:
        auth_threads.setServiceParent(service)
    sessions.setServiceParent(service)
    CleanupService(manager, reactor, config["cleanup-interval"],
                   config["orphan-sweep"]).setServiceParent(service)
    if config["disk"] is not None:
        DiskWatchService(
            manager, reactor, parse_bytes(config["disk"]), config["disk-check-interval"],
            lambda: docker.container_sizes(manager.labels),
            enforced=lambda: docker.storage_quota is True).setServiceParent(service)
    listeners.setServiceParent(service)
    _log.info("capsule will run sessions in {image} (memory {memory}, {cpus:g} CPUs,"
              " {pids} processes), grace {grace:g} s, Docker at {host}",
              image=spec.image, memory=spec.memory, cpus=spec.cpus, pids=spec.pids,
              grace=config["grace"], host=docker.host)
    if authenticator is None and not config["insecure-no-auth"]:
        _log.info("capsule has no users (no --auth, --tokens or --user-header): it listens"
                  " on loopback only, and anyone who can reach that port gets a terminal")
    elif authenticator is None:
        _log.warn("--insecure-no-auth: anyone who reaches {listen} gets a terminal",
                  listen=", ".join(config["listen"]))
    return service
