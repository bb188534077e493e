"""
The records of kept sessions (L{capsule.sessions.keeping}): what the engine
does not carry of them (why a session was put away, and whose it is), in a
small JSON state file beside the owners', written atomically.  (Where the
engine keeps a record with the session too, L{capsule.sessions.keeping}
reads it when this file has none.)
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.logger import Logger

from capsule.sessions.owners import write_json

_log = Logger()


class KeptRecords:
    """
    What the engine does not carry of kept sessions: C{{session_id: {"user",
    "reason", "kept_at"}}} in C{DIRECTORY/kept-INSTANCE.json}, written
    atomically; C{directory} C{None}: in memory only.
    """

    def __init__(self, directory: str | None, instance: str) -> None:
        self.path = None if directory is None else Path(directory) / f"kept-{instance}.json"
        self._records: dict[str, dict] = {}
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as e:
            _log.error("cannot read the records of kept sessions from {path}: {error}; kept"
                       " sessions found at start belong to nobody", path=str(self.path),
                       error=e)
            data = {}
        if isinstance(data, dict):
            self._records = {k: v for k, v in data.items()
                             if isinstance(k, str) and isinstance(v, dict)}

    def get(self, session_id: str) -> dict | None:
        return self._records.get(session_id)

    def taken(self, session_id: str, user: str | None) -> None:
        """
        A warm session was taken: a live one's record (no reason yet).
        """
        self._write({**self._records, session_id: {"user": user, "reason": None}})

    def put(self, session_id: str, user: str | None, reason: str, kept_at: float) -> None:
        self._write({**self._records, session_id: {"user": user, "reason": reason,
                                                   "kept_at": kept_at}})

    def drop(self, session_id: str) -> None:
        if session_id in self._records:
            self._write({k: v for k, v in self._records.items() if k != session_id})

    def keep_only(self, session_ids) -> None:
        ids = set(session_ids)
        self._write({k: v for k, v in self._records.items() if k in ids})

    def _write(self, records: dict[str, dict]) -> None:
        if records == self._records and (self.path is None or self.path.exists()
                                         or not records):
            return     # (no file is made to say there is nothing)
        if self.path is not None:
            try:
                write_json(self.path, records)
            except OSError as e:
                _log.error("cannot write the records of kept sessions to {path}: {error}",
                           path=str(self.path), error=e)
        self._records = records
