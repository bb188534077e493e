"""
Users and what names them: the realm whose avatars are L{User}s, and the
credentials that are not a password (an API token, a trusted proxy's word).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from twisted.cred.portal import IRealm
from zope.interface import Attribute, Interface, implementer

# What a user name may be: it goes into logs and the state file.
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}\Z")


def valid_user_name(name: str) -> bool:
    return bool(_USER_NAME.match(name))


def printable(name: str) -> str:
    """
    C{name} for a log line, if it is a valid user name.
    """
    return name if valid_user_name(name) else "(an invalid user name)"


class IUser(Interface):
    name = Attribute("The user's name.")


@implementer(IUser)
@dataclass(frozen=True)
class User:
    name: str


@implementer(IRealm)
class CapsuleRealm:
    """
    Every authenticated avatar id is a user of that name.
    """

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IUser not in interfaces:
            raise NotImplementedError("capsule's realm only knows IUser")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        return IUser, User(name), lambda: None


# -- credentials that are not a password -----------------------------------------


class IBearerToken(Interface):
    token = Attribute("The API token, as str.")


class IProxyUser(Interface):
    name = Attribute("The user a trusted proxy names.")


@implementer(IBearerToken)
@dataclass(frozen=True)
class BearerToken:
    token: str = field(repr=False)


@implementer(IProxyUser)
@dataclass(frozen=True)
class ProxyUser:
    name: str
