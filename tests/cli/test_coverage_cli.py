"""`launch/coverage.py` as documented (docs/evaluation.md), at its small size: it runs, prints
the table and writes the JSON it names; a bad flag value is refused naming the flag (absl's
own parse error, as for the package's other absl tools)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "coverage.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=env,
    )


def test_the_small_documented_study_runs_and_writes_its_table(tmp_path):
    small = "--pairs=near --prompts=5 --seeds=4 --chunk=2 --frequency_samples=100".split()
    result = _run(*small, "--out=table.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|" in result.stdout and "near" in result.stdout
    table = json.loads((tmp_path / "table.json").read_text())
    assert table, "empty table"


def test_a_bad_flag_value_is_refused_naming_it(tmp_path):
    result = _run("--seeds=x", cwd=tmp_path)
    assert result.returncode == 1
    assert "--seeds=x" in result.stderr and "Traceback" not in result.stderr, result.stderr
