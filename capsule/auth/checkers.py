"""
Twisted cred checkers, one per kind of credential:

 - L{HtpasswdChecker}: user names and passwords from an htpasswd file of
   bcrypt hashes, checked on a few threads of their own
   (L{AuthThreadPool}): bcrypt takes a while by design;
 - L{TokenChecker}: C{Authorization: Bearer} API tokens from a tokens file;
 - L{ProxyUserChecker}: a user named by an authenticating proxy's header,
   which L{capsule.auth.gate.Authenticator} believes from a trusted proxy
   only.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict

from twisted.application.service import Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from capsule.auth.stores import WatchedFile, parse_htpasswd, parse_tokens
from capsule.auth.users import IBearerToken, IProxyUser, valid_user_name


def _bcrypt_check(password: bytes, hashed: bytes) -> bool:
    import bcrypt
    # htpasswd writes $2y$, which bcrypt reads as $2b$ (the same algorithm).
    if hashed.startswith(b"$2y$"):
        hashed = b"$2b$" + hashed[4:]
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


@implementer(ICredentialsChecker)
class HtpasswdChecker:
    """
    Passwords from an htpasswd file of bcrypt hashes, checked on
    C{run_blocking} (a thread pool: bcrypt takes a while by design).
    """

    credentialInterfaces = (IUsernamePassword,)
    # Passwords found right lately, so that a program sending Basic with
    # every request does not pay bcrypt each time: (user, HMAC of the
    # password under a key of this process) to the hash it matched.
    CACHE_SIZE = 256

    def __init__(self, path: str, run_blocking=None) -> None:
        self.file = WatchedFile(path, parse_htpasswd)
        self._run = run_blocking or (lambda f, *a: succeed(f(*a)))
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    def requestAvatarId(self, credentials) -> Deferred:
        users = self.file.reload()
        name = credentials.username
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        hashed = users.get(name)
        key = (name, hmac.digest(self._key, password, "sha256"))
        if hashed is not None and self._verified.get(key) == hashed:
            self._verified.move_to_end(key)
            return succeed(name)
        # An unknown user's password is checked against a known user's hash
        # (it cannot match: the user is unknown), so that it takes as long
        # and the answer's time does not tell which names exist.
        against = hashed or next(iter(users.values()), None)
        if against is None:
            return fail(UnauthorizedLogin("wrong user name or password"))
        d = self._run(_bcrypt_check, password, against)

        def checked(ok):
            if ok and hashed is not None:
                self._verified[key] = hashed
                while len(self._verified) > self.CACHE_SIZE:
                    self._verified.popitem(last=False)
                return name
            raise UnauthorizedLogin("wrong user name or password")
        return d.addCallback(checked)


@implementer(ICredentialsChecker)
class TokenChecker:
    credentialInterfaces = (IBearerToken,)

    def __init__(self, path: str) -> None:
        self.file = WatchedFile(path, parse_tokens)

    def requestAvatarId(self, credentials) -> Deferred:
        given = credentials.token.encode("utf-8")
        found = None
        # Every token compared, in constant time each.
        for token, name in self.file.reload().items():
            if hmac.compare_digest(given, token.encode("utf-8")):
                found = name
        if found is None:
            return fail(UnauthorizedLogin("unknown token"))
        return succeed(found)


@implementer(ICredentialsChecker)
class ProxyUserChecker:
    """
    The proxy said who it is: L{capsule.auth.gate.Authenticator} only makes
    a L{capsule.auth.users.ProxyUser} for a request from a trusted proxy.
    """

    credentialInterfaces = (IProxyUser,)

    def requestAvatarId(self, credentials) -> Deferred:
        if not valid_user_name(credentials.name):
            return fail(UnauthorizedLogin("not a user name"))
        return succeed(credentials.name)


class AuthThreadPool(Service):
    """
    A few threads for bcrypt, started and stopped with the server.
    """

    def __init__(self, reactor, threads: int = 2) -> None:
        self._reactor = reactor
        self.pool = ThreadPool(0, threads, "capsule-auth")

    def run(self, f, *args) -> Deferred:
        return deferToThreadPool(self._reactor, self.pool, f, *args)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()
