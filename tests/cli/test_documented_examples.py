"""Every command-line example in README.md, docs/ and the entry points' --help texts runs as
written (tests/_examples.py finds them):

- every example's flags parse with its tool's own definitions, and gin files it names
  build the ExperimentConfig (tests/_check_examples.py, one process per tool);
- the ones that are cheap on CPU run for real: train.py with --dry_run added, tpu.py with
  --dry_run added (it never creates anything), memory.py, the --simulate examples of
  diagnose.py, and report.py rebuilding the committed report from its summaries (into a
  copy). Each runs in a fresh folder, so nothing is written into the checkout.

An example with a placeholder (`...`, `<name>`) is checked for its flags only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import _examples
import pytest

REPO = _examples.REPO
EXAMPLES = _examples.all_examples()
TOOLS = (
    "train",
    "tpu",
    "memory",
    "eval",
    "report",
    "diagnose",
    "benchmark",
    "gpu_check",
    "coverage",
)


def _concrete(example) -> bool:
    return not any("..." in a or "<" in a for a in example.args)


def _unique(examples):
    """One example per distinct command (several docs give the same one); id = its sources."""
    by_args: dict[tuple, list] = {}
    for e in examples:
        by_args.setdefault((e.tool, e.args), []).append(e)
    return [pytest.param(group[0], id=group[0].source) for group in by_args.values()]


def _run(tool: str, args, cwd, timeout=120) -> subprocess.CompletedProcess:
    script = REPO / "launch" / f"{tool}.py"
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def test_the_examples_are_found():
    """The finder itself: every tool, README and --help texts, the known total at least."""
    assert set(TOOLS) <= {e.tool for e in EXAMPLES}
    assert any(e.source.startswith("README.md") for e in EXAMPLES)
    assert any(e.source.endswith("(--help)") and e.tool == "tpu" for e in EXAMPLES)
    assert len(EXAMPLES) >= 60, len(EXAMPLES)
    multi_line = [e for e in EXAMPLES if e.source.startswith("docs/tpu.md") and e.tool == "tpu"]
    assert multi_line and "--delete_after" in multi_line[0].args  # `\` continuations joined


@pytest.mark.parametrize("tool", TOOLS)
def test_every_example_parses_with_its_tools_flags(tool, tmp_path):
    examples = [e for e in EXAMPLES if e.tool == tool]
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_check_examples.py"), tool],
        input=json.dumps([list(e.args) if _concrete(e) else _flags_only(e) for e in examples]),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    bad = [f"{e}\n  -> {err}" for e, err in zip(examples, errors, strict=True) if err]
    assert not bad, "\n".join(bad) + "\n" + result.stderr[-2000:]


def _flags_only(example) -> list[str]:
    """A placeholder's example minus its gin files (the flag names and the other values
    are still checked)."""
    return [a for a in example.args if not a.startswith(("--gin_file=", "--gin_bindings="))]


TRAIN = [e for e in EXAMPLES if e.tool == "train" and _concrete(e) and e.args]


@pytest.mark.parametrize("example", _unique(TRAIN))
def test_train_examples_pass_a_dry_run(example, tmp_path):
    result = _run("train", [*example.args, "--dry_run"], tmp_path)
    assert result.returncode == 0, f"{example}\n{result.stderr[-2000:]}"
    assert "[thack_jax] dry run: experiment " in result.stdout
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


@pytest.mark.parametrize("example", _unique(e for e in EXAMPLES if e.tool == "tpu"))
def test_tpu_examples_pass_a_dry_run(example, tmp_path):
    result = _run("tpu", [*example.args, "--dry_run"], tmp_path)
    assert result.returncode == 0, f"{example}\n{result.stderr[-2000:]}"
    assert "[tpu] configuration checked" in result.stderr
    assert "gcloud compute tpus tpu-vm create" in result.stdout


@pytest.mark.parametrize("example", _unique(e for e in EXAMPLES if e.tool == "memory"))
def test_memory_examples_run(example, tmp_path):
    result = _run("memory", example.args, tmp_path)
    assert result.returncode == 0, f"{example}\n{result.stderr[-2000:]}"
    assert "| total" in result.stdout or "**" in result.stdout  # the table


SIMULATE = [e for e in EXAMPLES if e.tool == "diagnose" and "--simulate" in e.args]


@pytest.mark.parametrize("example", _unique(SIMULATE))
def test_diagnose_simulation_examples_run(example, tmp_path):
    result = _run("diagnose", example.args, tmp_path, timeout=300)
    assert result.returncode == 0, f"{example}\n{result.stderr[-2000:]}"
    assert "false" in result.stdout.lower()  # the false-positive rate table


def _summary_dirs(example) -> list[str]:
    return [a.split("=", 1)[1] for a in example.args if a.startswith("--summary_dir=")]


# Examples that rebuild from committed summaries; one naming placeholder folders (report.py
# --help's `--summary_dir=A --summary_dir=B`) is checked for its flags only.
REBUILDS = [
    e
    for e in EXAMPLES
    if e.tool == "report"
    and _summary_dirs(e)
    and all((REPO / d).is_dir() for d in _summary_dirs(e))
]


def test_the_rebuild_examples_are_found():
    sources = {e.source.split(":")[0] for e in REBUILDS}
    assert {"docs/reproduction.md", "docs/reproduction/sensitivity.md"} <= sources


@pytest.mark.parametrize("example", _unique(REBUILDS))
def test_report_rebuilds_from_the_committed_summaries(example, tmp_path):
    """docs/reproduction.md's and docs/models_decoder.md's last steps (reports and the
    sensitivity table) and report.py --help's, in a copy of the summaries."""
    args = dict(a.split("=", 1) for a in example.args)
    for directory in _summary_dirs(example):
        shutil.copytree(REPO / directory, tmp_path / directory)
    result = _run("report", example.args, tmp_path)
    assert result.returncode == 0, f"{example}\n{result.stderr[-2000:]}"
    if "--sensitivity" in args:
        written = (tmp_path / args["--sensitivity"]).read_text()
        assert "## One row per world" in written
    else:
        assert (tmp_path / args["--out_dir"] / "report.md").is_file()
