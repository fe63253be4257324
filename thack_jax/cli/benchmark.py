"""Benchmark entry point: `python launch/benchmark.py {sampling,train_step,evaluation,table}`.

Each benchmark lives in its own module beside this file (bench_<name>.py) and prints
tokens/s (or seconds per checkpoint) with ratios against baselines measured in the same run;
`table` measures them all, with the machine's limits, and prints one table.
`benchmark.py --help` lists them; `benchmark.py <name> --help` prints one's flags. Each
defines its absl flags on its own FlagValues (several can be imported in one process); a
bad flag prints one line `benchmark.py: error: ...` and exits with status 1, a missing or
unknown benchmark name exits with status 2.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

from absl import flags

TOOL = "benchmark.py"
BENCHMARKS = {
    "sampling": "bench_sampling",
    "train_step": "bench_train_step",
    "evaluation": "bench_evaluation",
    "table": "bench_table",  # all of them, each against its baseline or limit, in one table
}
HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull")
USAGE = f"usage: python launch/{TOOL} {{{','.join(BENCHMARKS)}}} [--flags]"


def _summary(name: str) -> str:
    """The first docstring line of the benchmark's module, read without importing it (jax
    and the models load in seconds; the listing should not wait for them)."""
    spec = importlib.util.find_spec(f"thack_jax.cli.{BENCHMARKS[name]}")
    with open(spec.origin) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.splitlines()[0] if doc else ""


def listing() -> str:
    """`benchmark.py --help`: the usage and one line per benchmark."""
    width = max(map(len, BENCHMARKS)) + 2
    rows = [f"  {name:<{width}}{_summary(name)}" for name in BENCHMARKS]
    return "\n".join([USAGE, "", "benchmarks:", *rows, "", f"{TOOL} <name> --help: its flags."])


def module_help(module) -> str:
    """`benchmark.py <name> --help`: the module's docstring, then its flags with their help."""
    # module_help: the benchmark's own flags, without absl's --flagfile / --undefok.
    return f"{module.__doc__.strip()}\n\nflags:\n{module.FLAGS.module_help(module.__name__)}"


def main(argv: list[str]) -> int:
    """Runs the benchmark argv[1] with the flags argv[2:] (argv[0] the program)."""
    if len(argv) > 1 and argv[1] in HELP:
        print(listing())
        return 0
    if len(argv) < 2 or argv[1] not in BENCHMARKS:
        problem = "no benchmark named" if len(argv) < 2 else f"unknown benchmark {argv[1]!r}"
        print(USAGE, file=sys.stderr)
        print(f"{TOOL}: error: {problem}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"thack_jax.cli.{BENCHMARKS[argv[1]]}")
    if any(arg in HELP for arg in argv[2:]):
        print(module_help(module))
        return 0
    try:
        # The flags are parsed before any work, so flags.Error only comes from them.
        module.parse_args([argv[0], *argv[2:]])
    except flags.Error as e:
        print(f"{TOOL}: error: {e}", file=sys.stderr)
        return 1
    return module.main([argv[0], *argv[2:]]) or 0


def run() -> None:
    """Console script `thack-benchmark` (and `python launch/benchmark.py`)."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
