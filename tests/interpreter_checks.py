"""Kernel checks run under Triton's CPU interpreter (TRITON_INTERPRET=1) in a child process, for test_fused.py and
test_persistent.py: the child (the test file run as a script) runs every check and prints their results as one JSON
line; the parent reads that line once per test module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent


def main(checks: dict[str, Callable]) -> None:
    """In the child: run each check, "ok" (or what it returns) or its traceback, printed as one RESULTS line."""
    results = {}
    for name, fn in checks.items():
        try:
            results[name] = fn() or "ok"
        except Exception:
            results[name] = traceback.format_exc(limit=6)
    print("RESULTS " + json.dumps(results))


def results(test_file: str, timeout: int) -> dict[str, str]:
    """In the parent: run ``test_file`` as the child under the interpreter and return its results by check name."""
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
        # 3.6's interpreter turns scalar kernel arguments into 1-element arrays that numpy 2 refuses as
        # loop bounds (checked: 3.6 fails, 3.7 / 3.8 / 3.9 pass).
        pytest.skip(f"the Triton interpreter needs triton >= 3.7 for these kernels (found {triton.__version__})")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, test_file], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert lines, f"interpreter run failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS "):])
