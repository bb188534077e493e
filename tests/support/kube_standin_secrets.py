"""
The stand-in API server's Secrets (L{tests.support.kube_standin}): a core/v1
Secret as the API server stores it, and a pod's C{env} as the kubelet
resolves it (C{valueFrom.secretKeyRef}) when it makes the pod's container.
"""

from __future__ import annotations

import base64
import binascii
import re

from tests.support.kube_standin_coord import Refusal

# The API server's limit on a Secret's data, and what a key may be.
MAX_BYTES = 1024 * 1024
_KEY = re.compile(r"[-._a-zA-Z0-9]+\Z")
_KEY_MESSAGE = ("a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
                " (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation"
                " is '[-._a-zA-Z0-9]+')")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")


def _decode(key: str, value) -> bytes:
    """
    A C{data} value as the API server decodes it (standard base64, padded),
    or the 400 it answers.
    """
    where = 'Secret in version "v1" cannot be handled as a Secret: '
    if not isinstance(value, str):
        raise Refusal(400, "BadRequest", where + f"data[{key}]: expected a base64 string", {})
    bad = next((i for i, ch in enumerate(value) if ch not in
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="), None)
    if bad is None and (not _BASE64.match(value) or len(value) % 4):
        bad = len(value) - len(value) % 4 if len(value) % 4 else value.index("=")
    if bad is not None:
        raise Refusal(400, "BadRequest", where + f"illegal base64 data at input byte {bad}", {})
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise Refusal(400, "BadRequest", where + "illegal base64 data at input byte 0",
                      {}) from None


def stored_secret(name: str, body: dict) -> tuple[dict, list[tuple[str, str, str]]]:
    """
    The Secret C{body} as stored: C{stringData} merged into C{data} (base64)
    and dropped, C{type} C{Opaque} by default; and the validation's causes
    (keys, size) for a 422.

    @raise Refusal: 400, a C{data} value that is not base64.
    """
    data = body.get("data") or {}
    strings = body.get("stringData") or {}
    if not isinstance(data, dict) or not isinstance(strings, dict):
        raise Refusal(400, "BadRequest", 'Secret in version "v1" cannot be handled as a'
                      " Secret: data and stringData must be maps", {})
    decoded = {str(k): _decode(str(k), v) for k, v in data.items()}
    for key, value in strings.items():
        if not isinstance(value, str):
            raise Refusal(400, "BadRequest", 'Secret in version "v1" cannot be handled as a'
                          f" Secret: stringData[{key}]: expected a string", {})
        decoded[str(key)] = value.encode("utf-8")
    causes = [(f"data[{key}]", key, _KEY_MESSAGE) for key in decoded if not _KEY.match(key)]
    if sum(len(k) + len(v) for k, v in decoded.items()) > MAX_BYTES:
        causes.append(("data", "", f"Too long: must have at most {MAX_BYTES} bytes"))
    secret = {k: v for k, v in body.items() if k not in ("stringData", "data")}
    secret["type"] = body.get("type") or "Opaque"
    secret["data"] = {k: base64.b64encode(v).decode("ascii") for k, v in decoded.items()}
    return secret, causes


def resolved_env(env: list, namespace: str, get_secret) -> tuple[dict, dict | None]:
    """
    A container's C{env} as the kubelet resolves it: C{{name: value}}, or
    the waiting state of a container it cannot make
    (C{CreateContainerConfigError} with the kubelet's message: a Secret or
    a key missing, but C{optional}).

    @param get_secret: C{(namespace, name)} -> the stored Secret, or C{None}.
    """
    answer: dict[str, str] = {}
    for entry in env or []:
        if "name" not in entry:
            continue
        source = entry.get("valueFrom")
        if not source:
            answer[entry["name"]] = entry.get("value", "")
            continue
        ref = source.get("secretKeyRef")
        if ref is None:
            return {}, {"reason": "CreateContainerConfigError", "message": (
                f"the stand-in resolves no {', '.join(sorted(source))} (only secretKeyRef)")}
        optional = bool(ref.get("optional"))
        secret = get_secret(namespace, ref.get("name") or "")
        if secret is None:
            if optional:
                continue
            return {}, {"reason": "CreateContainerConfigError",
                        "message": f'secret "{ref.get("name")}" not found'}
        data = secret.get("data") or {}
        if ref.get("key") not in data:
            if optional:
                continue
            return {}, {"reason": "CreateContainerConfigError", "message": (
                f"couldn't find key {ref.get('key')} in Secret"
                f" {namespace}/{ref.get('name')}")}
        answer[entry["name"]] = base64.b64decode(data[ref["key"]]).decode("utf-8", "replace")
    return answer, None
