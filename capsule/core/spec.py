"""
What a session's container is made of: the engine-neutral description that
profiles produce and every engine (L{capsule.engine}) turns into a container.
"""

from __future__ import annotations

from dataclasses import dataclass, field


# The most a process's oom_score_adj may be: killed first.
SESSION_OOM_SCORE_ADJ = 1000


@dataclass(frozen=True)
class ContainerSpec:
    """
    How a session container is made.
    """

    image: str
    memory: str = "4g"
    cpus: float = 2.0
    pids: int = 256
    # CPU weight against other cgroups when the CPUs are busy (Docker's
    # default, and the server's and engine's weight, is 1024): sessions
    # yield to capsule and to each other's keystrokes.
    cpu_shares: int = 256
    # The kernel's out-of-memory score adjustment of the container's
    # processes (inherited by every exec: the keeper, the shell): when the
    # host runs out of memory, a session's process is killed first, never
    # capsule (which lowers its own), dockerd or containerd.
    oom_score_adj: int = SESSION_OOM_SCORE_ADJ
    # Size of the writable layer (Docker syntax), or None for no limit.  It
    # is asked of the storage driver (storage_opt size=) where the driver
    # can enforce it; see DockerAPI.storage_quota.
    disk: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    user: str = "developer"
    workdir: str = "/workspace"
    hostname: str = "capsule"
    environment: dict[str, str] = field(
        default_factory=lambda: {"TERM": "xterm-256color", "LANG": "en_US.UTF-8"}
    )
    command: tuple[str, ...] = ("sleep", "infinity")
    # The network the container joins: a name, "none", or None for the
    # engine's default bridge.
    network: str | None = None
    # Capabilities on top of none: the session user is not root, so bash,
    # the keeper and a developer's work need none (see the README).
    cap_add: tuple[str, ...] = ()
    # Passwordless sudo (the image's capsule-sudo group): the capabilities a
    # root user needs come back (SUDO_CAPABILITIES) and no-new-privileges is
    # off, since sudo is a set-uid program.
    allow_sudo: bool = False
    # A read-only root filesystem, with /workspace and the home directory on
    # anonymous volumes (removed with the container) and tmpfs /tmp and /run.
    read_only_root: bool = False
    # The OCI runtime (runsc for gVisor), or None for the engine's default.
    runtime: str | None = None
    # Environment from secrets (capsule.core.profiles): set at creation only,
    # never shown (not in repr) and not given to execs.
    secrets: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # Named volumes: (volume name, mount path); Docker creates a missing one
    # with volume_labels (and fills it from the image's directory there).
    volumes: tuple[tuple[str, str], ...] = ()
    volume_labels: dict[str, str] = field(default_factory=dict)

    def capabilities(self) -> list[str]:
        """
        The capabilities the container keeps (all others are dropped).
        """
        kept = list(SUDO_CAPABILITIES) if self.allow_sudo else []
        return kept + [c for c in self.cap_add if c not in kept]


# What root needs for sudo and for apt, dpkg, chown or kill under
# --allow-sudo: Docker's defaults without NET_RAW (raw sockets: spoofing on
# the bridge), MKNOD and SYS_CHROOT.
SUDO_CAPABILITIES = ("AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                     "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID")
