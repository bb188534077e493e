"""
The files that say who the users are, read again when they change: an
htpasswd file of bcrypt hashes (what C{htpasswd -B} writes) and a tokens
file (C{user:token} lines).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
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


# bcrypt's cost for the passwords capsule writes (2**12 rounds: about a
# quarter of a second per check, on the password threads); what it accepts.
BCRYPT_COST = 12
BCRYPT_COSTS = range(10, 17)
# bcrypt reads the first 72 bytes of a password and ignores the rest.
MAX_PASSWORD_BYTES = 72


def hash_password(password: str, cost: int = BCRYPT_COST) -> str:
    """
    A bcrypt hash of C{password}, as an htpasswd line holds it.
    """
    import bcrypt
    data = password.encode("utf-8")
    if not data:
        raise ValueError("the password is empty")
    if len(data) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes"
                         " (bcrypt would ignore the rest)")
    if cost not in BCRYPT_COSTS:
        raise ValueError(f"the cost must be {BCRYPT_COSTS[0]} to {BCRYPT_COSTS[-1]}, not {cost}")
    return bcrypt.hashpw(data, bcrypt.gensalt(cost)).decode("ascii")


def set_htpasswd_user(path: str, name: str, hashed: str | None) -> str:
    """
    Give C{name} the hash C{hashed} in the htpasswd file C{path} (made if
    missing), or remove them (C{hashed=None}); every other line is kept as it
    was.  The file is replaced at once (written beside it, then renamed),
    so that a capsule reading it sees the old file or the new one, never a
    part.  A new file is made with mode 0600; an existing one keeps its
    mode, owner and group (capsule may read it through its group).
    Returns what was done: C{"added"}, C{"changed"} or C{"removed"}.
    """
    if not valid_user_name(name):
        raise ValueError(f"{name!r} is not a valid user name (up to 64 characters of"
                         " A-Z a-z 0-9 . _ @ + -)")
    try:
        text = Path(path).read_text(encoding="utf-8")
        st = os.stat(path)
    except FileNotFoundError:
        text, st = "", None
    lines, found = [], False
    for line in text.splitlines():
        if line.strip().partition(":")[0] == name and ":" in line:
            if hashed is not None and not found:
                lines.append(f"{name}:{hashed}")
            found = True
            continue
        lines.append(line)
    if hashed is None and not found:
        raise LookupError(f"{path} has no user {name}")
    if hashed is not None and not found:
        lines.append(f"{name}:{hashed}")
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".htpasswd-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        if st is None:
            os.chmod(temporary, 0o600)
        else:
            os.chmod(temporary, stat.S_IMODE(st.st_mode))
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.chown(temporary, st.st_uid, st.st_gid)
                except PermissionError:
                    raise PermissionError(
                        f"cannot give the new {path} its owner and group"
                        f" ({st.st_uid}:{st.st_gid}): run this as root or as its owner") from None
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return "removed" if hashed is None else "changed" if found else "added"
