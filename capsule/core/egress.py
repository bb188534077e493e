"""
Egress policies: where a profile's sessions may connect to, and which
addresses no session ever reaches.

A profile's C{egress} is C{"open"} (its sessions' network routes out, as
before), C{"none"} (no way out at all) or a list of host names, each exact
(C{pypi.org}) or a wildcard (C{*.github.com}: its subdomains, not itself).
Names are compared case-insensitively, after IDNA encoding and without a
trailing dot.  A session whose egress is not open is I{fenced}: it runs on
a network with no route out, and capsule's egress proxy (behind the session
door) is its one way out (L{capsule.gateway.egress}).

Whatever the policy, the proxy never connects to the addresses
L{refused_address} names (link-local and the cloud metadata service, the
private ranges, loopback, multicast, the unspecified and reserved ones, the
host's own) unless the operator allowed them (C{--egress-allow-address}).

Pure: no reactor, no sockets.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable

OPEN = "open"
NONE = "none"
ALLOWLIST = "list"

# The ports a fenced session may reach through the proxy, unless the
# operator adds others (--egress-port).
DEFAULT_PORTS = (80, 443)
# The most hosts one profile's list may hold.
MAX_HOSTS = 512

# What the built-in claude profile reaches: what an agent needs to work
# (package registries, GitHub, the Debian archive).  Anthropic's API is not
# here: sessions reach it through capsule's credential gateway, behind the
# session door.
AGENT_EGRESS = (
    # npm, yarn
    "registry.npmjs.org", "registry.yarnpkg.com",
    # Python packages
    "pypi.org", "files.pythonhosted.org",
    # GitHub: the site, its API, its raw files, releases and packages
    "github.com", "*.github.com", "*.githubusercontent.com", "ghcr.io",
    "codeload.github.com",
    # Go modules, Rust crates
    "proxy.golang.org", "sum.golang.org", "crates.io", "index.crates.io",
    "static.crates.io", "static.rust-lang.org",
    # Debian packages (the images are Debian's)
    "deb.debian.org", "security.debian.org",
)

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")

# Ranges refused whatever the policy, with what they are (the first that
# holds an address names it).
REFUSED_RANGES = tuple((ipaddress.ip_network(net), what) for net, what in (
    ("169.254.0.0/16", "a link-local address (the cloud metadata service is one)"),
    ("fe80::/10", "a link-local address"),
    ("10.0.0.0/8", "a private address"),
    ("172.16.0.0/12", "a private address"),
    ("192.168.0.0/16", "a private address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("fc00::/7", "a private (unique local) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("::1/128", "a loopback address"),
    ("0.0.0.0/8", "an unspecified address"),
    ("::/128", "an unspecified address"),
    ("224.0.0.0/4", "a multicast address"),
    ("ff00::/8", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
))


class EgressRefused(Exception):
    """
    A connection the egress policy refuses: C{reason} is a short code (for
    counting), C{str()} the sentence the session is told.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def normalise_host(name: str) -> str:
    """
    A host name as the policy compares it: lower case, IDNA (punycode)
    encoded, without a trailing dot; an IP address in its usual form
    (without brackets).

    @raise ValueError: for what is not a host name or an address.
    """
    if not isinstance(name, str):
        raise TypeError("must be a string")
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    text = text.rstrip(".") if text.endswith(".") and not text.endswith("..") else text
    if not text or len(text) > 253:
        raise ValueError(f"not a host name: {name[:100]!r}")
    try:
        encoded = text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"not a host name: {name[:100]!r}") from None
    labels = encoded.split(".")
    if len(encoded) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"not a host name: {name[:100]!r}")
    if labels[-1].isdigit() or labels[-1].startswith("0x"):
        # An address in a form resolvers read (127.000.0.1, 0x7f.1): no
        # top-level domain is a number.
        raise ValueError(f"not a host name nor an address in its usual form: {name[:100]!r}")
    return encoded


