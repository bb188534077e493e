"""
C{twistd capsule}: options, and the service tree they describe.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from dataclasses import replace
from types import MappingProxyType
from urllib.parse import urlsplit

from docker.utils import parse_bytes
from twisted.internet.endpoints import _parse as _parse_endpoint
from twisted.logger import Logger
from twisted.python import usage

from capsule.config import CapsuleConfig
from capsule.core.admission import parse_network, parse_rate
from capsule.core.memory import host_capacity
from capsule.core.profiles import (DEFAULT_AGENT_IMAGE, DEFAULT_CLONE_TIMEOUT, parse_duration,
                                   DEFAULT_MEMORY_REQUEST, DEFAULT_PROFILE, Profile,
                                   ProfileError, builtin_profiles, fence, load_profiles,
                                   load_secrets)
from capsule.core.spec import ContainerSpec
from capsule.core.egress import DEFAULT_PORTS
from capsule.engine.firewall import MODES as FIREWALL_MODES
from capsule.engines import ENGINE_OPTIONS, check_engine_options
from capsule.engine.kube_policies import kubernetes_profile
from capsule.engine.network import CAPSULE_NETWORK, FENCED_NETWORK
from capsule.ops.logformat import FORMATS, check_server_options
from capsule.ops.recording import DEFAULT_MAX_BYTES, check_directory
from capsule.services import CapsuleService, make_service, protect_from_oom, stop_on_signals
from capsule.tuning import ENVIRONMENT as TUNING_ENVIRONMENT
from capsule.gateway.credentials import KEY_ENV as GATEWAY_KEY_ENV, parse_key
from capsule.gateway.git_rules import check_upstream, tls_policy
from capsule.tuning import KNOBS, Tuning, TuningError, load_tuning, tune
from capsule.web.site import default_www
from capsule.web.static import missing_packages

_log = Logger()


def _port_or_zero(value):
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"must be a port (1-65535) or 0, got {value}")
    return number


def _upstream(value):
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query \
            or parts.fragment or parts.username or parts.password:
        raise ValueError(f"must be an https URL with a host and nothing else (like"
                         f" https://api.anthropic.com), got {value!r}")
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = parts.hostname == "localhost"
        if not loopback:
            raise ValueError(f"http (not https) only to a loopback address: the key would"
                             f" cross the network in clear text, got {value!r}")
    return value.rstrip("/")


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


def _retention(value):
    try:
        return _non_negative_float(value)
    except ValueError:
        return parse_duration(value)


def _per_user_limit(value):
    if value.strip().lower() == "off":
        return "off"
    return _positive(int)(value)


def host_facts() -> tuple[int, int | None, int | None]:
    """
    This machine's memory in bytes, CPUs and C{kernel.pid_max} (C{None}
    where not known), for the default --max-sessions.
    """
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            pid_max = int(f.read().strip())
    except (OSError, ValueError):
        pid_max = None
    return total, os.cpu_count(), pid_max


def per_user_default(max_sessions: int, users: bool) -> int | None:
    """
    The sessions one user may have at once when --max-sessions-per-user is
    not given: with users, a share of the server (a quarter, at least one),
    so that one user, from however many addresses, cannot take every slot;
    without users there is nobody to count (C{None}).
    """
    return max(1, max_sessions // 4) if users else None


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
        ["memory-request", None, DEFAULT_MEMORY_REQUEST,
         "Memory admission counts each session of the shell profile at until its measured"
         " use is more (Docker syntax; at most --memory). The budget adds up requests, not"
         " limits."],
        ["memory-reserve", None, None,
         "Memory the engine's host keeps available: while its MemAvailable is under it, new"
         " sessions are refused with server_full (Docker syntax: 2g); off disables [default:"
         " a tenth of the host's memory, at least 1g; watched when the engine runs on this"
         " host]."],
        ["cpus", None, 2.0, "CPU limit of each container.", _positive(float)],
        ["pids", None, 256, "Process limit of each container.", _positive(int)],
        ["cpu-shares", None, 256,
         "CPU weight of each container when the CPUs are busy (the server's and the"
         " engine's is 1024): sessions yield to capsule and to interactive work.",
         _positive(int)],
        ["disk", None, None,
         "Size each container may write (Docker syntax: 2g); a session past it ends"
         " [default: no limit]. Enforced by the storage driver where it can, else"
         " checked every 30 s (the disk-check-interval tuning knob)."],
        ["grace", None, 60.0,
         "Seconds a session (and its container) is kept after its last client left.",
         _positive(float)],
        ["retention", None, 7 * 86400.0,
         "How long a session is kept once put away or once its grace period ended: its"
         " container stopped, its files kept, resumable (seconds, or 12h, 7d, 2w; a"
         " profile's retention wins; 0: removed, as before; see docs/keeping.md).",
         _retention],
        ["max-kept-per-user", None, 20,
         "Kept sessions one user may have; putting one more away removes their oldest.",
         _positive(int)],
        ["max-kept-bytes-per-user", None, 20 * 1024 ** 3,
         "Bytes one user's kept sessions may hold (Docker syntax: 20g); past it their"
         " oldest are removed.", _positive(parse_bytes)],
        ["max-snapshots-per-user", None, 20,
         "Named snapshots one user may keep (more: kept_limit, 409).", _non_negative_int],
        ["www", None, None, "Directory of the web page [default: the installed one]."],
        ["door-port", None, 3180,
         "Port of the session door: what sessions reach of capsule from inside (the"
         " credential gateway, the egress proxy), on the host side of each session network"
         " only; 0: no door.", _port_or_zero],
        ["anthropic-upstream", None, "https://api.anthropic.com",
         "Where the credential gateway forwards sessions' requests to Anthropic's API, with"
         " the real ANTHROPIC_API_KEY on them (https, certificate verified; http only to a"
         " loopback address, for tests).", _upstream],
        ["anthropic-budget", None, None,
         "Tokens (input, output and cache, from the answers' usage) one user may use through"
         " the credential gateway per day (UTC); past it, requests are refused (429)"
         " [default: no budget].", _positive(int)],
        ["preview-domain", None, None,
         "Wildcard domain of previews: port P of session ID at P-ID.DOMAIN (a DNS wildcard"
         " and certificate for *.DOMAIN, see docs/previews.md); DOMAIN[:PORT] when browsers"
         " reach it on a port. Needs --public-url with users [default: previews at"
         " /preview/ID/P/ on capsule's own site]."],
        ["preview-connections-per-session", None, 64,
         "Connections the previews of one session may have open at once.", _positive(int)],
        ["preview-bytes-per-second", None, None,
         "Bytes per second one preview (a port of a session) may carry each way, all its"
         " connections together [default: no cap].", _positive(int)],
        ["github-upstream", None, "https://github.com",
         "Where the git gateway forwards sessions' git requests for https://github.com"
         " (with GITHUB_TOKEN, from capsule's environment or --secrets-file, put on them)."],
        ["github-tokens", None, None,
         "A directory of users' own GitHub tokens: a file per user, named by the user's name"
         " (mode 600), used by the git gateway instead of GITHUB_TOKEN [default: none]."],
        ["gateway-ca", None, None,
         "A PEM file of the authorities the git gateway trusts for its upstream's certificate"
         " [default: the system's]."],
        ["instance", None, "default",
         "Name of this server. Its containers are labelled with it; at start-up it"
         " removes the leftovers of its own name only."],
        ["shell", None, "bash -l", "The command run in each session's terminal."],
        ["replay-buffer", None, 1024 * 1024,
         "Bytes of recent output each session keeps for reconnecting clients.",
         _non_negative_int],
        ["max-lifetime", None, 0.0,
         "Seconds after which a session ends however busy it is (0: no limit).",
         _non_negative_float],
        ["idle-timeout", None, 86400.0,
         "Seconds without input, without output and without CPU use after which a session"
         " is idle, client attached or not: it is put away where its retention is more than"
         " 0, else it ends (0: no limit; a profile's idle_timeout wins).",
         _non_negative_float],
        ["pool-size", None, 2,
         "Started containers kept ready for new sessions (0 disables the warm pool).",
         _non_negative_int],
        ["max-sessions", None, None,
         "Sessions at once, in all (more: server_full, close 4503) [default: what this host"
         " holds: its memory less the reserve divided by --memory-request, at most"
         " pid_max/16 and 256 per CPU].", _positive(int)],
        ["max-sessions-per-client", None, 8,
         "Sessions at once created from one client address (more: quota_exceeded, close"
         " 4429).", _positive(int)],
        ["session-rate", None, "10/60",
         "New sessions one client address may create, as COUNT/SECONDS (a token bucket:"
         " bursts of COUNT); more: quota_exceeded, close 4429."],
        ["max-connections-per-client", None, 64,
         "Connections (HTTP and WebSocket) one client address may hold at once; past it,"
         " its oldest idle connection is closed, or the new one refused with 429 when all"
         " are busy. --trusted-proxy addresses are not capped.", _positive(int)],
        ["memory-budget", None, None,
         "Memory the sessions' requests (or measured use, where more) and the warm"
         " sessions' requests may add up to (Docker syntax: 16g); past it a new session is"
         " refused with server_full; off disables [default: the engine's memory less the"
         " reserve]."],
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
        ["spool-max-bytes", None, None,
         "Bytes of request bodies (uploads, exec requests) capsule holds at once, in memory"
         " and in temporary files (Docker syntax: 2g); a body past it is refused from its"
         " headers with 503 spool_full. At least --upload-max-bytes"
         " [default: twice --upload-max-bytes, at least 256m].", _positive(parse_bytes)],
        ["auth", None, None,
         "An htpasswd file of bcrypt hashes (capsule-admin user add NAME --htpasswd FILE):"
         " its users log in (a login page"
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
         " anywhere, sent as 'Authorization: Bearer TOKEN' (loopback needs none without"
         " users, or with --admin-loopback)."],
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
         "Sessions at once of one user (more: quota_exceeded, close 4429); off: no limit"
         " but --max-sessions [default: with users, a quarter of --max-sessions (at least"
         " 1)].", _per_user_limit],
        ["state-dir", None, None,
         "Where capsule keeps who owns which session across restarts [default:"
         " /var/lib/capsule for root, else $XDG_STATE_HOME/capsule]."],
        ["network", None, CAPSULE_NETWORK,
         "The network of session containers: capsule (its own bridge, created if missing,"
         " no traffic between sessions), none, or the name of an existing Docker network."],
        *ENGINE_OPTIONS,
        ["firewall", None, "auto",
         "Who fences the session networks (no link-local, private or host address from a"
         " session): auto (capsule applies iptables rules when it may, else warns with the"
         " commands), manage (capsule applies them or refuses to start), off (your own"
         " firewall: capsule checks it and warns)."],
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
        ["default-profile", None, DEFAULT_PROFILE,
         "The profile a session gets when its client names none: what the plain URL opens"
         " (claude: Claude Code); ?profile= still picks another."],
        ["secrets-file", None, None,
         "A file of NAME=value lines (mode 600 or 640) holding the secrets profiles name"
         " [default: the secrets come from capsule's environment]."],
        ["clone-timeout", None, DEFAULT_CLONE_TIMEOUT,
         "Seconds a session's git clone may take (a profile may say otherwise).",
         _positive(float)],
        ["record-max-bytes", None, DEFAULT_MAX_BYTES,
         "Bytes after which a session's recording is cut (Docker syntax: 50m).",
         _positive(parse_bytes)],
        ["tuning", None, None,
         "A TOML file of internal knobs (name = value: thread pools, timers, protocol"
         f" windows; see docs/tuning.md); ${TUNING_ENVIRONMENT}=\"name=value,...\" wins"
         " over it [default: none]."],
    ]

    optFlags = [
        ["insecure-no-auth", None,
         "Let anyone who reaches a non-loopback --listen use capsule, without users."],
        ["admin-loopback", None,
         "With users, let requests straight from loopback use the admin API without"
         " --admin-token (everyone on this machine, and any tunnel to it, then may)."],
        ["no-keeper", None,
         "Run the shell directly instead of under capsule-keeper: sessions then end"
         " when capsule stops (for images without capsule-keeper)."],
        ["allow-sudo", None,
         "Give the session user passwordless sudo: root's usual capabilities come back and"
         " no-new-privileges is off (see the README, 'Container hardening')."],
        ["access-log", None,
         "Log an access line for every request (by default the page's files, /health and"
         " /metrics get none unless they fail)."],
        ["read-only-root", None,
         "Make the containers' root filesystem read-only (/workspace and the home directory"
         " stay writable, /tmp is a tmpfs)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        # Tuning knobs given as options (as they were before they became
        # knobs): accepted, not shown, and they win over the file and the
        # environment.
        self.knob_options: dict[str, str] = {}
        self.config: CapsuleConfig | None = None
        self["listen"] = []
        self["allowed-origin"] = []
        self["allowed-host"] = []
        self["trusted-proxy"] = []
        self["egress-allow-address"] = []
        self["cap-add"] = []
        self["admin-user"] = []
        self["egress-port"] = []

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

    def opt_egress_allow_address(self, cidr: str) -> None:
        """An address (CIDR, e.g. 10.0.0.5/32) sessions may reach although it is link-local, private or the host's; repeatable [default: none]"""
        try:
            self["egress-allow-address"].append(str(parse_network(cidr)))
        except ValueError:
            raise usage.UsageError(
                f"--egress-allow-address: not a CIDR: {cidr!r} (try 10.0.0.5/32)")

    def opt_egress_port(self, port: str) -> None:
        """A port fenced sessions may reach through the egress proxy besides 80 and 443; repeatable"""
        try:
            number = int(port)
            if not 1 <= number <= 65535:
                raise ValueError
        except ValueError:
            raise usage.UsageError(f"--egress-port: not a port (1-65535): {port!r}")
        self["egress-port"].append(number)

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

    def getUsage(self, width: int | None = None) -> str:
        # The tuning knobs' options are not shown: --help is what an
        # operator decides.
        every = self.longOpt
        self.longOpt = [o for o in every if o.rstrip("=") not in KNOBS]
        try:
            return super().getUsage(width)
        finally:
            self.longOpt = every

    def describe(self) -> list[dict]:
        """
        The options --help shows, in its order: C{long}, C{short}, C{kind}
        (parameter or flag), C{default} and C{doc} of each.
        """
        shorts = {long: short for short, long in self.synonyms.items()
                  if short != long and len(short) == 1}
        return [{"long": o.rstrip("="), "short": shorts.get(o.rstrip("=")),
                 "kind": "parameter" if o.endswith("=") else "flag",
                 "default": self.defaults.get(o.rstrip("=")), "doc": self.docs[o.rstrip("=")]}
                for o in self.longOpt if o.rstrip("=") not in KNOBS]

    def postOptions(self) -> None:
        if self["spool-max-bytes"] is not None \
                and self["spool-max-bytes"] < self["upload-max-bytes"]:
            raise usage.UsageError(
                f"--spool-max-bytes ({self['spool-max-bytes']}) is less than"
                f" --upload-max-bytes ({self['upload-max-bytes']}): no upload of the largest"
                " size could ever be held")
        try:
            parse_bytes(self["memory"])
        except Exception:
            raise usage.UsageError(f"--memory: not a size: {self['memory']!r} (try 512m or 4g)")
        self._check_memory_request()
        self._check_gateway()
        if self["memory-reserve"] is not None and self["memory-reserve"] != "off":
            try:
                if parse_bytes(self["memory-reserve"]) <= 0:
                    raise ValueError(self["memory-reserve"])
            except Exception:
                raise usage.UsageError(
                    f"--memory-reserve: not a size: {self['memory-reserve']!r} (try 2g or off)")
        if self["max-sessions"] is None:
            self["max-sessions"] = self._host_capacity()
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
        if missing := missing_packages(self["www"]):
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise usage.UsageError(
                f"--www: the page's npm packages are missing from {self['www']}"
                f" ({missing[0]}{more}): run `npm ci` in capsule's www/ and copy its"
                f" node_modules to {os.path.join(self['www'], 'node_modules')}"
                " (see docs/deploy.md), or point --www at a www/ that has them")
        if not shlex.split(self["shell"]):
            raise usage.UsageError("--shell must not be empty")
        if not self["network"].strip():
            raise usage.UsageError("--network must be capsule, none or a network's name")
        check_engine_options(self, CAPSULE_NETWORK)
        if os.environ.get(GATEWAY_KEY_ENV):
            try:
                parse_key(os.environ[GATEWAY_KEY_ENV])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if self["firewall"] not in FIREWALL_MODES:
            raise usage.UsageError(
                f"--firewall must be one of {', '.join(FIREWALL_MODES)},"
                f" not {self['firewall']!r}")
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
        if self["tuning"] is not None and not os.path.isfile(self["tuning"]):
            raise usage.UsageError(f"--tuning: no such file: {self['tuning']}")
        try:
            tuning = load_tuning(self["tuning"])
        except TuningError as e:
            raise usage.UsageError(str(e))
        for name, value in self.knob_options.items():
            try:
                tuning = tune(tuning, {name: value}, "")
            except TuningError as e:
                raise usage.UsageError(f"--{e}")
        self.config = self._config(tuning)

    def _preview_domain(self) -> str | None:
        domain = self["preview-domain"]
        if domain is None:
            return None
        domain = domain.strip().strip(".").lower()
        name, _, port = domain.partition(":")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*",
                            name) or (port and not (port.isdigit() and 0 < int(port) < 65536)):
            raise usage.UsageError(f"--preview-domain: not a domain name: {domain!r}")
        if self["public-url"] is None and (self["auth"] or self["tokens"]
                                           or self["user-header"]):
            raise usage.UsageError("--preview-domain needs --public-url: a preview's visitor"
                                   " logs in at capsule's own address")
        return domain

    def _config(self, tuning: Tuning) -> CapsuleConfig:
        budget = self["memory-budget"]
        parent = getattr(self, "parent", None)
        return CapsuleConfig(
            listen=tuple(self["listen"]), insecure_no_auth=bool(self["insecure-no-auth"]),
            auth=self["auth"], tokens=self["tokens"], user_header=self["user-header"],
            trusted_proxies=tuple(self["trusted-proxy"]), public_url=self["public-url"],
            allowed_origins=tuple(self["allowed-origin"]),
            allowed_hosts=tuple(self["allowed-host"]), metrics_token=self["metrics-token"],
            admin_token=self["admin-token"], admin_users=tuple(self["admin-user"]),
            admin_loopback=bool(self["admin-loopback"]),
            spec=server_spec(self), memory_bytes=parse_bytes(self["memory"]),
            disk_bytes=None if self["disk"] is None else parse_bytes(self["disk"]),
            instance=self["instance"], shell=tuple(shlex.split(self["shell"])),
            keeper=not self["no-keeper"], grace=self["grace"], door_port=self["door-port"],
            firewall="off" if self["engine"] == "kubernetes" else self["firewall"],
            engine=self["engine"], kube_namespace=self["kube-namespace"],
            kubeconfig=self["kubeconfig"], kube_context=self["kube-context"],
            kube_storage_class=self["kube-storage-class"],
            kube_volume_size=self["kube-volume-size"], replica=self["replica"],
            egress_allow_addresses=tuple(self["egress-allow-address"]),
            anthropic_upstream=self["anthropic-upstream"],
            anthropic_budget=self["anthropic-budget"],
            preview_domain=self._preview_domain(),
            preview_connections_per_session=self["preview-connections-per-session"],
            preview_bytes_per_second=self["preview-bytes-per-second"],
            github_upstream=self["github-upstream"], github_tokens=self["github-tokens"],
            gateway_ca=self["gateway-ca"],
            egress_ports=tuple(sorted(set(DEFAULT_PORTS) | set(self["egress-port"]))),
            max_lifetime=self["max-lifetime"], idle_timeout=self["idle-timeout"],
            replay_bytes=self["replay-buffer"], pool_size=self["pool-size"],
            profiles=MappingProxyType(dict(self["profile-table"])), secrets=self["secrets"],
            default_profile=self["default-profile"],
            max_sessions=self["max-sessions"],
            max_sessions_per_client=self["max-sessions-per-client"],
            max_sessions_per_user=self._max_sessions_per_user(),
            session_rate=self["session-rate"],
            max_connections_per_client=self["max-connections-per-client"],
            memory_budget=None if budget in (None, "off") else parse_bytes(budget),
            # A cluster's memory is its nodes' (and its ResourceQuota's
            # business): no budget unless given.
            memory_budget_from_engine=budget is None and self["engine"] == "docker",
            memory_request=parse_bytes(self["memory-request"]),
            memory_reserve=self._reserve(),
            memory_reserve_from_engine=(self["memory-reserve"] is None
                                        and self["engine"] == "docker"),
            exports_per_client=self["exports-per-client"],
            export_max_bytes=self["export-max-bytes"], export_timeout=self["export-timeout"],
            upload_max_bytes=self["upload-max-bytes"],
            spool_max_bytes=self["spool-max-bytes"], www=self["www"],
            state_dir=self["state-dir"], log_format=self["log-format"],
            access_log=bool(self["access-log"]),
            server_options=None if parent is None else MappingProxyType(
                {k: parent.get(k) for k in ("logfile", "nodaemon")}),
            record=self["record"], record_max_bytes=self["record-max-bytes"],
            retention=self["retention"], max_kept_per_user=self["max-kept-per-user"],
            max_kept_bytes_per_user=self["max-kept-bytes-per-user"],
            max_snapshots_per_user=self["max-snapshots-per-user"], tuning=tuning)

    def _check_memory_request(self) -> None:
        try:
            request = parse_bytes(self["memory-request"])
            if request <= 0:
                raise ValueError(request)
        except Exception:
            raise usage.UsageError(f"--memory-request: not a size: {self['memory-request']!r}"
                                   " (try 64m or 512m)")
        if request > parse_bytes(self["memory"]):
            raise usage.UsageError(f"--memory-request {self['memory-request']} is more than"
                                   f" --memory {self['memory']} (a request is at most the"
                                   " limit)")

    def _check_gateway(self) -> None:
        """
        --github-upstream is a base URL, --gateway-ca holds a certificate,
        --github-tokens is a directory.
        """
        try:
            check_upstream(self["github-upstream"])
        except ValueError as e:
            raise usage.UsageError(f"--github-upstream: {e}")
        if self["gateway-ca"] is not None:
            try:
                tls_policy(self["gateway-ca"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--gateway-ca: {getattr(e, 'strerror', None) or e}")
        if self["github-tokens"] is not None and not os.path.isdir(self["github-tokens"]):
            raise usage.UsageError(f"--github-tokens: {self['github-tokens']} is not a directory")

    def _reserve(self) -> int | None:
        value = self["memory-reserve"]
        return None if value in (None, "off") else parse_bytes(value)

    def _host_capacity(self) -> int:
        """
        The default --max-sessions: what this host holds (see
        L{capsule.core.memory.host_capacity}).
        """
        total, cpus, pid_max = host_facts()
        return host_capacity(total, parse_bytes(self["memory-request"]), self._reserve(),
                             cpus=cpus, pid_max=pid_max)

    def _max_sessions_per_user(self) -> int | None:
        value = self["max-sessions-per-user"]
        if value == "off":
            return None
        if value is None:
            return per_user_default(self["max-sessions"], self["users"])
        return value

    def _check_profiles(self) -> None:
        """
        Read --profiles and --secrets-file: refused at start, naming the
        file, the profile and the key.
        """
        shell = Profile(name="shell", spec=server_spec(self),
                        command=tuple(shlex.split(self["shell"])),
                        idle_timeout=self["idle-timeout"], max_lifetime=self["max-lifetime"],
                        clone_timeout=self["clone-timeout"], pool=self["pool-size"],
                        memory_request=self["memory-request"])
        try:
            self["profile-table"] = fence(load_profiles(
                self["profiles"], builtin_profiles(shell, self["agent-image"])), FENCED_NETWORK)
            if self["engine"] == "kubernetes":
                # Pods have no Docker network: every profile's sessions
                # reach the door over their keeper's channels.
                self["profile-table"] = {
                    name: kubernetes_profile(p) for name, p in self["profile-table"].items()}
            self["secrets"] = load_secrets(self["secrets-file"], self["profile-table"])
        except ProfileError as e:
            raise usage.UsageError(f"--profiles: {e}" if self["secrets-file"] is None
                                   or not str(e).startswith(self["secrets-file"])
                                   else f"--secrets-file: {e}")
        if self["default-profile"] not in self["profile-table"]:
            shown = "".join(c if c.isprintable() else "?" for c in self["default-profile"][:64])
            raise usage.UsageError(
                f"--default-profile: no profile {shown!r}: the profiles are"
                f" {', '.join(sorted(self['profile-table']))}"
                + ("" if self["profiles"] else " (--profiles FILE adds others)"))


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




def _knob_option(name: str, flag: bool):
    if flag:
        def opt(self) -> None:
            self.knob_options[name] = "true"
    else:
        def opt(self, value: str) -> None:
            self.knob_options[name] = value
    opt.__doc__ = f"The tuning knob {name} (not shown: see docs/tuning.md)"
    return opt


# The tuning knobs were options once: their options still set them.
for _name, _field in KNOBS.items():
    setattr(Options, "opt_" + _name.replace("-", "_"),
            _knob_option(_name, _field.type in (bool, "bool")))


def makeService(options: Options, reactor=None) -> CapsuleService:
    """
    twistd's entry: the server C{options} describe (L{make_service} of
    their L{CapsuleConfig}).
    """
    if reactor is None:
        from twisted.internet import reactor
        # After twistd's own handlers are installed (reactor.run installs
        # them before it runs these).
        reactor.callWhenRunning(stop_on_signals, reactor)
        if not options.config.kubernetes:
            # (A cluster's sessions never share this host's memory.)
            protect_from_oom()
    if options.knob_options:
        _log.warn("{options}: tuning knobs now, not options (see docs/tuning.md); say"
                  " {environment}=\"{pairs}\"", environment=TUNING_ENVIRONMENT,
                  options=", ".join(f"--{name}" for name in options.knob_options),
                  pairs=",".join(f"{k}={v}" for k, v in options.knob_options.items()))
    return make_service(options.config, reactor)
