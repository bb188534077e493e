"""
Session profiles: what a session is made of (image, command, environment,
limits, network, idle and lifetime limits, secrets, an agent volume, a git
repository), chosen by name when a session is opened.

Two profiles are built in: C{shell} (the server's own options: --image,
--shell, --memory...) and C{claude} (the agent image, Claude Code in
/workspace, then a login shell).  A TOML file (C{--profiles FILE}, read with
C{tomllib}) may change them and add others; each of its tables
C{[profiles.NAME]} starts from the built-in profile of that name, or from the
one it C{extends}, or from C{shell}.  Everything in it is checked when
capsule starts: an unknown key, a wrong type, a repository that is not
https, an odd path is refused with the file, the profile and the key named.

Clients only ever pick a profile's name: never an image, a mount or a
privilege.

Secrets are named by a profile (environment variable names); their values
come from the server's environment or from C{--secrets-file}, and enter a
container's environment when it is created (through the Docker API, never a
command line).  Nothing here logs a value.

Brokered credentials are named by a profile too (C{credentials =
["anthropic", "github"]}): their keys (L{CREDENTIALS}: which variable holds
each, read like secrets) never enter a container; its sessions get a
placeholder and the address of capsule's credential gateway instead
(L{capsule.gateway}).

Pure: no reactor, no Docker.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import stat
import tomllib
from dataclasses import dataclass, field, replace
from posixpath import normpath
from typing import Mapping
from urllib.parse import urlsplit

from docker.utils import parse_bytes

from capsule.core.egress import AGENT_EGRESS, ALLOWLIST, OPEN_POLICY, EgressPolicy, parse_egress
from capsule.core.spec import ContainerSpec
from capsule.core.errors import CapsuleError

DEFAULT_PROFILE = "shell"
AGENT_PROFILE = "claude"
DEFAULT_AGENT_IMAGE = "capsule-agent:latest"
DEFAULT_CLONE_TIMEOUT = 300.0
# The most an agent volume may hold, where a profile does not say
# (agent_volume_limit): what an agent remembers (logins, settings, history)
# is far smaller.
DEFAULT_AGENT_VOLUME_LIMIT = 1024 ** 3
# What admission counts a session at before it is measured (its memory
# request, beside its limit): an idle shell holds a few MB, an agent a few
# hundred (see docs/operate.md, Sizing a host).
DEFAULT_MEMORY_REQUEST = "64m"
DEFAULT_AGENT_MEMORY_REQUEST = "512m"

# Where the built-in claude profile keeps Claude Code's whole state (its
# CLAUDE_CONFIG_DIR: settings, logins, history and the .claude.json beside
# them), on each user's agent volume.
CLAUDE_CONFIG_DIR = "/home/developer/.claude"
# A profile's agent_permissions: Claude Code asks before it acts ("ask"), or
# runs with --dangerously-skip-permissions ("bypass": the container is the
# sandbox).
AGENT_PERMISSIONS = ("ask", "bypass")

# Claude Code in /workspace, then a login shell, so that the session stays
# useful.  Before it: Claude Code's config marked as onboarded with
# /workspace trusted (keys added only where absent: a user's own settings
# are never changed; node is the agent image's), and, with no key in the
# environment and no login kept in its config directory, a few lines in the
# terminal on how to log in.  CAPSULE_AGENT_PERMISSIONS=bypass (a profile's
# agent_permissions) runs it with --dangerously-skip-permissions.
CLAUDE_SCRIPT = r"""
cd /workspace 2>/dev/null || cd
config_dir="${CLAUDE_CONFIG_DIR:-$HOME/.claude}"
config_file="${CLAUDE_CONFIG_DIR:-$HOME}/.claude.json"
bypass=
if [ "$CAPSULE_AGENT_PERMISSIONS" = bypass ]; then bypass=1; fi
unset CAPSULE_AGENT_PERMISSIONS
if command -v node >/dev/null 2>&1; then
  mkdir -p "$config_dir" 2>/dev/null
  node -e SEED "$config_file" "$config_dir/settings.json" "$bypass"
fi
if [ -z "$ANTHROPIC_API_KEY$ANTHROPIC_AUTH_TOKEN$CLAUDE_CODE_OAUTH_TOKEN" ] \
    && [ -z "$CLAUDE_CODE_USE_BEDROCK$CLAUDE_CODE_USE_VERTEX" ] \
    && ! [ -s "$config_dir/.credentials.json" ] \
    && ! grep -qs '"primaryApiKey"\|"apiKeyHelper"' "$config_file" "$config_dir/settings.json"
