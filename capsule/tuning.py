"""
Tuning: capsule's internal knobs, which an operator has no reason to set
(thread pools, timers, protocol windows).  They are not options, so that
C{--help} shows only what an operator decides; the tests, the bench and
the rare deployment that needs one set them here, by name:

  - C{--tuning FILE}: a TOML file of C{name = value} lines;
  - C{CAPSULE_TUNING="name=value,name=value"} in capsule's environment,
    which wins over the file.

An unknown name or a bad value stops capsule at start, naming the knob.
The table below is the only place a knob is described; C{docs/tuning.md}
is generated from it (C{python -m capsule.docs --write}).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace

ENVIRONMENT = "CAPSULE_TUNING"


class TuningError(ValueError):
    """
    A tuning knob that does not exist, or a value it does not take; the
    message names the knob.
    """


def _number(kind, minimum: float, inclusive: bool):
    def convert(value):
        if isinstance(value, bool):
            raise ValueError(f"not a number: {value!r}")
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"not {'a whole number' if kind is int else 'a number'}:"
                             f" {value!r}") from None
        if kind is int and isinstance(value, float) and number != value:
            raise ValueError(f"not a whole number: {value!r}")
        if not (number >= minimum if inclusive else number > minimum):
            raise ValueError(f"must be {minimum:g} or more, got {value}" if inclusive
                             else f"must be more than {minimum:g}, got {value}")
        return number
    convert.kind = kind.__name__
    return convert


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not true or false: {value!r}")


_flag.kind = "bool"


def knob(default, parse, meaning: str):
    """
    A field of L{Tuning}: its default, how a value given as text (or as a
    TOML value) is read, and what it means.
    """
    return field(default=default, metadata={"parse": parse, "meaning": meaning})


_POSITIVE_FLOAT = _number(float, 0, False)
_POSITIVE_INT = _number(int, 0, False)
_NON_NEGATIVE_FLOAT = _number(float, 0, True)
_NON_NEGATIVE_INT = _number(int, 0, True)


@dataclass(frozen=True)
class Tuning:
    """
    The internal knobs, by name (C{cleanup_interval} is set as
    C{cleanup-interval}).
    """

    cleanup_interval: float = knob(
        5.0, _POSITIVE_FLOAT, "Seconds between sweeps for expired sessions.")
    orphan_sweep: float = knob(
        30.0, _POSITIVE_FLOAT,
        "Seconds between sweeps for containers of this server that no session owns (their"
        " removal failed while the engine was away).")
    replica_lease: float = knob(
        15.0, _POSITIVE_FLOAT,
        "Seconds a replica's Lease holds once renewed (--engine kubernetes): a replica silent"
        " for longer is gone, and its sessions are adopted by the others.")
    replica_renew: float = knob(
        5.0, _POSITIVE_FLOAT,
        "Seconds between two renewals of a replica's Lease (--engine kubernetes).")
    idle_cpu_interval: float = knob(
        30.0, _POSITIVE_FLOAT,
        "Most seconds between two readings of the CPU use of a session that is without"
        " input and output (a quarter of its idle limit where that is shorter); a session"
        " that types or prints is not read at all.")
    idle_cpu_threshold: float = knob(
        0.02, _NON_NEGATIVE_FLOAT,
        "CPU, as a fraction of one CPU, a session's container may use between two readings"
        " and still be idle (an idle shell and its keeper use far less).")
    host_memory_interval: float = knob(
        5.0, _POSITIVE_FLOAT,
        "Seconds between readings of the host's available memory and the sessions' memory"
        " use (files of /proc and the cgroups, when the engine runs on this host).")
    disk_check_interval: float = knob(
        30.0, _POSITIVE_FLOAT,
        "Seconds between checks of the sessions' disk use, where --disk is not enforced by"
        " the storage driver, and of agent volumes' sizes.")
    disk_scans_per_check: int = knob(
        2, _POSITIVE_INT,
        "Sessions scanned, at most, at each disk check for deleted files their processes"
        " still hold open (one exec each, taken in turn).")
    agent_volume_grace: float = knob(
        120.0, _POSITIVE_FLOAT,
        "Seconds a session whose agent volume holds more than its profile's"
        " agent_volume_limit has to bring it back under, before it is ended.")
    pool_max_age: float = knob(
        3600.0, _POSITIVE_FLOAT,
        "Seconds after which a warm container is replaced instead of handed out.")
    pool_grow_by: int = knob(
        6, _NON_NEGATIVE_INT,
        "Warm containers a pool may hold beyond its size while sessions are taken from it"
        " faster than it holds (0: it never grows); it is back at its size pool-window"
        " seconds after the last take.")
    pool_window: float = knob(
        30.0, _POSITIVE_FLOAT,
        "Seconds over which takes from a warm pool are counted: each take beyond the pool's"
        " size within them wants one more warm container (up to pool-grow-by).")
    start_at_first_frame: bool = knob(
        False, _flag,
        "Make a new session only when its client's first frame arrives, rather than as soon"
        " as its WebSocket upgrade is accepted (the default: the container is made while"
        " the client sends that frame).")
    max_message_size: int = knob(
        256 * 1024, _POSITIVE_INT,
        "Largest WebSocket message accepted, in bytes (larger: close 1009).")
    ping_interval: float = knob(
        20.0, _POSITIVE_FLOAT, "Seconds between WebSocket pings to each client.")
    ping_timeout: float = knob(
        20.0, _POSITIVE_FLOAT,
        "Seconds without a pong after which a client is considered gone (its session stays"
        " for --grace).")
    flow_window: int = knob(
        1024 * 1024, _POSITIVE_INT,
        "Bytes a binary-protocol client may have unacknowledged before its output pauses.")
    coalesce_ms: float = knob(
        2.0, _NON_NEGATIVE_FLOAT,
        "Milliseconds during which output following a send is gathered into one frame"
        " (once more than 16 KiB went out within them: a flood).")
    answer_write_timeout: float = knob(
        30.0, _POSITIVE_FLOAT,
        "Seconds an exec's answer waits for a client that reads none of it (its connection"
        " takes nothing in) before the answer is dropped and the connection closed.")
    egress_tunnels: int = knob(
        128, _POSITIVE_INT,
        "Connections one session may hold through the egress proxy at once (past them: 429).")
    egress_idle_timeout: float = knob(
        600.0, _POSITIVE_FLOAT,
        "Seconds a connection through the egress proxy may pass with no byte either way"
        " before it is closed.")
    http_header_timeout: float = knob(
        10.0, _POSITIVE_FLOAT,
        "Seconds a request has to send its headers, from its first byte (from the"
        " connection's opening, for its first request), however often bytes trickle in;"
        " past it the connection is closed (408).")
    http_idle_timeout: float = knob(
        30.0, _POSITIVE_FLOAT,
        "Seconds a keep-alive connection is kept between two requests.")
    ws_stall_timeout: float = knob(
        30.0, _POSITIVE_FLOAT,
        "Seconds a WebSocket client may leave its connection's outgoing buffer full (it"
        " reads nothing; capsule reads nothing from it meanwhile) before it is dropped.")
    share_ttl: float = knob(
        3600.0, _POSITIVE_FLOAT,
        "Seconds a read-only share link lives when its owner asks for no other lifetime.")
    share_max_ttl: float = knob(
        86400.0, _POSITIVE_FLOAT,
        "The most seconds an owner may ask a read-only share link to live (400 bad_request"
        " past it).")
    watchers_per_session: int = knob(
        10, _POSITIVE_INT,
        "Spectators watching one session at once through its share links (more: close"
        " 4429 too_many_watchers).")
    watch_backlog: int = knob(
        1024 * 1024, _POSITIVE_INT,
        "Bytes of output a spectator that does not keep up may have waiting before it is"
        " closed (4411 too_slow); a spectator never slows its session.")
    keeper_direct: bool = knob(
        True, _flag,
        "Reach the keeper of a session that has a network over TCP at its container's address"
        " (authenticated by a per-session secret), instead of through a relay exec that"
        " dockerd and containerd-shim carry; the relay exec stays the way for sessions"
        " without a network and whenever the direct connection fails.")
    docker_threads: int = knob(16, _POSITIVE_INT, "Threads for Docker calls.")
    max_removing: int = knob(
        32, _POSITIVE_INT,
        "Ended sessions' containers the engine may still be removing before new sessions"
        " are refused (server_full, try again in seconds): a flood of short sessions cannot"
        " queue unbounded work on the engine, nor a stop that waits for it.")
    export_threads: int = knob(
        4, _POSITIVE_INT,
        "Threads for workspace exports (waiting exports go to the client with the fewest"
        " running).")
    bodies_per_address: int = knob(
        8, _POSITIVE_INT,
        "Request bodies one client address may be sending at once (more: 429"
        " too_many_bodies, from the headers).")
    export_spool_bytes: int = knob(
        256 * 1024 * 1024, _POSITIVE_INT,
        "Bytes of archive one export may hold that its client has not taken yet (the first"
        " MiB in memory, the rest in a temporary file under $TMPDIR).")
    export_spool_budget: int = knob(
        1024 ** 3, _POSITIVE_INT,
        "Bytes of archive all exports together may hold that their clients have not taken"
        " yet (at most 16 MiB of it in memory); while it is full, new exports get 503"
        " exports_busy.")
    export_stall: float = knob(
        20.0, _POSITIVE_FLOAT,
        "Seconds an export's reading of Docker's stream may wait for room in its spool (its"
        " client taking nothing) before the export is cut off; Docker holds the session's"
        " container meanwhile.")
    anthropic_requests_per_session: int = knob(
        8, _POSITIVE_INT,
        "Requests one session may have under way at once through the Anthropic gateway"
        " (more: 429).")
    anthropic_body_bytes: int = knob(
        32 * 1024 * 1024, _POSITIVE_INT,
        "The largest request body a session may send through the Anthropic gateway (larger:"
        " 413, answered before the body is read).")
    anthropic_connect_timeout: float = knob(
        10.0, _POSITIVE_FLOAT,
        "Seconds the Anthropic gateway waits to connect to the upstream (past it: 504).")
    anthropic_answer_timeout: float = knob(
        600.0, _POSITIVE_FLOAT,
        "Seconds the upstream may take to begin its answer to a request through the"
        " Anthropic gateway (past it: 504).")
    anthropic_idle_timeout: float = knob(
        300.0, _POSITIVE_FLOAT,
        "Seconds an answer through the Anthropic gateway may stall between two pieces before"
        " it is cut off.")

    @property
    def coalesce_delay(self) -> float:
        """
        C{coalesce-ms} in seconds.
        """
        return self.coalesce_ms / 1000


def knob_name(attribute: str) -> str:
    return attribute.replace("_", "-")


KNOBS = {knob_name(f.name): f for f in fields(Tuning)}


def tune(base: Tuning, values: dict, source: str) -> Tuning:
    """
    C{base} with C{values} (by knob name, as text or TOML values) set.

    @param source: where the values come from, for the error message
        (C{""}: nowhere said).
    @raise TuningError: naming the first unknown knob or bad value.
    """
    where = f"{source}: " if source else ""
    changes = {}
    for name, value in values.items():
        name = name.strip()
        f = KNOBS.get(name) or KNOBS.get(knob_name(name))
        if f is None:
            raise TuningError(f"{where}no tuning knob {name!r} (there are:"
                              f" {', '.join(sorted(KNOBS))})")
        try:
            changes[f.name] = f.metadata["parse"](value)
        except (TypeError, ValueError) as e:
            raise TuningError(f"{where}{knob_name(f.name)}: {e}") from None
    return replace(base, **changes)


def parse_pairs(text: str, source: str = ENVIRONMENT) -> dict[str, str]:
    """
    C{"name=value,name=value"} as a dict (spaces around either are
    ignored, and so are empty items).
    """
    values = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise TuningError(f"{source}: not name=value: {item.strip()!r}")
        values[name.strip()] = value.strip()
    return values


def read_file(path: str) -> dict:
    """
    The knobs of a TOML file: C{name = value} lines at the top, or in a
    C{[tuning]} table.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise TuningError(f"{path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TuningError(f"{path}: not TOML: {e}") from None
    if set(data) == {"tuning"} and isinstance(data["tuning"], dict):
        data = data["tuning"]
    for name, value in data.items():
        if isinstance(value, (dict, list)):
            raise TuningError(f"{path}: {name}: not a single value")
    return data


def load_tuning(path: str | None = None, environ=None) -> Tuning:
    """
    The defaults, then the file C{path} (if any), then C{$CAPSULE_TUNING}.

    @raise TuningError: naming the knob.
    """
    environ = os.environ if environ is None else environ
    tuning = Tuning()
    if path is not None:
        tuning = tune(tuning, read_file(path), path)
    text = environ.get(ENVIRONMENT, "")
    if text.strip():
        tuning = tune(tuning, parse_pairs(text), ENVIRONMENT)
    return tuning


def tuning_markdown() -> str:
    """
    docs/tuning.md: the knobs, their defaults and meanings, as Markdown.
    """
    lines = [
        "# Tuning",
        "",
        "<!-- Generated from capsule/tuning.py by `python -m capsule.docs --write`;"
        " do not edit. -->",
        "",
        "capsule's internal knobs: thread pools, timers and protocol windows that an operator"
        " has no reason to change. They are not command-line options (`twistd capsule --help`"
        " lists only what an operator decides); the tests, the bench and the rare deployment"
        " that needs one set them by name:",
        "",
        "- `--tuning FILE`: a TOML file of `name = value` lines (at the top, or in a"
        " `[tuning]` table);",
        f"- `{ENVIRONMENT}=\"name=value,name=value\"` in capsule's environment, which wins"
        " over the file.",
        "",
        "An unknown name or a bad value stops capsule at start (exit status 1) with a message"
        " naming the knob. Flags take `true` or `false`.",
        "",
        "```sh",
        f"{ENVIRONMENT}=\"cleanup-interval=0.5,ping-interval=5\" twistd -n capsule",
        "```",
        "",
        "| knob | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    defaults = Tuning()
    for name, f in KNOBS.items():
        default = getattr(defaults, f.name)
        shown = str(default).lower() if isinstance(default, bool) else f"{default:g}" \
            if isinstance(default, float) else str(default)
        meaning = f.metadata["meaning"].replace("|", "\\|")
        lines.append(f"| `{name}` | {f.metadata['parse'].kind} | `{shown}` | {meaning} |")
    return "\n".join(lines) + "\n"
