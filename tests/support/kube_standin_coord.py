"""
The stand-in Kubernetes API server's updates and quotas
(L{tests.support.kube_standin}): C{PUT} of a whole object and merge
C{PATCH} of an object's metadata, with the C{resourceVersion} as a
precondition, as the API server does optimistic concurrency; and the
ResourceQuota admission plugin's check of a pod's create.

The behaviours are listed in L{tests.support.kube_standin}'s docstring.
"""

from __future__ import annotations

import json

# What the stand-in's ResourceQuotas enforce (the quota plugin's names).
QUOTA_RESOURCES = ("pods", "limits.memory", "requests.memory", "limits.cpu", "requests.cpu")
# The short names the API server takes for the requests.
_ALIASES = {"memory": "requests.memory", "cpu": "requests.cpu"}
# What a merge PATCH may be sent as.
MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


class Refusal(Exception):
    """
    An answer the server gives as a C{Status}: the stand-in's L{ApiError}
    is made from it by the caller (this module does not import the
    stand-in).
    """

    def __init__(self, code: int, reason: str, message: str, details: dict) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details


def _resource(kind: str, plural: str, group: str) -> str:
    return plural if group == "api/v1" else f"{plural}.{group.split('/')[1]}"


def conflict(plural: str, group: str, name: str) -> Refusal:
    """
    The 409 an update gets when its C{resourceVersion} is not the object's.
    """
    return Refusal(409, "Conflict", (
        f'Operation cannot be fulfilled on {_resource("", plural, group)} "{name}": the object'
        " has been modified; please apply your changes to the latest version and try again"),
        {"name": name, "group": "" if group == "api/v1" else group.split("/")[1],
         "kind": plural})


def merge(target, patch):
    """
    RFC 7386 JSON merge patch: C{patch} applied to C{target} (a C{None}
    value removes a key).
    """
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


def replaced(current: dict, body: dict, plural: str, group: str) -> dict:
    """
    The object a C{PUT} of C{body} makes of C{current}: the body's C{spec}
    and its labels and annotations, what the server owns (C{uid},
    C{creationTimestamp}, the name and namespace) kept.

    @raise Refusal: 409 when the body's C{resourceVersion} is not the
        object's, 400 when its name is another.
    """
    metadata = body.get("metadata") or {}
    name = current["metadata"]["name"]
    if metadata.get("name") not in (None, name):
        raise Refusal(400, "BadRequest", "the name of the object"
                      f" ({metadata.get('name')}) does not match the name on the URL ({name})",
                      {})
    version = metadata.get("resourceVersion")
    if version and version != current["metadata"]["resourceVersion"]:
        raise conflict(plural, group, name)
    obj = json.loads(json.dumps(current))
    for key in ("labels", "annotations"):
        if key in metadata:
            obj["metadata"][key] = dict(metadata.get(key) or {})
    if "spec" in body:
        obj["spec"] = body.get("spec") or {}
    return obj


def patched(current: dict, patch, content_type: str, plural: str, group: str) -> dict:
    """
    The object a merge C{PATCH} makes of C{current}.  A pod's spec cannot
    change (the fields a pod's update may change are not reproduced); its
    status is the kubelet's.

    @raise Refusal: 415 for another kind of patch, 400 for a body that is
        not an object, 409 when the patch's C{metadata.resourceVersion} is
        not the object's, 422 for a change to a pod's spec.
    """
    name = current["metadata"]["name"]
    if content_type.split(";")[0].strip() not in MERGE_TYPES:
        raise Refusal(415, "UnsupportedMediaType", (
            f"the body of the request was in an unknown format - accepted media types include:"
            f" {', '.join(MERGE_TYPES)}"), {})
    if not isinstance(patch, dict):
        raise Refusal(400, "BadRequest", "the body of the request was in an unknown format",
                      {})
    metadata = patch.get("metadata") or {}
    version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
    if version and version != current["metadata"]["resourceVersion"]:
        raise conflict(plural, group, name)
    obj = merge(json.loads(json.dumps(current)), {k: v for k, v in patch.items()
                                                  if k not in ("status", "kind",
                                                               "apiVersion")})
    for key in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion",
                "deletionTimestamp", "generateName"):
        if key in current["metadata"]:
            obj["metadata"][key] = current["metadata"][key]
        else:
            obj["metadata"].pop(key, None)
    if plural == "pods" and obj.get("spec") != current.get("spec"):
        raise Refusal(422, "Invalid", (
            f'Pod "{name}" is invalid: spec: Forbidden: pod updates may not change fields'
            " other than `spec.containers[*].image`, `spec.initContainers[*].image`,"
            " `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing"
            " tolerations), `spec.terminationGracePeriodSeconds` (allow it to be set to 1 if"
            " it was previously negative)"),
            {"name": name, "kind": "Pod", "causes": [
                {"reason": "FieldValueForbidden", "message": "Forbidden: pod updates may not"
                 " change fields other than ...", "field": "spec"}]})
    if "status" in current:
        obj["status"] = current["status"]
    return obj


