"""
Kept sessions, snapshots, and what happens to a session's work when its
last tab closes: the records the engine, the manager, the API and the page
share (docs/keeping.md).

A session whose grace period ends, whose owner puts it away, or that was
idle past its profile's limit is I{kept} where its profile's retention is
more than 0: its container is stopped (its memory and CPU are free again)
and its file system stays for the retention; it can then be resumed,
exported, forked or deleted.  Past its retention it is removed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

# Why a session was put away.
PUT_AWAY = "put_away"      # its owner asked
GRACE = "grace"            # its last client left and the grace period ended
IDLE = "idle"              # nothing ran and nothing printed past the idle limit
STOPPED = "stopped"        # its container stopped under it (a reboot, the engine restarted)
REASONS = {
    PUT_AWAY: "put away by its owner",
    GRACE: "its last tab closed and the grace period ended",
    IDLE: "idle past its profile's limit",
    STOPPED: "its container stopped (the host or the engine restarted)",
}

# Where, in a kept session's container, the screen it had is saved (the
# keeper's replay buffer), and the most of it that is kept.  The file is
# named after its session: a profile may mount a volume of its user's over
# /home/developer, shared by that user's sessions, and a fork (a copy of the
# file system, under a new id) must not show its source's screen as its own.
SCREEN_DIRECTORY = "/home/developer/.cache/capsule"
SCREEN_MAX_BYTES = 1024 * 1024


def screen_path(session_id: str) -> str:
    """
    The file, in its container, where session C{session_id}'s screen is
    kept across a stop.
    """
    return f"{SCREEN_DIRECTORY}/screen-{session_id}"


# The screen file of a session whose id is not known (tests, tools).
SCREEN_PATH = f"{SCREEN_DIRECTORY}/screen"

# Error codes of the WebSocket and the API.
SESSION_KEPT = "session_kept"          # the session is kept: resume it to use it
KEPT_LIMIT = "kept_limit"              # the user keeps as many sessions as allowed
SNAPSHOT_NOT_FOUND = "snapshot_not_found"

# A snapshot's name: what a person types, safe as a Docker tag.
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def check_snapshot_name(name: object) -> str:
    """
    C{name} if it may name a snapshot (1 to 63 of a-z 0-9 _ . -, starting
    with a letter or a digit), else raise C{ValueError} with a sentence.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError("a snapshot's name is 1 to 63 characters of a-z, 0-9, '_', '.' and"
                         " '-', starting with a letter or a digit")
    return name


@dataclass(frozen=True)
class Snapshot:
    """
    A copy of a session's file system: its writable layer as an image, and
    each of its anonymous volumes as a volume, by mount point.
    """

    image: str                      # repository:tag
    volumes: dict[str, str]         # mount point -> volume name
    labels: dict[str, str]
    created: float
    size: int | None = None         # bytes of the image's own layer, when known

    @property
    def name(self) -> str:
        return self.labels.get("io.capsule.snapshot", "")


@dataclass
class KeptSession:
    """
    A session whose container is stopped and whose file system is kept.
    """

    id: str
    container_id: str
    user: str | None
    profile: str
    created: float
    kept_at: float
    retention: float                # seconds it is kept after C{kept_at}
    reason: str = GRACE
    size: int | None = None         # bytes of its writable layer
    command: str = ""               # what it ran (its profile's shell or agent)
    name: str = ""                  # its container's name
    extra: dict = field(default_factory=dict)

    @property
    def expires_at(self) -> float:
        return self.kept_at + self.retention

    def describe(self, now: float | None = None) -> dict:
        """
        The session as the API and the page list it.
        """
        now = time.time() if now is None else now
        return {
            "id": self.id,
            "state": "kept",
            "profile": self.profile,
            "created": self.created,
            "kept_at": self.kept_at,
            "kept_until": self.expires_at,
            "age": max(0.0, now - self.created),
            "size": self.size,
            "command": self.command,
            "reason": self.reason,
            "reason_text": REASONS.get(self.reason, self.reason),
        }


# What a session's shell is told of its retention (the image's banner says
# it): "7 days", "12 hours"; absent where its sessions are not kept.
KEPT_FOR_ENV = "CAPSULE_KEPT_FOR"


def duration_text(seconds: float) -> str:
    """
    A retention as people say it: C{7 days}, C{1 day}, C{12 hours},
    C{90 minutes}, C{45 seconds} (rounded down to the unit).
    """
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 120), ("second", 1)):
        if seconds >= size or unit == "second":
            count = int(seconds // (60 if unit == "minute" else size))
            return f"{count} {unit}{'' if count == 1 else 's'}"
    raise AssertionError("unreachable")


def closing_outcome(retention: float, grace: float, now: float) -> dict:
    """
    What happens to a session's work when its last tab closes, told to the
    page (the C{connected} frame's C{on_close}) and the API: with a
    retention, C{{"outcome": "kept", "after": grace, "until": when}}; without,
    C{{"outcome": "removed", "after": grace}}.
    """
    if retention > 0:
        return {"outcome": "kept", "after": grace, "until": now + grace + retention}
    return {"outcome": "removed", "after": grace}
