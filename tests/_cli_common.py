"""Shared by the CLI tests: run a `launch/` script in a subprocess that fails (exit 3) if the
script imported jax, TensorFlow, torch or flax (the light tools must start fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs the script in-process under runpy so the test can see what it imported.
RUNNER = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("jax", "tensorflow", "torch", "flax") if m in sys.modules)
if heavy:
    print("imported:", heavy)
    code = 3
sys.exit(code)
"""


def run_light_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python launch/<name>.py args...` from the repository root, heavy imports refused."""
    script = REPO / "launch" / f"{name}.py"
    return subprocess.run(
        [sys.executable, "-c", RUNNER, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
