"""
Who owns which session, kept across restarts: a small JSON file,
C{{session_id: user}}, written atomically (a temporary file renamed over
it) each time a session is made for a user, with the live sessions only.
At start, L{SessionManager.recover} gives each session it finds back to the
user the file names; a session the file does not name belongs to nobody,
and no user can reach it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from twisted.logger import Logger

from capsule.sessions.observers import SessionObserver

_log = Logger()


def default_state_dir() -> str:
    """
    C{/var/lib/capsule} for root, else C{$XDG_STATE_HOME/capsule}
    (C{~/.local/state/capsule}).
    """
    if os.geteuid() == 0:
        return "/var/lib/capsule"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "capsule")



def write_json(path: Path, value) -> None:
    """
    Write C{value} as JSON to C{path} (a state file) whole or not at all:
    a temporary file beside it, synced, then renamed over it; its folder is
    made (0700) if missing.  Raise C{OSError}.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise

class OwnerFile(SessionObserver):
    """
    The owners of one capsule instance's sessions, in
    C{DIRECTORY/owners-INSTANCE.json}.
    """

    def __init__(self, directory: str, instance: str) -> None:
        self.path = Path(directory) / f"owners-{instance}.json"
        self._owners: dict[str, str] = {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as e:
            _log.error("cannot read the sessions' owners from {path}: {error}; sessions"
                       " found at start belong to nobody", path=str(self.path), error=e)
            data = {}
        if isinstance(data, dict):
            self._owners = {k: v for k, v in data.items()
                            if isinstance(k, str) and isinstance(v, str)}

    def get(self, session_id: str) -> str | None:
        return self._owners.get(session_id)

    def save(self, sessions) -> None:
        """
        Keep the owners of C{sessions} (live sessions by id), and only them.
        """
        self._write({session_id: session.core.user for session_id, session in sessions.items()
                     if session.core.user is not None})

    # -- ISessionObserver ------------------------------------------------

    def session_opened(self, session) -> None:
        user = session.core.user
        if user is not None and self._owners.get(session.id) != user:
            self._write({**self._owners, session.id: user})

    def session_ended(self, session) -> None:
        if session.id in self._owners:
            self._write({k: v for k, v in self._owners.items() if k != session.id})

    def _write(self, owners: dict[str, str]) -> None:
        if owners == self._owners and self.path.exists():
            return
        try:
            write_json(self.path, owners)
        except OSError as e:
            _log.error("cannot write the sessions' owners to {path}: {error}",
                       path=str(self.path), error=e)
            return
        self._owners = owners
