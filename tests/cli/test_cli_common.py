"""thack_jax/cli/common.py: one gin-file convention and help text for every entry point that
reads an experiment, and one error convention (one line; --verbose for the traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from thack_jax.cli import common

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(LAUNCH / f"{tool}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("tool", ["train", "memory", "tpu"])
def test_every_gin_reading_tool_shows_the_same_gin_help(tool):
    result = _run(tool, "--help")  # absl exits with status 1 after the help
    shown = _words(result.stdout)
    for text in (common.GIN_FILE_HELP, common.GIN_BINDINGS_HELP, common.GIN_SEARCH_HELP):
        assert _words(text) in shown, (tool, text)
    assert "--[no]verbose" in result.stdout


@pytest.mark.parametrize("tool", ["eval", "report", "diagnose"])
def test_expected_errors_are_one_line_and_verbose_gives_the_traceback(tool, tmp_path):
    missing = tmp_path / "absent"
    args = {
        "eval": [
            f"--workdir={missing}",
            f"--oracle_ckpt={missing}/oracle",
            f"--teacher_ckpt={missing}/teacher",
            "--student_config=tiny",
            f"--prompts={missing}/prompts.npy",
        ],
        "report": [f"--workdir={missing}"],
        "diagnose": [f"--metrics={missing}.jsonl"],
    }[tool]
    quiet = _run(tool, *args)
    assert quiet.returncode == 1
    (line,) = quiet.stderr.strip().splitlines()
    assert line.startswith(f"{tool}.py: error: ") and "absent" in line, line
    loud = _run(tool, *args, "--verbose")
    assert loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr
