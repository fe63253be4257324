"""Benchmark entry point: `python launch/benchmark.py {sampling,train_step,evaluation} [flags]`.

Each benchmark lives in its own module beside this file (bench_<name>.py) and prints
tokens/s (or seconds per checkpoint) with ratios against baselines measured in the same run.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "sampling": "bench_sampling",
    "train_step": "bench_train_step",
    "evaluation": "bench_evaluation",
}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in BENCHMARKS:
        print(f"usage: python launch/benchmark.py {{{','.join(BENCHMARKS)}}} [--flags]")
        return 2
    bench = importlib.import_module(f"thack_jax.cli.{BENCHMARKS[argv[1]]}")
    return bench.main([argv[0], *argv[2:]]) or 0


def run() -> None:
    """Console script `thack-benchmark` (and `python launch/benchmark.py`)."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
