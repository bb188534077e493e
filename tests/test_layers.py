"""
The house's floors, held against the code: each package of capsule imports
only from the floors below it (and its own), read from the source with ast
(nothing is imported), so that data flows one way: web -> sessions ->
engine -> core, with auth and ops beside.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "capsule"

# What each package may import of capsule's, besides itself.
MAY_IMPORT = {
    "core": set(),
    "engine": {"core"},
    "auth": {"core"},
    "sessions": {"core", "engine"},
    "ops": {"core", "sessions"},
    "web": {"core", "engine", "sessions", "auth", "ops"},
    # What sessions reach from inside (the door, egress, the credential
    # gateway): beside the web, whose HTTP toolkit it uses.
    "gateway": {"core", "engine", "sessions", "auth", "ops", "web"},
}
# The top: the wiring (tap, services, config, tuning) and the admin command
# may import anything; nothing below imports them.
TOP = "top"


# The package itself holds only its version, which any floor may read.
EVERYONE = {"capsule", "capsule.__version__"}


def _floor(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in MAY_IMPORT:
        return parts[1]
    return TOP


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        yield name, path


def _imports(module: str, path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "capsule":
                for alias in node.names:
                    yield node.lineno, f"capsule.{alias.name}"
            else:
                yield node.lineno, target


MODULES = list(_modules())


def test_every_package_has_a_floor():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(MAY_IMPORT)


@pytest.mark.parametrize("module, path", MODULES, ids=[m for m, _ in MODULES])
def test_no_import_climbs_a_floor(module, path):
    floor = _floor(module)
    if floor == TOP:
        return
    allowed = MAY_IMPORT[floor] | {floor}
    climbing = [f"line {line}: {target}" for line, target in _imports(module, path)
                if target.startswith("capsule.") and target not in EVERYONE
                and _floor(target) not in allowed]
    assert climbing == [], f"{module} ({floor}) imports from a floor above it or beside it"


def test_the_server_never_imports_the_tests():
    offenders = [f"{module}: {target}" for module, path in MODULES
                 for _, target in _imports(module, path)
                 if target == "tests" or target.startswith("tests.")]
    assert offenders == []


def test_the_rule_catches_a_climbing_import(tmp_path):
    # The check itself: a core module importing the web is caught.
    path = tmp_path / "bad.py"
    path.write_text("from capsule.web.site import make_site\n")
    assert [t for _, t in _imports("capsule.core.bad", path)
            if _floor(t) not in MAY_IMPORT["core"] | {"core"}] == ["capsule.web.site"]