then
  # Short lines: a phone's terminal is some 45 columns wide.
  printf '\ncapsule: no Anthropic key, no login yet.\n'
  printf 'To log in, type /login in Claude Code\n'
  # Said only where the config directory is a volume of its own.
  if grep -qsF " $config_dir " /proc/self/mountinfo; then
    printf '(the login is kept for your next sessions),\n'
  fi
  printf 'or ask the operator to start capsule\n'
  printf 'with ANTHROPIC_API_KEY set.\n\n'
fi
if [ -n "$bypass" ]; then
  claude --dangerously-skip-permissions "$@"
else
  claude "$@"
fi
exec bash -l
"""
# (SEED: the script below.)
# Adds what Claude Code asks on a first start to its config (argv: the
# .claude.json, the settings.json, "1" for bypass): onboarding done and
# /workspace trusted, and in bypass mode its warning accepted.  Only keys
# that are absent, in a file that parses (or does not exist yet), written
# whole by a rename.
CLAUDE_SEED = r"""
const fs = require("fs");
function seed(file, add) {
  let data = {};
  try {
    data = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (e) {
    if (e.code !== "ENOENT") return;
  }
  if (data === null || typeof data !== "object" || Array.isArray(data)) return;
  if (!add(data)) return;
  const temporary = file + ".capsule-" + process.pid;
  fs.writeFileSync(temporary, JSON.stringify(data, null, 2) + "\n", { mode: 0o600 });
  fs.renameSync(temporary, file);
}
const [file, settings, bypass] = process.argv.slice(1);
try {
  seed(file, (c) => {
    let changed = false;
    if (!("hasCompletedOnboarding" in c)) {
      c.hasCompletedOnboarding = true;
      changed = true;
    }
    if (c.projects === undefined) c.projects = {};
    const projects = c.projects;
    if (projects === null || typeof projects !== "object" || Array.isArray(projects)) return changed;
    if (projects["/workspace"] === undefined) projects["/workspace"] = {};
    const project = projects["/workspace"];
    if (project !== null && typeof project === "object" && !("hasTrustDialogAccepted" in project)) {
      project.hasTrustDialogAccepted = true;
      changed = true;
    }
    return changed;
  });
  if (bypass) {
    seed(settings, (s) => {
      if ("skipDangerousModePermissionPrompt" in s) return false;
      s.skipDangerousModePermissionPrompt = true;
      return true;
    });
  }
} catch (e) {
  console.error("capsule: could not prepare the settings of Claude Code: " + e.message);
}
"""
CLAUDE_COMMAND = ("bash", "-lc", CLAUDE_SCRIPT.replace("node -e SEED", "node -e " + shlex.quote(
    CLAUDE_SEED)), "capsule-claude")

# What a profile's name, an environment variable's name and a repository
# may be.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
_PATH = re.compile(r"/[A-Za-z0-9._/-]{1,255}\Z")
MAX_REPOSITORY = 2048
MAX_PROFILE_PARAMETER = 64
# Variables capsule sets itself: a profile may not.
_RESERVED_ENV = frozenset({"CAPSULE_REPOSITORY", "CAPSULE_CLONE_TIMEOUT",
                           "CAPSULE_AGENT_VOLUME", "CAPSULE_AGENT_PERMISSIONS"})

# The brokered credentials a profile may name, and the variable (of
# capsule's environment or its secrets file) that holds each one's key.
CREDENTIALS = {"anthropic": "ANTHROPIC_API_KEY", "github": "GITHUB_TOKEN"}
# Variables that would hand a container what the gateway keeps out of it, by
# credential: a profile naming the credential may not set them.
_CREDENTIAL_VARIABLES = {"anthropic": ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")}

LABEL_USER = "io.capsule.user"
LABEL_PROFILE = "io.capsule.profile"
LABEL_VOLUME = "io.capsule.volume"


class ProfileError(ValueError):
    """
    A profiles file (or a secrets file) capsule refuses: the sentence names
    the file, the profile and the key.
    """


class UnknownProfile(CapsuleError):
    code = "unknown_profile"


class BadRepository(CapsuleError):
    code = "bad_repository"


@dataclass(frozen=True)
class Profile:
    """
    @ivar spec: how its containers are made (environment without secrets;
        labels are added per session).
    @ivar command: the argv run in the session's terminal.
    @ivar idle_timeout: seconds without input and output after which a
        session ends (0: never).
    @ivar max_lifetime: seconds after which a session ends (0: never).
    @ivar retention: seconds a session of it is kept (stopped, its files
        kept: docs/keeping.md) once put away, or once its grace period ended
        (0: it is removed then); C{None}: the server's --retention.
    @ivar secrets: names of environment variables whose values come from the
        server's environment or its secrets file.
    @ivar agent_volume: where a per-user named volume is mounted (C{None}:
        none).
    @ivar agent_volume_limit: the most that volume may hold, in bytes
        (C{None}: no limit); a session whose volume holds more is warned,
        then ended (L{capsule.sessions.disk}).
    @ivar credentials: the brokered credentials (names among
        L{CREDENTIALS}) its sessions use through capsule's gateway, never
        holding the key.
    @ivar repository: an https git URL cloned into /workspace at start.
    @ivar clone_timeout: seconds the clone may take.
    @ivar pool: warm containers kept for this profile.
    @ivar memory_request: what admission counts one of its sessions at
        until its measured use is more (Docker syntax; never more than its
        memory limit: see L{request}).
    @ivar agent_permissions: C{"ask"}, or C{"bypass"}: the built-in claude
        command runs Claude Code with --dangerously-skip-permissions (the
        container is the sandbox).
    @ivar egress: where its sessions may connect to (L{EgressPolicy}); a
        fenced one's run on capsule's fenced network (L{fence}).
    """

    name: str
    spec: ContainerSpec
    command: tuple[str, ...] = ("bash", "-l")
    idle_timeout: float = 0.0
    max_lifetime: float = 0.0
    retention: float | None = None
    secrets: tuple[str, ...] = ()
    agent_volume: str | None = None
    agent_volume_limit: int | None = DEFAULT_AGENT_VOLUME_LIMIT
    credentials: tuple[str, ...] = ()
    repository: str | None = None
    clone_timeout: float = DEFAULT_CLONE_TIMEOUT
    pool: int = 0
    description: str = ""
    memory_request: str = DEFAULT_MEMORY_REQUEST
    agent_permissions: str = "ask"
    egress: EgressPolicy = OPEN_POLICY

    @property
    def memory(self) -> int:
        """
        Its containers' memory limit, in bytes.
        """
        return parse_bytes(self.spec.memory)

    @property
    def request(self) -> int:
        """
        Its memory request, in bytes: what admission counts a session of
        it at before measuring it (at most its limit).
        """
        return min(parse_bytes(self.memory_request), self.memory)

    def describe(self) -> dict:
        """
        What a client may know of it: its name, its description, its image.
        """
        return {"name": self.name, "description": self.description}


def builtin_profiles(shell: Profile, agent_image: str = DEFAULT_AGENT_IMAGE) -> dict[str, Profile]:
    """
    The built-in profiles: C{shell} as given (the server's options), and
    C{claude}, which differs from it in image and command, keeps Claude
    Code's state (C{CLAUDE_CONFIG_DIR}) on each user's agent volume and keeps
    no warm containers.
    """
    shell = replace(shell, name=DEFAULT_PROFILE,
                    description=shell.description or "a login shell")
    claude = replace(shell, name=AGENT_PROFILE,
                     spec=replace(shell.spec, image=agent_image, environment={
                         **shell.spec.environment, "CLAUDE_CONFIG_DIR": CLAUDE_CONFIG_DIR}),
                     command=CLAUDE_COMMAND, pool=0, agent_volume=CLAUDE_CONFIG_DIR,
                     memory_request=DEFAULT_AGENT_MEMORY_REQUEST,
                     egress=EgressPolicy(ALLOWLIST, AGENT_EGRESS),
                     credentials=("anthropic", "github"),
                     description="Claude Code in /workspace, then a login shell")
    return {DEFAULT_PROFILE: shell, AGENT_PROFILE: claude}


def fence(profiles: Mapping[str, Profile], network: str) -> dict[str, Profile]:
    """
    The profiles, those whose egress is not open put on the fenced
    C{network} (one with no route out), unless they have no network at all.
    """
    return {name: replace(p, spec=replace(p.spec, network=network))
            if p.egress.fenced and p.spec.network != "none" else p
            for name, p in profiles.items()}


# -- the file -----------------------------------------------------------------

def load_profiles(path: str | None, builtins: Mapping[str, Profile]) -> dict[str, Profile]:
    """
    The profiles: C{builtins} changed and added to by the TOML file at
    C{path} (if any).

    @raise ProfileError: naming the file, the profile and the key.
    """
    profiles = dict(builtins)
    if path is None:
        return profiles
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ProfileError(f"{path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not TOML: {e}") from None
    unknown = set(data) - {"profiles"}
    if unknown:
        raise ProfileError(f"{path}: unknown key {sorted(unknown)[0]!r} (profiles are"
                           " tables [profiles.NAME])")
    tables = data.get("profiles", {})
    if not isinstance(tables, dict):
        raise ProfileError(f"{path}: profiles must be tables [profiles.NAME]")
    # Those that extend another come after it.
    pending = dict(tables)
    while pending:
        progress = False
        for name, table in list(pending.items()):
            where = f"{path}: profile {name!r}"
            if not _NAME.match(name):
                raise ProfileError(f"{where}: a name is 1 to 32 of a-z, 0-9, _ and -,"
                                   " starting with a letter or digit")
            if not isinstance(table, dict):
                raise ProfileError(f"{where}: must be a table [profiles.{name}]")
            parent = table.get("extends", name if name in builtins else DEFAULT_PROFILE)
            if not isinstance(parent, str):
                raise ProfileError(f"{where}: key 'extends': must be a profile's name")
            if parent != name and parent in pending:
                continue
            base = profiles.get(parent)
            if base is None:
                raise ProfileError(f"{where}: key 'extends': no profile {parent!r}"
                                   f" (there are: {', '.join(sorted(profiles))})")
            profiles[name] = _profile(where, name, base, table)
            del pending[name]
            progress = True
        if not progress:
            raise ProfileError(f"{path}: profiles extend each other in a circle:"
                               f" {', '.join(sorted(pending))}")
    return profiles


def _profile(where: str, name: str, base: Profile, table: dict) -> Profile:
    spec = {}
    fields = {}
    for key, value in table.items():
        check = _KEYS.get(key)
        if check is None:
            raise ProfileError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_KEYS))})")
        try:
            converted = check(value)
        except (TypeError, ValueError) as e:
            raise ProfileError(f"{where}: key {key!r}: {e}") from None
        if key in _SPEC_KEYS:
            spec[_SPEC_KEYS[key]] = converted
        elif key != "extends":
            fields[key] = converted
    if "environment" in spec:
        spec["environment"] = {**base.spec.environment, **spec["environment"]}
    if fields.get("secrets") and "environment" in spec:
        both = set(fields["secrets"]) & set(spec["environment"])
        if both:
            raise ProfileError(f"{where}: key 'secrets': {sorted(both)[0]} is also in"
                               " environment")
    egress = fields.get("egress", base.egress)
    if "network" in spec and spec["network"] != "none" and egress.fenced:
        raise ProfileError(f"{where}: key 'network': a profile whose egress is not open runs"
                           f" on capsule's fenced network ({egress.setting()}): leave network"
                           f" out, or say none")
    credentials = fields.get("credentials", base.credentials)
    secret_names = fields.get("secrets", base.secrets)
    environment = spec.get("environment", base.spec.environment)
    for credential in credentials:
        for variable in _CREDENTIAL_VARIABLES.get(credential, ()):
            if variable in secret_names or variable in environment:
                where_set = "secrets" if variable in secret_names else "environment"
                raise ProfileError(
                    f"{where}: key {where_set!r}: {variable} would put the {credential} key"
                    f" in the container, while key 'credentials' names {credential!r}: its"
                    f" sessions reach {credential} through capsule's gateway, which holds"
                    f" {CREDENTIALS[credential]} (capsule's environment or --secrets-file);"
                    f" remove {variable} from {where_set}, or {credential!r} from"
                    f" credentials")
    if "memory_request" in fields and parse_bytes(fields["memory_request"]) > parse_bytes(
            spec.get("memory", base.spec.memory)):
        raise ProfileError(f"{where}: key 'memory_request': {fields['memory_request']} is more"
                           f" than its memory limit {spec.get('memory', base.spec.memory)}")
    return replace(base, name=name, spec=replace(base.spec, **spec), **fields)


def _string(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError("must be a non-empty string")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not hold control characters")
    return value


def _number(minimum: float, strict: bool = False):
    def convert(value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("must be a number")
        if value < minimum or (strict and value == minimum) or value != value:
            raise ValueError(f"must be {'more than' if strict else 'at least'} {minimum:g},"
                             f" got {value}")
        return float(value)
    return convert


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")


def parse_duration(value) -> float:
    """
    Seconds, from a number of seconds (at least 0) or a string of a number
    and a unit (C{"90s"}, C{"30m"}, C{"12h"}, C{"7d"}, C{"2w"}).

    @raise ValueError, TypeError: saying what it must be.
    """
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"not a duration: {value[:40]!r} (seconds, or a number and a unit"
                             " of s, m, h, d, w: 7d)")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return _number(0)(value)


def _integer(minimum: int):
    def convert(value) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("must be an integer")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value
    return convert


def _size(value) -> str:
    text = _string(value)
    try:
        if parse_bytes(text) <= 0:
            raise ValueError
    except Exception:
        raise ValueError(f"not a size: {text!r} (try 512m or 4g)") from None
    return text


def _command(value) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise TypeError('must be a non-empty list of strings (an argv: ["bash", "-l"])')
    for item in value:
        if not isinstance(item, str):
            raise TypeError('must be a non-empty list of strings (an argv: ["bash", "-l"])')
        if "\0" in item:
            raise ValueError("must not hold NUL")
    if not value[0]:
        raise ValueError("its program must not be empty")
    return tuple(value)


def _env_name(value) -> str:
    if not isinstance(value, str) or not _ENV_NAME.match(value):
        raise ValueError(f"not an environment variable's name: {value!r}")
    if value in _RESERVED_ENV:
        raise ValueError(f"{value} is set by capsule")
    return value


def _environment(value) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError('must be a table of strings (environment = { NAME = "value" })')
    result = {}
    for name, text in value.items():
        _env_name(name)
        if not isinstance(text, str):
            raise TypeError(f"{name}: must be a string")
        if "\0" in text:
            raise ValueError(f"{name}: must not hold NUL")
        result[name] = text
    return result


def _secrets(value) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError('must be a list of environment variable names (["ANTHROPIC_API_KEY"])')
    return tuple(dict.fromkeys(_env_name(v) for v in value))


def _credentials(value) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError('must be a list of credential names (["anthropic", "github"])')
    for name in value:
        if name not in CREDENTIALS:
            shown = name if isinstance(name, str) and len(name) <= 64 else "(not a name)"
            raise ValueError(f"unknown credential {shown!r} (known: {', '.join(CREDENTIALS)})")
    return tuple(dict.fromkeys(value))


def _agent_volume(value) -> str:
    text = _string(value)
    if not _PATH.match(text) or normpath(text) != text or text.startswith("//"):
        raise ValueError(f"must be an absolute, normal path of letters, digits and ._/-,"
                         f" got {text!r}")
    if text in ("/", "/workspace") or text.startswith(("/workspace/", "/proc", "/sys", "/dev",
                                                       "/etc", "/tmp/.capsule-keeper")):
        raise ValueError(f"cannot be {text} (try /home/developer/.claude)")
    return text


def _network(value) -> str:
    text = _string(value)
    if not re.match(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z", text):
        raise ValueError(f"not a network's name: {text!r}")
    if text in ("host",) or text.startswith("container:"):
        raise ValueError(f"{text} would share the host's or another container's network")
    return text


def _image(value) -> str:
    text = _string(value)
    if any(c.isspace() for c in text) or len(text) > 255:
        raise ValueError(f"not an image's name: {text!r}")
    return text


def _disk(value) -> str | None:
    if value == "off":
        return None
    return _size(value)


def _permissions(value) -> str:
    if value not in AGENT_PERMISSIONS:
        raise ValueError(f"must be {' or '.join(repr(p) for p in AGENT_PERMISSIONS)},"
                         f" got {value!r}")
    return value


def _volume_limit(value) -> int | None:
    if value == "off":
        return None
    return parse_bytes(_size(value))


def check_repository(value) -> str:
    """
    An https git URL without credentials in it.

    @raise ValueError: saying why not.
    """
    if not isinstance(value, str):
        raise TypeError("must be a string (an https URL)")
    if len(value) > MAX_REPOSITORY:
        raise ValueError(f"longer than {MAX_REPOSITORY} characters")
    if any(ord(c) <= 32 or ord(c) == 127 for c in value):
        raise ValueError("must not hold spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"not a URL: {value[:100]!r}") from None
    if parts.scheme != "https":
        raise ValueError("must be an https:// URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("must not hold credentials (give a token as a secret instead)")
    if not parts.hostname or parts.hostname.startswith("-") or port == 0:
        raise ValueError("must name a host")
    if parts.fragment or "@" in value:
        raise ValueError("must not hold a fragment or '@'")
    return value


_KEYS = {
    "extends": _string,
    "description": _string,
    "image": _image,
    "command": _command,
    "environment": _environment,
    "memory": _size,
    "memory_request": _size,
    "cpus": _number(0, strict=True),
    "pids": _integer(1),
    "disk": _disk,
    "network": _network,
    "idle_timeout": _number(0),
    "max_lifetime": _number(0),
    "retention": parse_duration,
    "secrets": _secrets,
    "credentials": _credentials,
    "agent_volume": _agent_volume,
    "agent_volume_limit": _volume_limit,
    "agent_permissions": _permissions,
    "repository": check_repository,
    "clone_timeout": _number(0, strict=True),
    "pool": _integer(0),
    "egress": parse_egress,
}
# Keys that are the container spec's, by the spec's name for them.
_SPEC_KEYS = {"image": "image", "environment": "environment", "memory": "memory",
              "cpus": "cpus", "pids": "pids", "disk": "disk", "network": "network"}


def parse_profile_name(value: str, profiles: Mapping[str, Profile]) -> Profile:
    """
    The profile a client named.

    @raise UnknownProfile: listing the available ones.
    """
    profile = profiles.get(value) if isinstance(value, str) else None
    if profile is None:
        shown = value if isinstance(value, str) and len(value) <= MAX_PROFILE_PARAMETER \
            else "(too long)"
        shown = "".join(c if c.isprintable() else "?" for c in shown)
        raise UnknownProfile(f"no profile {shown!r}: the profiles are"
                             f" {', '.join(sorted(profiles))}")
    return profile


# -- secrets --------------------------------------------------------------------

@dataclass(frozen=True)
class Secrets:
    """
    Values of secrets by name.  Never shown: its repr names the variables,
    not their values.
    """

    values: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return f"<Secrets {', '.join(sorted(self.values)) or 'none'}>"

    def for_profile(self, profile: Profile) -> dict[str, str]:
        """
        The environment a profile's containers get from secrets (those
        known; a missing one is left out).
        """
        return {name: self.values[name] for name in profile.secrets if name in self.values}

    def missing(self, profiles: Mapping[str, Profile]) -> list[tuple[str, str]]:
        """
        C{(profile, variable)} for each secret a profile names that has no
        value.
        """
        return [(p.name, name) for p in profiles.values() for name in p.secrets
                if name not in self.values]


def load_secrets(path: str | None, profiles: Mapping[str, Profile],
                 environ: Mapping[str, str] | None = None) -> Secrets:
    """
    The values of the secrets the profiles name: from the secrets file at
    C{path} (C{NAME=value} lines; C{#} comments, blank lines), else from
    C{environ} (the server's environment).  The file must not be readable or
    writable by others than its owner and group.

    @raise ProfileError: for a file that is unsafe or does not parse (no
        value is ever quoted).
    """
    environ = os.environ if environ is None else environ
    wanted = {name for p in profiles.values() for name in p.secrets}
    # The keys of the brokered credentials, for the gateway (never for a
    # container: for_profile gives only a profile's secrets).
    wanted |= set(CREDENTIALS.values())
    values = {name: environ[name] for name in wanted if environ.get(name)}
    if path is None:
        return Secrets(values)
    try:
        # Not blocking on a FIFO: only a regular file is read.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ProfileError(f"{path}: not a regular file")
            if mode & (stat.S_IROTH | stat.S_IWOTH):
                raise ProfileError(
                    f"{path}: readable or writable by every user (mode {stat.S_IMODE(mode):o}):"
                    f" chmod 600 {path}")
            data = f.read(1024 * 1024 + 1)
    except OSError as e:
        raise ProfileError(f"{path}: {e.strerror}") from None
    if len(data) > 1024 * 1024:
        raise ProfileError(f"{path}: larger than 1 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not UTF-8") from None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _ENV_NAME.match(name):
            raise ProfileError(f"{path}, line {number}: not NAME=value")
        if "\0" in value:
            raise ProfileError(f"{path}, line {number} ({name}): holds NUL")
        if name in wanted and value:
            values[name] = value
    return Secrets(values)


# -- agent volumes ------------------------------------------------------------

def agent_volume_name(instance: str, profile: str, user: str | None) -> str:
    """
    The Docker volume of C{user}'s agent state for C{profile}: a name Docker
    accepts, unique per instance, profile and user (the user's name is
    hashed: any string may be a user's name).  C{None} is the one local
    user of a capsule without users: its volume is named C{local} and
    hashed apart from every user's (a profile's name has no NUL or SOH).
    """
    key = f"{instance}\0{profile}\1local" if user is None \
        else f"{instance}\0{profile}\0{user}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", "local" if user is None else user)[:32]
    safe_instance = re.sub(r"[^A-Za-z0-9_.-]", "_", instance)[:32]
    return f"capsule-{safe_instance}-{profile}-{readable}-{digest}"


# -- the command a session runs -------------------------------------------------

# Clones $CAPSULE_REPOSITORY into /workspace as the session's user, with a
# time limit, in the terminal (progress and errors show there), then runs
# the profile's command.  The URL is an environment variable, never part of
# the shell code.
CLONE_SCRIPT = r"""
if [ -n "$CAPSULE_AGENT_VOLUME" ] && ! [ -w "$CAPSULE_AGENT_VOLUME" ]; then
  printf 'capsule: %s (this profile'"'"'s agent volume) is not writable by %s: the image must\n' \
    "$CAPSULE_AGENT_VOLUME" "$(id -un)"
  printf 'capsule: have that directory, owned by %s (what the agent saves there is lost)\n' \
    "$(id -un)"
fi
if [ -n "$CAPSULE_REPOSITORY" ]; then
  printf 'capsule: cloning %s into /workspace\n' "$CAPSULE_REPOSITORY"
  GIT_TERMINAL_PROMPT=0 GIT_ASKPASS=/bin/false timeout -k 5 "$CAPSULE_CLONE_TIMEOUT" \
    git -c protocol.allow=never -c protocol.https.allow=always \
    clone --progress -- "$CAPSULE_REPOSITORY" /workspace
  status=$?
  if [ "$status" -eq 0 ]; then
    printf 'capsule: cloned into /workspace\n'
  elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    printf 'capsule: the clone was stopped after %s s (clone_timeout)\n' "$CAPSULE_CLONE_TIMEOUT"
  else
    printf 'capsule: the clone failed (git exited with %s)\n' "$status"
  fi
fi
unset CAPSULE_REPOSITORY CAPSULE_CLONE_TIMEOUT CAPSULE_AGENT_VOLUME
exec "$@"
"""


def start_command(profile: Profile, repository: str | None,
                  volume: bool = False) -> tuple[tuple[str, ...], dict[str, str]]:
    """
    The argv a session of C{profile} runs in its terminal, and the
    environment of the exec that starts it (the profile's, without secrets:
    those are the container's).  With a repository, the argv clones it
    first; with an agent C{volume}, it says so in the terminal when the
    user cannot write there.  A profile whose C{agent_permissions} is
    C{bypass} has C{CAPSULE_AGENT_PERMISSIONS=bypass} for the claude command
    (and C{IS_SANDBOX=1}, which Claude Code wants of root to bypass).
    """
    environment = dict(profile.spec.environment)
    if profile.agent_permissions == "bypass":
        environment["CAPSULE_AGENT_PERMISSIONS"] = "bypass"
        environment["IS_SANDBOX"] = "1"
    if repository is None and not volume:
        return profile.command, environment
    if repository is not None:
        environment["CAPSULE_REPOSITORY"] = repository
        environment["CAPSULE_CLONE_TIMEOUT"] = f"{max(1, round(profile.clone_timeout))}"
    if volume:
        environment["CAPSULE_AGENT_VOLUME"] = profile.agent_volume
    return ("sh", "-c", CLONE_SCRIPT, "capsule-start", *profile.command), environment
