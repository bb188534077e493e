"""
The Kubernetes deploy files (deploy/kubernetes/), offline: each kustomization
rendered (by the small renderer here, for the part of Kustomize the files
use), every object validated against the Kubernetes JSON schemas that
kubernetes-validate bundles (no network), and held to what capsule's code
says: the NetworkPolicies are L{capsule.engine.kube_policies}'s, the Role
grants exactly the calls the engine makes, the Deployment runs capsule
non-root on a read-only root, everything of the sessions is in their
namespace.

Where a C{kubectl} with Kustomize 4 or later is on the PATH, its rendering
must equal this renderer's (Debian's kubernetes-client, 1.20, carries
Kustomize 2, which reads neither directories in C{resources} nor
C{patches}: it is not asked).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kube_schemas

from capsule.engine.kube_policies import (CAPSULE_POD_LABELS, RIGHTS, network_policies,
                                          role_rules)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = [DEPLOY, DEPLOY / "overlays" / "example"]
SESSIONS = "capsule-sessions"
# What lives in the session namespace, and what in capsule's.
SESSION_KINDS = {"Role", "RoleBinding", "NetworkPolicy", "ResourceQuota"}
KNOWN_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}


# -- a renderer for the part of Kustomize the files use -------------------------


def render(directory: Path) -> list[dict]:
    """
    The objects of the kustomization in C{directory}: C{resources} (files
    and kustomization directories), C{images} (name, newName, newTag) and
    C{patches} (strategic merge patches by C{path}).
    """
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_KEYS
    assert not unknown, f"{directory}: the test's renderer does not know {sorted(unknown)}"
    assert kustomization["kind"] == "Kustomization"
    objects: list[dict] = []
    for resource in kustomization.get("resources") or []:
        path = directory / resource
        if path.is_dir():
            objects += render(path)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    for patch in kustomization.get("patches") or []:
        assert set(patch) == {"path"}, f"{directory}: a patch the renderer does not know"
        change = yaml.safe_load((directory / patch["path"]).read_text())
        target = [o for o in objects if _key(o) == _key(change)]
        assert len(target) == 1, f"{directory}: the patch {patch['path']} matches no object"
        objects[objects.index(target[0])] = merge(target[0], change)
    for image in kustomization.get("images") or []:
        for obj in objects:
            for container in _containers(obj):
                name, tag = _split_image(container["image"])
                if name == image["name"]:
                    container["image"] = (f"{image.get('newName', name)}:"
                                          f"{image.get('newTag', tag)}")
    return objects


def _key(obj: dict) -> tuple:
    return (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])


def _split_image(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":")
    return (name, tag) if name and "/" not in tag else (image, "latest")


def _containers(obj: dict) -> list[dict]:
    spec = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def merge(base, change):
    """
    A strategic merge patch, as far as the files need it: maps merged,
    lists of named maps merged by name, other lists replaced.
    """
    if isinstance(base, dict) and isinstance(change, dict):
        merged = copy.deepcopy(base)
        for key, value in change.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if (isinstance(base, list) and isinstance(change, list) and change
            and all(isinstance(i, dict) and "name" in i for i in base + change)):
        merged = [copy.deepcopy(i) for i in base]
        names = [i["name"] for i in merged]
        for item in change:
            if item["name"] in names:
                at = names.index(item["name"])
                merged[at] = merge(merged[at], item)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(change)


def test_merge():
    base = {"a": {"b": 1, "c": [1, 2]}, "l": [{"name": "x", "v": 1}, {"name": "y"}]}
    change = {"a": {"c": [3]}, "l": [{"name": "x", "v": 2}, {"name": "z"}]}
    assert merge(base, change) == {"a": {"b": 1, "c": [3]},
                                   "l": [{"name": "x", "v": 2}, {"name": "y"}, {"name": "z"}]}
    assert base["l"][0]["v"] == 1


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def rendered(request):
    return render(request.param)


def _one(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


# -- the objects as Kubernetes takes them ----------------------------------------


def _versions() -> list[str]:
    versions = kube_schemas.all_versions()
    return sorted({versions[0], versions[-1]}, key=lambda v: tuple(map(int, v.split("."))))


@pytest.mark.parametrize("version", _versions())
def test_every_object_is_valid(rendered, version):
    """
    Every object against the schemas of the oldest and the newest
    Kubernetes kubernetes-validate knows, strictly (no unknown field).
    """
    assert rendered
    for obj in rendered:
        try:
            kube_schemas.validate(obj, version, strict=True)
        except kube_schemas.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}):"
                        f" {path}: {e.message}")


def test_names_are_unique(rendered):
    keys = [_key(o) for o in rendered]
    assert len(keys) == len(set(keys))


def test_every_object_is_in_its_namespace(rendered):
    deployment = _one(rendered, "Deployment", "capsule")
    own = deployment["metadata"]["namespace"]
    args = _container(deployment)["args"]
    assert args[args.index("--kube-namespace") + 1] == SESSIONS
    namespaces = {o["metadata"]["name"] for o in rendered if o["kind"] == "Namespace"}
    assert namespaces == {own, SESSIONS}
    for obj in rendered:
        if obj["kind"] == "Namespace":
            assert "namespace" not in obj["metadata"]
        elif obj["kind"] in SESSION_KINDS:
            assert obj["metadata"]["namespace"] == SESSIONS, _key(obj)
        else:
            assert obj["metadata"]["namespace"] == own, _key(obj)


def test_the_network_policies_are_the_engines(rendered):
    """
    What the files apply is what the engine ensures at its start (it
    leaves a policy of the same name as it finds it).
    """
    own = _one(rendered, "Deployment", "capsule")["metadata"]["namespace"]
    policies = [o for o in rendered if o["kind"] == "NetworkPolicy"]
    assert policies == network_policies(SESSIONS, own)
    template = _one(rendered, "Deployment", "capsule")["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert CAPSULE_POD_LABELS.items() <= labels.items()


# -- the rights: exactly what the engine calls -----------------------------------

# The client's method names' kinds, as RBAC's resources.
RESOURCES = {"pod": ("", "pods"), "persistent_volume_claim": ("", "persistentvolumeclaims"),
             "secret": ("", "secrets"),
             "network_policy": ("networking.k8s.io", "networkpolicies"),
             "lease": ("coordination.k8s.io", "leases"),
             "resource_quota": ("", "resourcequotas"), "event": ("", "events")}
VERBS = {"create": "create", "read": "get", "list": "list", "delete": "delete",
         "patch": "patch", "replace": "update", "delete_collection": "deletecollection"}
_CALL = re.compile(r"\b(delete_collection|create|read|list|delete|patch|replace)_namespaced_"
                   r"([a-z_]+)\b")
_WATCH = re.compile(r"\blist_namespaced_([a-z_]+)\((?:[^()]|\([^()]*\))*?\bwatch=True", re.S)


def engine_rights() -> dict[tuple[str, str], set[str]]:
    """
    The rights the engine's calls need, read from capsule/engine/kube*.py:
    the client's C{<verb>_namespaced_<kind>} methods, a list with
    C{watch=True}, and the pods/exec stream.
    """
    needed: dict[tuple[str, str], set[str]] = {}
    for path in sorted((ROOT / "capsule" / "engine").glob("kube*.py")):
        source = path.read_text()
        for verb, kind in _CALL.findall(source):
            assert kind in RESOURCES, (f"{path.name} calls {verb}_namespaced_{kind}: say which"
                                       " resource that is in RESOURCES here")
            needed.setdefault(RESOURCES[kind], set()).add(VERBS[verb])
        for kind in _WATCH.findall(source):
            needed.setdefault(RESOURCES[kind], set()).add("watch")
        if re.search(r"/pods/\{[^}]*\}/exec", source):
            # A WebSocket: GET ("get"), and "create" where the API server
            # authorizes the upgrade as one (1.35+).
            needed.setdefault(("", "pods/exec"), set()).update({"get", "create"})
    return needed


def test_the_engine_needs_exactly_the_rights():
    """
    RIGHTS (and so the Role) grant what the engine calls, no more: a call
    added to the engine needs its right added there and in rbac.yaml.
    """
    assert engine_rights() == {k: set(v) for k, v in RIGHTS.items()}


def test_the_role_grants_the_rights(rendered):
    role = _one(rendered, "Role", "capsule")
    assert role["rules"] == role_rules()
    binding = _one(rendered, "RoleBinding", "capsule")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "capsule"}
    deployment = _one(rendered, "Deployment", "capsule")
    assert binding["subjects"] == [{
        "kind": "ServiceAccount",
        "name": deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "namespace": deployment["metadata"]["namespace"]}]
    _one(rendered, "ServiceAccount", binding["subjects"][0]["name"])
    # Nothing cluster-wide.
    assert not [o for o in rendered if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


# -- capsule's Deployment ---------------------------------------------------------


def _container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "capsule")


def test_the_deployment_runs_capsule_on_kubernetes(rendered):
    deployment = _one(rendered, "Deployment", "capsule")
    assert deployment["spec"]["replicas"] >= 2
    container = _container(deployment)
    assert container["command"][:1] == ["twistd"] and "capsule" in container["command"]
    args = container["args"]
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--engine"] == "kubernetes"
    assert pairs["--replica"] == "$(POD_NAME)"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # Every $(VAR) in the arguments is the container's.
    for name in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert name in env, name
    # The probes ask the server's /health (readiness) and that it answers.
    port = container["ports"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert container["livenessProbe"]["tcpSocket"] == {"port": port["name"]}
    assert pairs["--listen"] == f"tcp:{port['containerPort']}"
    assert set(container["resources"]) == {"requests", "limits"}


def test_the_deployment_runs_non_root(rendered):
    deployment = _one(rendered, "Deployment", "capsule")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security.get("runAsUser", pod["securityContext"]["runAsUser"]) != 0
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        # A read-only root: what capsule writes is on volumes.
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/var/lib/capsule"} <= mounts


def test_the_service_reaches_the_deployment(rendered):
    deployment = _one(rendered, "Deployment", "capsule")
    service = _one(rendered, "Service", "capsule")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in _container(deployment)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    # Any replica serves any session.
    assert "sessionAffinity" not in service["spec"] or service["spec"][
        "sessionAffinity"] == "None"


def test_the_example_overlay():
    objects = render(DEPLOY / "overlays" / "example")
    ingress = _one(objects, "Ingress", "capsule")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    # Logins are a replica's own: the ingress keeps a browser on one.
    assert annotations["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    service = _one(objects, "Service", "capsule")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    quota = _one(objects, "ResourceQuota")
    assert {"pods", "requests.memory", "limits.memory"} <= set(quota["spec"]["hard"])
    container = _container(_one(objects, "Deployment", "capsule"))
    assert container["image"] == "registry.example.com/capsule:1.0.0"
    args = container["args"]
    base = _container(_one(render(DEPLOY), "Deployment", "capsule"))["args"]
    # The patch replaces the arguments whole: it keeps the base's.
    assert args[:len(base)] == base


# -- kubectl, where there is one ---------------------------------------------------


def _kustomize_version(kubectl: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([kubectl, "version", "--client", "-o", "json"],
                             capture_output=True, text=True, timeout=60).stdout
        version = json.loads(out).get("kustomizeVersion", "")
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    found = re.match(r"v?(\d+)\.(\d+)", version)
    return tuple(int(n) for n in found.groups()) if found else None


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_kubectl_renders_the_same(directory):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on the PATH (the renderer above stands in)")
    version = _kustomize_version(kubectl)
    if version is None or version < (4,):
        pytest.skip(f"kubectl's Kustomize is {version}: 4 or later reads these files")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    theirs = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert (sorted(map(_canonical, theirs), key=_key)
            == sorted(map(_canonical, render(directory)), key=_key))


def _canonical(obj):
    """
    C{obj} with its containers' C{env} in the order of the names: Kustomize
    puts a patch's variables first, this renderer after the base's (the
    order matters only to a variable that names another; none does).
    """
    if isinstance(obj, dict):
        return {k: sorted(map(_canonical, v), key=lambda e: e["name"]) if k == "env"
                else _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canonical(i) for i in obj]
    return obj
