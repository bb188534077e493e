"""
A short soak (the long one: `bench/soak.py --cycles 500`, see the README).
"""

import json
import os
import subprocess
import sys

from .harness import IMAGE, ROOT


def test_short_soak_leaks_nothing():
    cycles = int(os.environ.get("CAPSULE_SOAK_CYCLES", "50"))
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--cycles", str(cycles),
         "--max-seconds", "600", "--image", IMAGE, "--json"],
        capture_output=True, text=True, timeout=900)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["failures"] == []
    assert result["cycles_done"] == cycles
    assert result["containers_leaked"] == 0
    assert result["sessions_leaked"] == 0
    assert result["unhandled_errors"] == 0
    assert run.returncode == 0, run.stderr
