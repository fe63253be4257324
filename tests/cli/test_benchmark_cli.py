"""`launch/benchmark.py`'s command line: `--help` for the command and for each benchmark,
the one-line errors (unknown benchmark, bad flag), and the benchmarks' absl flags on their
own FlagValues, so that several are imported and parsed in one process. Nothing is timed
and no benchmark runs: every error is raised before any work starts."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from thack_jax.cli import bench_evaluation, bench_sampling, bench_train_step, benchmark

REPO = Path(__file__).resolve().parents[2]


def _benchmark(*args: str) -> subprocess.CompletedProcess:
    # This checkout's package, whatever the editable install points to.
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "benchmark.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


def _module(name: str):
    return importlib.import_module(f"thack_jax.cli.{benchmark.BENCHMARKS[name]}")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_each_benchmark_on_one_line(flag):
    proc = _benchmark(flag)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == benchmark.USAGE
    for name in benchmark.BENCHMARKS:
        first = _module(name).__doc__.strip().splitlines()[0]
        assert [line for line in lines if line.split()[:1] == [name]] == [f"  {name:<12}{first}"], (
            proc.stdout
        )


@pytest.mark.parametrize("name", list(benchmark.BENCHMARKS))
def test_each_benchmarks_help_gives_its_doc_and_every_flag_with_its_help(name):
    proc = _benchmark(name, "--help")
    assert proc.returncode == 0, proc.stderr
    module = _module(name)
    out = " ".join(proc.stdout.split())  # help texts wrap
    assert out.startswith(" ".join(module.__doc__.split()[:8]))
    for flag in module.FLAGS:
        assert f"--{flag}:" in out or f"--[no]{flag}:" in out, (flag, proc.stdout)
        assert " ".join(module.FLAGS[flag].help.split()) in out, flag
    assert "--flagfile" not in out  # only the benchmark's own flags


@pytest.mark.parametrize(
    "args, error",
    [
        ((), "no benchmark named; choose from sampling, train_step, evaluation, table"),
        (
            ("speed",),
            "unknown benchmark 'speed'; choose from sampling, train_step, evaluation, table",
        ),
    ],
)
def test_a_missing_or_unknown_benchmark_prints_the_usage_and_one_error_line(args, error):
    proc = _benchmark(*args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [benchmark.USAGE, f"benchmark.py: error: {error}"]
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "argv, error",
    [
        (["sampling", "--repeats=x"], "flag --repeats=x: invalid literal for int()"),
        (["sampling", "--batch", "1,a"], "--batch=1,a: expected comma-separated integers"),
        (["sampling", "--family=llama", "--size=small"], "--size='small' is not a llama size"),
        (["train_step", "--dtype=float16"], "flag --dtype=float16: value should be one of"),
        (["evaluation", "--shapes=tiny,big"], "--shapes: unknown big; expected tiny, paper"),
        (["evaluation", "--bogus"], "Unknown command line flag 'bogus'"),
        (["train_step", "tiny"], "unexpected arguments ['tiny']"),
        (["table", "--decode_batch=1,x"], "--decode_batch=1,x: expected integers"),
        (["table", "--size=base"], "flag --size=base: value should be one of"),
        (["table", "--batch=0"], "--batch=0: must be >= 1"),
    ],
)
def test_a_bad_flag_is_one_error_line_before_any_work(argv, error, capsys):
    assert benchmark.main(["benchmark.py", *argv]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"benchmark.py: error: {error}"), err


def test_a_bad_flag_exits_1_from_the_command_line():
    proc = _benchmark("train_step", "--steps=many")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "benchmark.py: error: flag --steps=many: invalid literal for int() with base 10: 'many'"
    ]


def test_the_benchmarks_parse_their_own_flags_in_one_process():
    """Imported together (above) without a DuplicateFlagError; --batch and --repeats are
    three separate flags, and each parse starts again from the defaults."""
    sampling = bench_sampling.parse_args(["prog", "--batch", "1,2", "--repeats=7", "--skip_hf"])
    train = bench_train_step.parse_args(["prog", "--batch=4", "--repeats", "2", "--no-torch"])
    evaluation = bench_evaluation.parse_args(["prog", "--shapes=tiny", "--repeats=3"])
    assert (sampling.batch, sampling.repeats, sampling.skip_hf) == ([1, 2], 7, True)
    assert (train.batch, train.repeats, train.no_torch) == (4, 2, True)
    assert (evaluation.shapes, evaluation.repeats, evaluation.batch_size) == (["tiny"], 3, 8)
    assert (bench_evaluation.FLAGS.repeats, bench_train_step.FLAGS.repeats) == (3, 2)
    again = bench_sampling.parse_args(["prog", "--batch=1,32"])
    assert (again.batch, again.repeats, again.skip_hf, again.size) == ([1, 32], 3, False, "small")
    assert bench_train_step.FLAGS.batch == 4  # untouched by the other module's parse
    assert "batch" not in flags.FLAGS and "shapes" not in flags.FLAGS  # not the global ones


def test_the_documented_flag_forms_parse():
    """docs/performance.md writes `--batch 1,32` and booleans bare (`--skip_hf`)."""
    spaced = bench_sampling.parse_args(["prog", "--batch", "1,32", "--gumbel", "--breakdown"])
    equals = bench_sampling.parse_args(["prog", "--batch=1,32", "--nogumbel"])
    assert spaced.batch == equals.batch == [1, 32]
    assert (spaced.gumbel, spaced.breakdown, equals.gumbel, equals.breakdown) == (
        True,
        True,
        False,
        False,
    )
    train = bench_train_step.parse_args(["prog", "--sizes=tiny", "--torch_threads=1,2,4"])
    assert (train.sizes, train.torch_threads, train.no_torch) == (["tiny"], [1, 2, 4], False)
