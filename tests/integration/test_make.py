"""
The Makefile as a newcomer meets it: `make setup` into a fresh virtualenv
says one line and no warning, and twistd finds capsule there.
"""

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent

# What this machine's own pip configuration may say about its indexes: not
# the Makefile's output.
_PIP_ENVIRONMENT = re.compile(r"^WARNING: Location '.*' is ignored")


def _said(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()
            and not _PIP_ENVIRONMENT.match(line)]


def test_setup_says_one_line_and_twistd_finds_capsule_in_the_venv(tmp_path):
    """
    The editable install is not a deprecated one (setuptools' compat mode
    printed 14 lines of warning), code is imported from the checkout, and
    `twistd --help` in that virtualenv lists capsule.
    """
    venv = tmp_path / "venv"
    done = subprocess.run(["make", f"VENV={venv}", f"{venv}/.installed"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert _said(output) == [f"capsule: installing capsule and its Python packages into"
                             f" {venv} (pip)..."], output
    assert not re.search(r"(?i)deprecat|editable_mode|compat|BuildBackendWarning", output)

    # Run elsewhere than the checkout: the plugin is found through the venv.
    helped = subprocess.run([str(venv / "bin" / "twistd"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert re.search(r"^\s+capsule\s+Browser terminals", helped.stdout, re.M), helped.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import capsule.tap; print(capsule.tap.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(ROOT / "capsule" / "tap.py")
