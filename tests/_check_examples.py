"""`python tests/_check_examples.py TOOL < examples.json`: parses each example's
arguments with TOOL's own flag definitions (absl or argparse, as the tool does; a
benchmark's own absl FlagValues through its `parse_args`) and, where
it names gin files, builds the ExperimentConfig from them as the tool would. Prints one
JSON list: "" for an example that parses, else the error. One process per tool, because
the tools define flags of the same names."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys

from absl import flags

FLAGS = flags.FLAGS
ABSL = {"train", "memory", "eval", "report", "diagnose", "tpu", "coverage"}


def _absl(args: list[str]) -> str:
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(["prog", *args])
    except flags.Error as e:
        return f"flags: {e}"
    if len(rest) > 1:
        return f"unexpected arguments {rest[1:]}"
    if "gin_file" in FLAGS and FLAGS.gin_file:
        import gin

        from thack_jax.cli import common

        gin.clear_config()  # each example alone, as its own process would see it
        try:
            common.experiment_config("check")
        except SystemExit:
            return "the gin configuration is refused (its message is on stderr)"
    return ""


def _argparse(module: str, parse: str, argv: list[str]) -> str:
    parser = getattr(importlib.import_module(f"thack_jax.cli.{module}"), parse)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser(argv)
    except SystemExit:
        return f"argparse: {stderr.getvalue().strip()}"
    return ""


def _benchmark(args: list[str]) -> str:
    from thack_jax.cli import benchmark

    if not args:
        return "no benchmark named"
    name, rest = args[0], args[1:]
    if name not in benchmark.BENCHMARKS:
        return f"unknown benchmark {name!r}"
    module = importlib.import_module(f"thack_jax.cli.{benchmark.BENCHMARKS[name]}")
    try:
        module.parse_args(["prog", *rest])
    except flags.Error as e:
        return f"flags: {e}"
    return ""


def check(tool: str, args: list[str]) -> str:
    if tool in ABSL:
        return _absl(args)
    if tool == "gpu_check":
        return _argparse("gpu_check", "_parse", args)
    if tool == "benchmark":
        return _benchmark(args)
    return f"unknown tool {tool!r}"


def main() -> None:
    tool = sys.argv[1]
    if tool in ABSL:
        importlib.import_module(f"thack_jax.cli.{tool}")
        if tool == "tpu":
            importlib.import_module("thack_jax.cli.tpu")._define_flags()
    examples = json.load(sys.stdin)
    print(json.dumps([check(tool, args) for args in examples]))


if __name__ == "__main__":
    main()