# -- ResourceQuota ----------------------------------------------------------

def pod_usage(pod: dict, quantity) -> dict[str, float]:
    """
    What a pod counts against a quota: one pod, and the sum of its
    containers' requests and limits (a request not given is its limit, as
    the API server's defaulting makes it).
    """
    usage = {"pods": 1.0, "limits.memory": 0.0, "requests.memory": 0.0, "limits.cpu": 0.0,
             "requests.cpu": 0.0}
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        for what in ("memory", "cpu"):
            if what in limits:
                usage[f"limits.{what}"] += quantity(limits[what])
            if what in requests or what in limits:
                usage[f"requests.{what}"] += quantity(requests.get(what, limits.get(what)))
    return usage


def _specified(pod: dict, resource: str) -> bool:
    if resource == "pods":
        return True
    kind, _, what = resource.partition(".")
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        given = resources.get(kind) or {}
        if what not in given and not (kind == "requests" and what in (
                resources.get("limits") or {})):
            return False
    return True


def hard_of(quota: dict) -> dict[str, str]:
    """
    A quota's C{spec.hard}, the short names (C{memory}, C{cpu}) as the
    requests they stand for.
    """
    return {_ALIASES.get(k, k): v for k, v in ((quota.get("spec") or {}).get("hard")
                                                 or {}).items()}


def show(resource: str, value: float) -> str:
    """
    A quantity as the API server prints it: memory in the largest binary
    unit that holds it whole, CPU in cores or millicores.
    """
    if resource == "pods":
        return str(int(value))
    if resource.endswith(".cpu"):
        milli = round(value * 1000)
        return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"
    whole = int(round(value))
    for suffix, size in (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30),
                         ("Mi", 2**20), ("Ki", 2**10)):
        if whole and whole % size == 0:
            return f"{whole // size}{suffix}"
    return str(whole)


def _pretty(values: dict[str, float]) -> str:
    return ",".join(f"{k}={show(k, v)}" for k, v in sorted(values.items()))


def counted(pods: list[dict]) -> list[dict]:
    """
    The pods a quota counts: those not over (a pod C{Succeeded} or
    C{Failed} no longer holds its resources).
    """
    return [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded",
                                                                              "Failed")]


def used(pods: list[dict], quantity) -> dict[str, float]:
    total: dict[str, float] = {}
    for pod in counted(pods):
        for k, v in pod_usage(pod, quantity).items():
            total[k] = total.get(k, 0.0) + v
    return total


def quota_status(quota: dict, pods: list[dict], quantity) -> dict:
    """
    A quota's C{status} (C{hard}, C{used}) as the quota controller keeps it.
    """
    hard = hard_of(quota)
    total = used(pods, quantity)
    return {"hard": dict(hard), "used": {k: show(k, total.get(k, 0.0)) for k in hard}}


def admit(name: str, pod: dict, quotas: list[dict], pods: list[dict], quantity) -> None:
    """
    The ResourceQuota admission of a pod's create: refused (403) when a
    quota of its namespace would be exceeded, or when a quota limits a
    resource the pod does not say.

    @raise Refusal: 403 C{Forbidden} with the API server's message.
    """
    asked = pod_usage(pod, quantity)
    total = used(pods, quantity)
    for quota in sorted(quotas, key=lambda q: q["metadata"]["name"]):
        quota_name = quota["metadata"]["name"]
        hard = {k: quantity(v) for k, v in hard_of(quota).items() if k in QUOTA_RESOURCES}
        missing = sorted(k for k in hard if not _specified(pod, k))
        if missing:
            raise Refusal(403, "Forbidden", (
                f'pods "{name}" is forbidden: failed quota: {quota_name}: must specify'
                f' {",".join(missing)}'), {"name": name, "kind": "pods"})
        over = [k for k, limit in hard.items()
                if asked.get(k, 0.0) and total.get(k, 0.0) + asked[k] > limit + 1e-9]
        if over:
            raise Refusal(403, "Forbidden", (
                f'pods "{name}" is forbidden: exceeded quota: {quota_name},'
                f" requested: {_pretty({k: asked[k] for k in over})},"
                f" used: {_pretty({k: total.get(k, 0.0) for k in over})},"
                f" limited: {_pretty({k: hard[k] for k in over})}"),
                {"name": name, "kind": "pods"})
