"""
setup.py installs the page's files from what www/ holds: every file the page
serves (its modules too), and none of npm's packages, the page's tests or its
package manifests.
"""

import re
import runpy
from pathlib import Path, PurePosixPath
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
WWW = ROOT / "www"


def _data_files(monkeypatch) -> list:
    """
    The data_files that setup.py hands to setup(), as pip would build them.
    """
    monkeypatch.chdir(ROOT)
    with mock.patch("setuptools.setup") as setup:
        runpy.run_path(str(ROOT / "setup.py"))
    return setup.call_args.kwargs["data_files"]


def _installed(monkeypatch) -> dict[str, str]:
    """
    Each installed file's path under www/ -> the folder it goes to.
    """
    found = {}
    for target, paths in _data_files(monkeypatch):
        for path in paths:
            relative = PurePosixPath(path).relative_to("www")
            assert relative.as_posix() not in found, f"{path} is installed twice"
            found[relative.as_posix()] = target
    return found


def _held() -> set[str]:
    """
    What www/ holds that the page serves, listed here by hand's rules.
    """
    held = set()
    for path in WWW.rglob("*"):
        relative = path.relative_to(WWW)
        if not path.is_file() or relative.parts[0] in ("node_modules", "test"):
            continue
        if any(part.startswith(".") for part in relative.parts):
            continue
        if relative.as_posix() in ("package.json", "package-lock.json"):
            continue
        held.add(relative.as_posix())
    return held


def test_every_file_of_the_page_is_installed_where_it_is_served(monkeypatch):
    installed = _installed(monkeypatch)
    assert set(installed) == _held()
    for path, target in installed.items():
        assert (WWW / path).is_file()
        assert target == str(PurePosixPath("share/capsule/www", *PurePosixPath(path).parts[:-1]))


def test_the_pages_own_references_are_installed(monkeypatch):
    """
    What index.html and login.html name (but npm's packages) is installed:
    its modules, their imports, its style and its icon.
    """
    installed = _installed(monkeypatch)
    named = set()
    for page in ("index.html", "login.html"):
        text = (WWW / page).read_text()
        named |= set(re.findall(r'(?:src|href)="([^":?#]+)"', text))
    for module in (WWW / "js").glob("*.js"):
        named |= {f"js/{name}" for name in
                  re.findall(r'from\s+"\./([^"]+)"', module.read_text())}
    named |= {name for name in re.findall(r'from\s+"\./([^"]+)"', (WWW / "app.js").read_text())}
    named = {name for name in named if not name.startswith("node_modules/")}
    assert {"app.js", "js/connection.js", "js/machine.js", "js/tar.js", "style.css",
            "favicon.svg"} <= named
    assert named - set(installed) == set()


def test_packages_tests_and_manifests_are_not_installed(monkeypatch):
    installed = _installed(monkeypatch)
    assert not [path for path in installed if path.startswith(("node_modules/", "test/"))]
    assert "package.json" not in installed and "package-lock.json" not in installed
    assert any(path.startswith("test/") for path in
               (p.relative_to(WWW).as_posix() for p in WWW.rglob("*.test.mjs")))
