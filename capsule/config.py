"""
capsule's configuration as one frozen value: what C{twistd capsule}'s
options (L{capsule.tap.Options}) and the tuning knobs (L{capsule.tuning})
say, parsed and checked.  L{capsule.services.make_service} builds the
server from it.

C{python -m capsule.config --write-docs} writes C{docs/options.md} and
C{docs/tuning.md}, generated from the options and the tuning table; a test
fails when the committed files differ.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from capsule.core.profiles import Profile, Secrets
from capsule.core.spec import ContainerSpec
from capsule.tuning import Tuning, tuning_markdown

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class CapsuleConfig:
    """
    Everything the server is built from.  Sizes are bytes, durations
    seconds; C{None} means the option was not given (its meaning is said
    where it matters).
    """

    # -- where it listens, and who may use it ----------------------------------
    listen: tuple[str, ...]
    insecure_no_auth: bool = False
    auth: str | None = None
    tokens: str | None = None
    user_header: str | None = None
    trusted_proxies: tuple[Network, ...] = ()
    public_url: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    metrics_token: str | None = None
    admin_token: str | None = None
    admin_users: tuple[str, ...] = ()

    # -- the sessions ----------------------------------------------------------
    # The shell profile's container (--image, --memory, --cpus, ...).
    spec: ContainerSpec = ContainerSpec(image="capsule-runtime:latest")
    memory_bytes: int = 4 * 1024 ** 3
    disk_bytes: int | None = None
    instance: str = "default"
    shell: tuple[str, ...] = ("bash", "-l")
    keeper: bool = True
    grace: float = 60.0
    max_lifetime: float = 0.0
    idle_timeout: float = 86400.0
    replay_bytes: int = 1024 * 1024
    pool_size: int = 2
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    secrets: Secrets = Secrets()

    # -- admission -------------------------------------------------------------
    max_sessions: int = 32
    max_sessions_per_client: int = 8
    max_sessions_per_user: int | None = None
    session_rate: tuple[int, float] = (10, 60.0)
    # None: no budget (--memory-budget off, or the engine's memory until it
    # is known, see memory_budget_from_engine).
    memory_budget: int | None = None
    memory_budget_from_engine: bool = True

    # -- exports and uploads ---------------------------------------------------
    exports_per_client: int = 2
    export_max_bytes: int = 2 * 1024 ** 3
    export_timeout: float = 600.0
    upload_max_bytes: int = 1024 ** 3

    # -- operations ------------------------------------------------------------
    www: str = ""
    # None: the default (capsule.sessions.owners.default_state_dir).
    state_dir: str | None = None
    log_format: str = "text"
    # twistd's own logfile and nodaemon options (where a JSON log goes).
    server_options: Mapping | None = None
    record: str | None = None
    record_max_bytes: int = 50 * 1024 * 1024

    tuning: Tuning = Tuning()

    @property
    def users(self) -> bool:
        """
        Whether capsule has users (--auth, --tokens or --user-header).
        """
        return any(v is not None for v in (self.auth, self.tokens, self.user_header))


# -- the generated documentation ------------------------------------------------------

DOCS_COMMAND = "python -m capsule.config --write-docs"

# Options by subject, for the table; any option not named here goes last.
_GROUPS = [
    ("Listening and users", [
        "listen", "insecure-no-auth", "auth", "tokens", "user-header", "trusted-proxy",
        "public-url", "allowed-host", "allowed-origin", "admin-user", "admin-token",
        "admin-token-file", "metrics-token", "metrics-token-file"]),
    ("Session containers", [
        "image", "memory", "cpus", "pids", "cpu-shares", "disk", "network", "runtime",
        "cap-add", "allow-sudo", "read-only-root", "shell", "no-keeper"]),
    ("Session lifetime", [
        "instance", "grace", "max-lifetime", "idle-timeout", "replay-buffer", "pool-size"]),
    ("Profiles", ["profiles", "agent-image", "secrets-file", "clone-timeout"]),
    ("Admission", [
        "max-sessions", "max-sessions-per-client", "max-sessions-per-user", "session-rate",
        "memory-budget"]),
    ("Exports and uploads", [
        "exports-per-client", "export-max-bytes", "export-timeout", "upload-max-bytes"]),
    ("Operations", [
        "www", "state-dir", "log-format", "record", "record-max-bytes", "tuning"]),
]


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def options_markdown(options_class=None) -> str:
    """
    docs/options.md: every option of C{twistd capsule} (those C{--help}
    shows), its default and its meaning, as Markdown tables by subject.
    """
    if options_class is None:
        from capsule.tap import Options as options_class
    options = options_class()
    rows = {}
    for entry in options.describe():
        rows[entry["long"]] = entry
    lines = [
        "# Options",
        "",
        "<!-- Generated from capsule/tap.py by `" + DOCS_COMMAND + "`; do not edit. -->",
        "",
        "The options of `twistd capsule` (`twistd -n capsule --help` says the same)."
        " Sizes take Docker's syntax (`512m`, `4g`); durations are in seconds. Options"
        " marked repeatable may be given more than once. capsule's internal knobs (thread"
        " pools, timers, protocol windows) are not options: see [tuning](tuning.md).",
    ]
    seen = set()
    for title, names in _GROUPS + [("Other", sorted(rows))]:
        names = [n for n in names if n in rows and n not in seen]
        if not names:
            continue
        lines += ["", f"## {title}", "", "| option | default | meaning |",
                  "| --- | --- | --- |"]
        for name in names:
            seen.add(name)
            entry = rows[name]
            option = f"`--{name}`" + (f", `-{entry['short']}`" if entry["short"] else "")
            default = entry["default"]
            shown = ("off" if entry["kind"] == "flag" else "" if default is None
                     else f"`{_cell(default)}`")
            lines.append(f"| {option} | {shown} | {_cell(entry['doc'])} |")
    return "\n".join(lines) + "\n"


def generated_docs() -> dict[str, str]:
    """
    The generated files under docs/, by name.
    """
    return {"options.md": options_markdown(), "tuning.md": tuning_markdown()}


def main(argv: list[str]) -> int:
    docs = Path(__file__).resolve().parents[1] / "docs"
    if argv == ["--write-docs"]:
        docs.mkdir(exist_ok=True)
        for name, text in generated_docs().items():
            (docs / name).write_text(text, encoding="utf-8")
            print(f"wrote {docs / name}")
        return 0
    if argv == ["--options"]:
        sys.stdout.write(options_markdown())
        return 0
    if argv == ["--tuning"]:
        sys.stdout.write(tuning_markdown())
        return 0
    print("usage: python -m capsule.config --write-docs | --options | --tuning",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
