"""
Client addresses, without a request: parsing an address, whether it is one
of the trusted proxies, and which address of an C{X-Forwarded-For} chain
is the client's.

Reading those from a request (the socket's peer, the header's values) is
L{capsule.web.http}'s; L{straight_from_loopback} is the one rule of what
came from this machine itself (the admin API and C{/metrics} ask it).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from twisted.internet.address import UNIXAddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> Address | None:
    """
    The address C{text} names (an IPv6 one may be in brackets), or C{None}.
    A dual-stack listener sees IPv4 clients as C{::ffff:a.b.c.d}: that is
    the IPv4 address.
    """
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def is_loopback(text: str) -> bool:
    """
    Whether C{text} is a loopback address (C{::ffff:127.0.0.1} too).
    """
    address = parse_ip(text)
    return address is not None and address.is_loopback


# One IPv6 client (a home, a phone, a cloud machine) is given a /64 to pick
# addresses from as it likes: its limits count the /64, not an address.
IPV6_CLIENT_PREFIX = 64


def client_key(address: str) -> str:
    """
    The client an C{address} counts as in per-client limits and rates: an
    IPv4 address itself, the /64 of an IPv6 one (C{2001:db8::/64}), as text.
    What is not an address counts as itself.
    """
    ip = parse_ip(address)
    if ip is None:
        return address
    if ip.version == 4:
        return str(ip)
    return str(ipaddress.ip_network((ip, IPV6_CLIENT_PREFIX), strict=False))
# Headers a proxy adds: a request that carries one came through a proxy, even
# from loopback (a proxy on this machine), and is not someone at the machine.
FORWARDING_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")


def straight_from_loopback(request) -> bool:
    """
    Whether a C{twisted.web} request came straight from this machine: its
    socket's peer is a loopback address or a UNIX socket, and it carries
    none of the L{FORWARDING_HEADERS}.
    """
    if any(request.requestHeaders.hasHeader(name) for name in FORWARDING_HEADERS):
        return False
    peer = request.getClientAddress()
    if isinstance(peer, UNIXAddress):
        return True
    return is_loopback(getattr(peer, "host", "") or "")


def is_trusted(address: Address | None, trusted: Iterable[Network]) -> bool:
    """
    Whether C{address} is in one of the C{trusted} networks.
    """
    return address is not None and any(
        address.version == net.version and address in net for net in trusted)


def overlapping(ranges: Iterable[Network], networks: Iterable[Network]
                ) -> list[tuple[Network, Network]]:
    """
    The pairs of a range of C{ranges} and a network of C{networks} that
    share addresses.
    """
    networks = tuple(networks)
    return [(r, n) for r in ranges for n in networks
            if r.version == n.version and r.overlaps(n)]


def split_forwarded_for(values: Iterable[str]) -> list[str]:
    """
    The entries of C{X-Forwarded-For} headers (each a comma-separated
    list), in order.
    """
    return [item.strip() for value in values for item in value.split(",")]


def client_behind(peer: str | None, forwarded_for: Iterable[str],
                  trusted: Iterable[Network] = ()) -> str:
    """
    The address of the client: the socket's C{peer}, or, when that peer is
    one of the C{trusted} proxies, the rightmost address of its
    C{forwarded_for} chain (the entries of its C{X-Forwarded-For}) that is
    not a trusted proxy (the leftmost, if all are).  Entries to the left of
    one that is not an address are ignored: only a trusted proxy's word
    counts.
    """
    trusted = tuple(trusted)
    host = peer or "unknown"
    current = parse_ip(host)
    if not is_trusted(current, trusted):
        return str(current) if current is not None else host
    for item in reversed(list(forwarded_for)):
        address = parse_ip(item)
        if address is None:
            break
        current = address
        if not is_trusted(address, trusted):
            break
    return str(current)
