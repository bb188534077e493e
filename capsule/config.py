"""
capsule's configuration as one frozen value: what C{twistd capsule}'s
options (L{capsule.tap.Options}) and the tuning knobs (L{capsule.tuning})
say, parsed and checked.  L{capsule.services.make_service} builds the
server from it.

C{docs/options.md} is generated from the options (L{capsule.docs}).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from capsule.core.profiles import Profile, Secrets
from capsule.core.spec import ContainerSpec
from capsule.tuning import Tuning

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class CapsuleConfig:
    """
    Everything the server is built from.  Sizes are bytes, durations
    seconds; C{None} means the option was not given (its meaning is said
    where it matters).  L{capsule.tap.Options} makes one (its defaults are
    the options').
    """

    # -- where it listens, and who may use it ----------------------------------
    listen: tuple[str, ...]
    insecure_no_auth: bool
    auth: str | None
    tokens: str | None
    user_header: str | None
    trusted_proxies: tuple[Network, ...]
    public_url: str | None
    allowed_origins: tuple[str, ...]
    allowed_hosts: tuple[str, ...]
    metrics_token: str | None
    admin_token: str | None
    admin_users: tuple[str, ...]
    # Loopback opens the admin API even with users (--admin-loopback).
    admin_loopback: bool

    # -- the sessions ----------------------------------------------------------
    # The shell profile's container (--image, --memory, --cpus, ...).
    spec: ContainerSpec
    memory_bytes: int
    disk_bytes: int | None
    instance: str
    shell: tuple[str, ...]
    keeper: bool
    grace: float
    max_lifetime: float
    idle_timeout: float
    replay_bytes: int
    pool_size: int
    profiles: Mapping[str, Profile]
    secrets: Secrets

    # -- admission -------------------------------------------------------------
    max_sessions: int
    max_sessions_per_client: int
    max_sessions_per_user: int | None
    session_rate: tuple[int, float]
    # Connections at once from one client address (HTTP and WebSocket).
    max_connections_per_client: int
    # None: no budget (--memory-budget off, or the engine's memory until it
    # is known, see memory_budget_from_engine).
    memory_budget: int | None
    memory_budget_from_engine: bool
    # What a session of the shell profile is counted at (--memory-request).
    memory_request: int
    # Memory the engine's host keeps available (--memory-reserve); None:
    # not watched (off, or a tenth of the host's memory once known, see
    # memory_reserve_from_engine).
    memory_reserve: int | None
    memory_reserve_from_engine: bool

    # -- exports and uploads ---------------------------------------------------
    exports_per_client: int
    export_max_bytes: int
    export_timeout: float
    upload_max_bytes: int
    # None: the default (capsule.web.bodies.default_spool).
    spool_max_bytes: int | None

    # -- operations ------------------------------------------------------------
    www: str
    # None: the default (capsule.sessions.owners.default_state_dir).
    state_dir: str | None
    log_format: str
    # Every request's access line (else none for the page's files, /health
    # and /metrics answered without an error).
    access_log: bool
    record: str | None
    record_max_bytes: int

    # The session door's port (capsule.gateway.door) on the host side of
    # each session network; 0: no door.
    door_port: int = 3180
    # The git gateway (capsule.gateway.git): where github.com is, a
    # directory of users' own tokens, the authorities trusted for the
    # upstreams' certificates (None: the system's).
    github_upstream: str = "https://github.com"
    github_tokens: str | None = None
    gateway_ca: str | None = None
    # Who fences the session networks (capsule.engine.firewall): auto,
    # manage or off.
    firewall: str = "auto"
    # Addresses (CIDRs) sessions may reach although link-local, private or
    # the host's: let through by the firewall and the egress proxy.
    egress_allow_addresses: tuple[str, ...] = ()
    # The credential gateway's upstream for Anthropic's API, and the tokens
    # one user may use through it per UTC day (None: no budget).
    anthropic_upstream: str = "https://api.anthropic.com"
    anthropic_budget: int | None = None
    # The profile a session gets when its client names none.
    default_profile: str = "shell"
    # Previews (capsule.web.preview): their wildcard domain (None: under
    # /preview/ only), connections per session, bytes per second per port.
    preview_domain: str | None = None
    preview_connections_per_session: int = 64
    preview_bytes_per_second: int | None = None
    # The ports fenced sessions reach through the egress proxy (80, 443
    # and --egress-port).
    egress_ports: tuple[int, ...] = (80, 443)
    # Kept sessions (capsule.sessions.keeping, docs/keeping.md): seconds a
    # session of a profile without its own retention is kept once put away
    # (0: removed, as before), and what one user may keep.
    retention: float = 7 * 86400.0
    max_kept_per_user: int = 20
    max_kept_bytes_per_user: int = 20 * 1024 ** 3
    max_snapshots_per_user: int = 20

    # The engine (capsule.engines): docker or kubernetes, and the latter's
    # namespace, kubeconfig (None: the service account, else $KUBECONFIG or
    # ~/.kube/config), context, claims' storage class and size; this
    # replica's name.
    engine: str = "docker"
    kube_namespace: str = "capsule-sessions"
    kubeconfig: str | None = None
    kube_context: str | None = None
    kube_storage_class: str | None = None
    kube_volume_size: str = "10Gi"
    replica: str = "capsule"

    tuning: Tuning = Tuning()
    # twistd's own logfile and nodaemon options (where a JSON log goes).
    server_options: Mapping | None = None

    @property
    def users(self) -> bool:
        """
        Whether capsule has users (--auth, --tokens or --user-header).
        """
        return any(v is not None for v in (self.auth, self.tokens, self.user_header))

    @property
    def kubernetes(self) -> bool:
        """
        Whether sessions are pods (--engine kubernetes).
        """
        return self.engine == "kubernetes"