def _pattern(entry) -> str:
    if not isinstance(entry, str):
        raise TypeError('must be "open", "none" or a list of host names'
                        ' (["pypi.org", "*.github.com"])')
    if entry.startswith("*."):
        rest = normalise_host(entry[2:])
        try:
            ipaddress.ip_address(rest)
        except ValueError:
            pass
        else:
            raise ValueError(f"a wildcard names subdomains of a host name, not of an address:"
                             f" {entry!r}")
        if "." not in rest:
            raise ValueError(f"a wildcard must name a domain of two labels at least"
                             f" (*.example.com), got {entry!r}")
        return "*." + rest
    if "*" in entry:
        raise ValueError(f"a wildcard is a leading *. only (*.example.com), got {entry!r}")
    return normalise_host(entry)


@dataclass(frozen=True)
class EgressPolicy:
    """
    @ivar mode: L{OPEN}, L{NONE} or L{ALLOWLIST}.
    @ivar hosts: under L{ALLOWLIST}, the normalised names and wildcards.
    """

    mode: str = OPEN
    hosts: tuple[str, ...] = ()

    @property
    def fenced(self) -> bool:
        """
        Whether its sessions run fenced (on a network with no route out).
        """
        return self.mode != OPEN

    def allows(self, host: str) -> bool:
        """
        Whether the (normalised) C{host} is one the policy lets sessions
        reach: any under L{OPEN}, none under L{NONE}, those listed (a
        wildcard: its subdomains) under L{ALLOWLIST}.
        """
        if self.mode == OPEN:
            return True
        if self.mode == NONE:
            return False
        for pattern in self.hosts:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                    return True
            elif host == pattern:
                return True
        return False

    def setting(self) -> str:
        """
        The policy as a profiles file says it.
        """
        if self.mode != ALLOWLIST:
            return f'egress = "{self.mode}"'
        shown = ", ".join(f'"{h}"' for h in self.hosts[:4])
        return f"egress = [{shown}{', ...' if len(self.hosts) > 4 else ''}]"


OPEN_POLICY = EgressPolicy(OPEN)


def parse_egress(value) -> EgressPolicy:
    """
    A profile's C{egress} key: C{"open"}, C{"none"} or a list of host names.

    @raise TypeError, ValueError: saying why not.
    """
    if value == OPEN:
        return OPEN_POLICY
    if value == NONE:
        return EgressPolicy(NONE)
    if isinstance(value, str):
        raise ValueError(f'must be "open", "none" or a list of host names, got {value[:100]!r}')
    if not isinstance(value, list):
        raise TypeError('must be "open", "none" or a list of host names'
                        ' (["pypi.org", "*.github.com"])')
    if len(value) > MAX_HOSTS:
        raise ValueError(f"more than {MAX_HOSTS} hosts")
    return EgressPolicy(ALLOWLIST, tuple(dict.fromkeys(_pattern(v) for v in value)))


def embedded_ipv4(address):
    """
    The IPv4 address an IPv6 one carries (mapped ::ffff:a.b.c.d, NAT64
    64:ff9b::a.b.c.d, 6to4), or C{None}.
    """
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refused_address(address, allowed: Iterable = (), own: Iterable = ()) -> str | None:
    """
    Why the proxy never connects to C{address} (an C{ipaddress} address),
    or C{None} when it may: link-local, private, shared, loopback,
    unspecified, multicast, reserved and the host's own addresses (C{own})
    are refused, unless within a network the operator allowed
    (C{allowed}: C{ipaddress} networks).
    """
    if isinstance(address, str):
        address = ipaddress.ip_address(address)
    for network in allowed:
        if address.version == network.version and address in network:
            return None
    inner = embedded_ipv4(address)
    if inner is not None:
        why = refused_address(inner, allowed, own)
        if why is not None:
            return why
    for network, what in REFUSED_RANGES:
        if address.version == network.version and address in network:
            return what
    if address.is_multicast or address.is_unspecified or address.is_loopback:
        return "a local or multicast address"
    if address.version == 4 and address == ipaddress.IPv4Address("255.255.255.255"):
        return "a broadcast address"
    for own_address in own:
        if address == ipaddress.ip_address(own_address):
            return "an address of capsule's host"
    return None

