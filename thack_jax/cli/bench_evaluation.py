r"""Evaluation cost per checkpoint: `python launch/benchmark.py evaluation [--shapes=tiny,paper]`.

Two shapes, random weights:
  tiny:  tiny oracle / teacher / student (vocab 128), 64 prompts x 4 samples, input 32,
         output 16 (the test and CI size);
  paper: T5 v1.1-small student (full size, vocab 32128) vs oracle and teacher of base
         width (d_model 768, d_ff 2048, 12 heads) with --paper_ref_layers layers,
         --paper_prompts (default 8; 32 in the docs) x 2 samples, input 256, output 64.
Random models rarely sample EOS, so responses run close to the full output length (the
table reports the mean length of the teacher's responses). Prints one markdown row per
shape: setup (reference samples, drawn once, compile included), the first evaluate
(compile included), the steady evaluate, and student responses evaluated per second.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags

from thack_jax import models
from thack_jax.cli import common
from thack_jax.evaluation import evaluator  # noqa: E402
from thack_jax.parallel import partitioning

SHAPES = ("tiny", "paper")
FLAGS = flags.FlagValues()  # its own, so that other benchmarks' flags never collide
_F = dict(flag_values=FLAGS)
flags.DEFINE_list("shapes", list(SHAPES), "Shapes to measure: tiny, paper.", **_F)
flags.DEFINE_integer("repeats", 1, "Steady-state evaluate calls (the median is reported).", **_F)
flags.DEFINE_integer("paper_ref_layers", 2, "Encoder/decoder layers of the base-width refs.", **_F)
flags.DEFINE_integer("batch_size", 8, "Prompts per device batch.", **_F)
flags.DEFINE_integer(
    "paper_prompts",
    8,
    "Prompts of the paper shape (32 in docs/evaluation.md; "
    "8 by default so that a 2-core CPU finishes in minutes).",
    **_F,
)
flags.DEFINE_integer(
    "reference_cache_mib",
    2048,
    "EvalSettings.reference_cache_mib: memory for the references' own log-probs (0: none, "
    "every reference pass at every checkpoint).",
    **_F,
)
flags.DEFINE_enum(
    "estimator",
    "rao_blackwell",
    evaluator.ESTIMATORS,
    "rao_blackwell (lower variance) or plain.",
    **_F,
)


def parse_args(argv: list[str]) -> flags.FlagValues:
    """Parses `argv` (argv[0] the program) into this module's FLAGS, which it returns.

    Raises:
      flags.Error: an unknown flag, a bad value, or a shape other than tiny / paper.
    """
    common.parse_own_flags(FLAGS, argv)
    unknown = [s for s in FLAGS.shapes if s not in SHAPES]
    if unknown:
        raise flags.IllegalFlagValueError(
            f"--shapes: unknown {', '.join(unknown)}; expected {', '.join(SHAPES)}"
        )
    return FLAGS


def shape_spec(name: str) -> dict:
    if name == "tiny":
        tiny = models.get_config("tiny")
        return dict(ref=tiny, student=tiny, prompts=64, samples=4, lx=32, ly=16)
    if name == "paper":
        layers = FLAGS.paper_ref_layers
        ref = models.get_config("base", num_encoder_layers=layers, num_decoder_layers=layers)
        return dict(
            ref=ref,
            student=models.get_config("small"),
            prompts=FLAGS.paper_prompts,
            samples=2,
            lx=256,
            ly=64,
        )
    raise ValueError(f"unknown shape {name!r}; expected tiny or paper")


def init(config, seed):
    return jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(seed))


def _breakdown(ev: evaluator.Evaluator, student) -> tuple[float, float]:
    """Median seconds of the two halves of one `evaluate`: drawing the student's samples,
    and scoring them and the cached reference samples (every model pass). Times the
    evaluator's own steps (private methods), so the split is of the real call."""
    placed = (ev.student_config, ev.place_params(ev.student_config, student))
    sample_times, score_times = [], []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        samples = ev._sample(*placed, stream=evaluator.STREAMS["student"])
        sample_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ev._score(placed, samples)
        score_times.append(time.perf_counter() - start)
    return float(np.median(sample_times)), float(np.median(score_times))


def measure(name: str, spec: dict | None = None) -> dict:
    """Times the Evaluator of shape `name` (`shape_spec`), or of `spec` (the same keys:
    ref, student configs; prompts, samples, lx, ly; optionally reference_cache_mib)
    labelled `name`; the other settings (batch size, estimator, repeats, and the reference
    cache unless `spec` sets it) are this module's parsed FLAGS."""
    spec = shape_spec(name) if spec is None else spec
    rng = np.random.default_rng(0)
    vocab = spec["student"].vocab_size
    prompts = rng.integers(2, vocab, (spec["prompts"], spec["lx"])).astype(np.int32)
    oracle, teacher = (spec["ref"], init(spec["ref"], 0)), (spec["ref"], init(spec["ref"], 1))
    student = init(spec["student"], 2)
    mesh = partitioning.make_mesh(partitioning.data_parallel_mesh_shape())
    start = time.perf_counter()
    ev = evaluator.Evaluator(
        oracle,
        teacher,
        spec["student"],
        prompts,
        evaluator.EvalSettings(
            spec["samples"],
            spec["ly"],
            batch_size=min(FLAGS.batch_size, spec["prompts"]),
            estimator=FLAGS.estimator,
            reference_cache_mib=spec.get("reference_cache_mib", FLAGS.reference_cache_mib),
        ),
        mesh=mesh,
    )
    setup = time.perf_counter() - start
    start = time.perf_counter()
    ev.evaluate(student)
    first = time.perf_counter() - start
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        ev.evaluate(student)
        times.append(time.perf_counter() - start)
    steady = float(np.median(times))
    sample_s, score_s = _breakdown(ev, student)
    _, mask = ev.reference_samples("teacher")
    n = spec["prompts"] * spec["samples"]
    return dict(
        name=name,
        shape=f"{spec['prompts']}x{spec['samples']}, in {spec['lx']}, out {spec['ly']}",
        models=f"student {models.count_params(spec['student']) / 1e6:.1f}M, refs "
        f"{models.count_params(spec['ref']) / 1e6:.1f}M",
        setup=setup,
        first=first,
        steady=steady,
        sample_s=sample_s,
        score_s=score_s,
        seq_per_s=n / steady,
        mean_len=float(mask.sum(1).mean()),
    )


def main(argv: list[str]) -> int:
    parse_args(argv)
    devices = jax.devices()
    print(f"command: python launch/benchmark.py evaluation {' '.join(argv[1:])}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, {len(devices)} x {devices[0].device_kind}"
    )
    print(
        "| shape | models | prompts x samples, lengths | setup s | first evaluate s | "
        "evaluate s | of it: sampling s | scoring s | responses/s | mean ref length |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in FLAGS.shapes:
        r = measure(name)
        print(
            f"| {r['name']} | {r['models']} | {r['shape']} | {r['setup']:.1f} | "
            f"{r['first']:.1f} | {r['steady']:.2f} | {r['sample_s']:.2f} | {r['score_s']:.2f} | "
            f"{r['seq_per_s']:.1f} | "
            f"{r['mean_len']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    from thack_jax.cli import benchmark

    sys.exit(benchmark.main([sys.argv[0], "evaluation", *sys.argv[1:]]))
