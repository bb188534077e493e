"""
Placeholders: what a session holds instead of a key.

A session whose profile names brokered credentials (C{credentials =
["anthropic", ...]}) gets, in its environment, a placeholder token instead of
the real key; the credential gateway (L{capsule.gateway.anthropic}, the git
gateway) takes the placeholder, finds the session it belongs to, and puts the
real key (capsule's environment or C{--secrets-file}: L{Keys}) on the
request on its way out.  The key never enters a container.

The store's API, for every gateway that checks placeholders::

    store = PlaceholderStore(key, live)
    token = store.issue(session_id)      # when the session's container is made
    store.session_for(token)             # -> session id, or None (forged, ended)
    store.forget(session_id)             # the session ended (done as an observer)

A placeholder is C{HMAC-SHA256(key, session id)}, so the same session gets
the same placeholder again after capsule restarts (its container, found again
by recovery, keeps its environment) as long as the key is kept
(L{load_key}: a file in capsule's state directory, or C{CAPSULE_GATEWAY_KEY}
in capsule's environment, which replicas on a cluster share).  It is never the key
and says nothing of it.  A placeholder answers only while its session lives
(C{live(session_id)}); once the session ends it is forgotten and refused.
Checks compare in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Callable, Iterable, Mapping

from twisted.logger import Logger

from capsule.core.profiles import CREDENTIALS
from capsule.sessions.observers import SessionObserver

_log = Logger()

PREFIX = "capsule-"
# What a placeholder may be at most, read from a request: anything longer is
# not one (and is not hashed).
MAX_PLACEHOLDER = 128
KEY_BYTES = 32
# The key given in capsule's environment (hex, KEY_BYTES bytes or more):
# replicas of one capsule share it, as they share its sessions.
KEY_ENV = "CAPSULE_GATEWAY_KEY"


def parse_key(text: str) -> bytes:
    """
    The key C{text} (C{CAPSULE_GATEWAY_KEY}) gives: hex digits of at least
    L{KEY_BYTES} bytes.  Raise C{ValueError} saying what is wrong.
    """
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"{KEY_ENV} must be hex digits (e.g. openssl rand -hex"
                         f" {KEY_BYTES})") from None
    if len(key) < KEY_BYTES:
        raise ValueError(f"{KEY_ENV} holds {len(key)} bytes: it needs {KEY_BYTES} or more"
                         f" (openssl rand -hex {KEY_BYTES})")
    return key[:KEY_BYTES]


def load_key(directory: str | None, instance: str, environ=os.environ) -> bytes:
    """
    The placeholders' key: C{CAPSULE_GATEWAY_KEY} where C{environ} has it
    (checked at start, L{parse_key}), else kept in
    C{DIRECTORY/gateway-key-INSTANCE} (made on first use, mode 600) so that
    sessions found again after a restart keep their placeholders.  Without a
    directory, or when it cannot be read or written, a key for this run only
    (logged: sessions of an earlier run then lose the gateway).
    """
    if environ.get(KEY_ENV):
        return parse_key(environ[KEY_ENV])
    if directory is not None:
        path = Path(directory) / f"gateway-key-{instance}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                data = path.read_bytes()
                if len(data) >= KEY_BYTES:
                    return data[:KEY_BYTES]
                _log.warn("{path} is not a gateway key (too short): a new one is made",
                          path=str(path))
                path.unlink()
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            key = secrets.token_bytes(KEY_BYTES)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
                f.flush()
                os.fsync(f.fileno())
            return key
        except OSError as e:
            _log.warn("cannot keep the gateway's key in {path}: {error}; sessions found again"
                      " after a restart will have placeholders capsule no longer knows",
                      path=str(path), error=e.strerror or str(e))
    return secrets.token_bytes(KEY_BYTES)


class PlaceholderStore(SessionObserver):
    """
    The placeholders of the live sessions (see the module's docstring).

    @param key: the secret placeholders are derived with (L{load_key}), or
        a callable that returns it, called once, when a placeholder is first
        needed (a server none of whose sessions has one writes no key).
    @param live: C{live()} is the ids of the sessions that exist now (the
        manager's C{sessions}): a placeholder answers only for them.
    """

    def __init__(self, key: bytes | Callable[[], bytes],
                 live: Callable[[], Iterable[str]]) -> None:
        self._key = key
        self._live = live
        self._by_token: dict[str, str] = {}
        self._by_session: dict[str, str] = {}

    def _derive(self, session_id: str) -> str:
        if callable(self._key):
            self._key = self._key()
        mac = hmac.new(self._key, session_id.encode("utf-8"), hashlib.sha256).digest()
        return PREFIX + base64.urlsafe_b64encode(mac).decode("ascii").rstrip("=")

    def issue(self, session_id: str) -> str:
        """
        The placeholder of session C{session_id} (the same each time).
        """
        token = self._by_session.get(session_id)
        if token is None:
            token = self._derive(session_id)
            self._by_session[session_id] = token
            self._by_token[token] = session_id
        return token

    def session_for(self, token) -> str | None:
        """
        The id of the live session whose placeholder C{token} is, else
        C{None} (forged, of an ended session, not a string).
        """
        if not isinstance(token, str) or not token.startswith(PREFIX) \
                or len(token) > MAX_PLACEHOLDER:
            return None
        live = self._live()
        session_id = self._by_token.get(token)
        if session_id is None:
            # Sessions of an earlier run (found again after a restart) are
            # not issued again: learn theirs once.
            for unknown in [i for i in live if i not in self._by_session]:
                self.issue(unknown)
            session_id = self._by_token.get(token)
        if session_id is None or session_id not in live:
            return None
        if not hmac.compare_digest(self._derive(session_id).encode("ascii"),
                                   token.encode("ascii", "replace")):
            return None
        return session_id

    def forget(self, session_id: str) -> None:
        """
        Session C{session_id} ended: its placeholder answers no more.
        """
        token = self._by_session.pop(session_id, None)
        if token is not None:
            self._by_token.pop(token, None)

    def __len__(self) -> int:
        return len(self._by_session)

    # (ISessionObserver)

    def session_ended(self, session) -> None:
        self.forget(session.id)


class Keys:
    """
    The real keys of the brokered credentials, by credential name
    (C{"anthropic"}, C{"github"}), from capsule's environment or its
    secrets file.  Never shown: its repr names only which are present.
    """

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = {name: value for name, value in values.items() if value}

    @classmethod
    def from_secrets(cls, secrets_values: Mapping[str, str]) -> "Keys":
        """
        The keys among C{secrets_values} (variables by name: L{CREDENTIALS}
        says which variable holds each credential).
        """
        return cls({name: secrets_values.get(variable, "")
                    for name, variable in CREDENTIALS.items()})

    def get(self, name: str) -> str | None:
        return self._values.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def __repr__(self) -> str:
        return f"<Keys {', '.join(sorted(self._values)) or 'none'}>"
