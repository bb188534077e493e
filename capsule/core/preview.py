"""
Where a session's port is seen: the addresses of previews.

A port listening in a session is reached through capsule at a path of its
main site, C{/preview/<session id>/<port>/}, or, when the operator gives a
wildcard domain (C{--preview-domain preview.example}), at its own host name,
C{<port>-<session id>.preview.example}: a separate origin, which apps that
build absolute paths need and which keeps the previewed app away from
capsule's cookies.

Pure: no reactor, no Docker.
"""

from __future__ import annotations

import re

PREVIEW_PREFIX = b"preview"
# Ports a preview may name (1-65535, no leading zeros).
_PORT = r"[1-9][0-9]{0,4}"
_SESSION = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_LABEL = re.compile(rf"({_PORT})-({_SESSION})\Z")


def valid_port(port: int) -> bool:
    """
    Whether C{port} is a TCP port number (1-65535).
    """
    return isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535


def preview_path(session_id: str, port: int) -> str:
    """
    The path of a port's preview on capsule's own site, with its trailing
    slash.
    """
    return f"/preview/{session_id}/{port}/"


def preview_host(session_id: str, port: int, domain: str) -> str:
    """
    The host name of a port's preview under the wildcard domain C{domain}.
    """
    return f"{port}-{session_id}.{domain.strip('.').lower()}"


def parse_preview_host(host: str, domain: str) -> tuple[str, int] | None:
    """
    C{(session id, port)} for a host name under the preview domain (a
    C{Host} header's value, with or without its port), or C{None} when
    C{host} is not a preview's.
    """
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.strip().rstrip(".").lower()
    suffix = "." + domain.strip(".").lower()
    if not name.endswith(suffix):
        return None
    match = _LABEL.match(name[: -len(suffix)])
    if match is None:
        return None
    port = int(match.group(1))
    return (match.group(2), port) if valid_port(port) else None


def preview_url(session_id: str, port: int, *, base: str, domain: str | None = None,
                scheme: str = "https") -> str:
    """
    The address a user opens for a port: under the preview domain when
    there is one (with C{scheme}), else the path on capsule's own site at
    C{base} (its scheme, host and any prefix, without a trailing slash).
    """
    if domain:
        return f"{scheme}://{preview_host(session_id, port, domain)}/"
    return base.rstrip("/") + preview_path(session_id, port)
