"""
The files that say who the users are, read again when they change: an
htpasswd file of bcrypt hashes (what C{htpasswd -B} writes) and a tokens
file (C{user:token} lines).
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.logger import Logger

from capsule.auth.users import valid_user_name

_log = Logger()


class WatchedFile:
    """
    A file parsed by C{parse} (text in, value out), parsed again on use when
    its modification time, size or inode changed.  A file that cannot be
    read or parsed keeps the last good value (logged once per change).
    """

    def __init__(self, path: str, parse) -> None:
        self.path = path
        self._parse = parse
        self._stamp = None
        self.value = None
        self.reload()
        if self.value is None:
            raise ValueError(f"cannot read {path}")

    def reload(self):
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._stamp != "missing":
                self._stamp = "missing"
                _log.error("cannot read {path}: {error}; keeping what it said before",
                           path=self.path, error=e.strerror)
            return self.value
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return self.value
        self._stamp = stamp
        try:
            text = Path(self.path).read_text(encoding="utf-8")
            value = self._parse(text, self.path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            _log.error("cannot read {path}: {error}; keeping what it said before",
                       path=self.path, error=e)
            return self.value
        first = self.value is None
        self.value = value
        _log.info("{verb} {path}: {count} entries", verb="read" if first else "read again",
                  path=self.path, count=len(value))
        return value


def _entries(text: str, path: str, what: str):
    """
    The C{user:value} lines of a file (blank lines and C{#} comments
    skipped; a line without a valid user name skipped with a warning).
    """
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep or not valid_user_name(name):
            _log.warn("{path} line {number}: not user:{what} with a valid user name; skipped",
                      path=path, number=number, what=what)
            continue
        yield name, value


def parse_htpasswd(text: str, path: str = "htpasswd") -> dict[str, bytes]:
    """
    C{user:hash} lines (bcrypt hashes only: C{$2y$}, C{$2b$}, C{$2a$}).
    Other hashes are skipped with a warning: they are too cheap to guess.
    """
    users = {}
    for name, hashed in _entries(text, path, "hash"):
        if not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            _log.warn("{path}: the password of {user} is not a bcrypt hash (make it with"
                      " htpasswd -B); skipped", path=path, user=name)
            continue
        users[name] = hashed.encode("ascii")
    return users


def parse_tokens(text: str, path: str = "tokens") -> dict[str, str]:
    """
    C{user:token} lines; returns user by token.  A token shorter than 16
    characters is skipped with a warning.
    """
    tokens = {}
    for name, token in _entries(text, path, "token"):
        if len(token) < 16:
            _log.warn("{path}: a token of {user} is shorter than 16 characters; skipped",
                      path=path, user=name)
            continue
        tokens[token] = name
    return tokens
