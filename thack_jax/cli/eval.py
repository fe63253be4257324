r"""Separate-process evaluator: watches a training workdir, evaluates each new checkpoint once.

  python launch/eval.py --workdir=/runs/offline --oracle_ckpt=/models/oracle \
    --teacher_ckpt=/runs/teacher/checkpoints --teacher_config=/runs/teacher/config.json \
    --student_config=small --prompts=/data/eval_prompts.npy --num_samples=4 --stop_after_step=5000

Reads student checkpoints from `<workdir>/<ckpt_subdir>` (orbax, only finalized steps),
writes `<workdir>/eval_metrics.jsonl` and `<workdir>/eval_state.json`; restartable (see
`thack_jax.evaluation.watcher.watch`). A reference checkpoint (`--oracle_ckpt`, `--teacher_ckpt`) is
either a Hugging Face directory (config.json + model.safetensors) or an orbax checkpoint
directory (its newest finalized step is read; its config comes from `--oracle_config` /
`--teacher_config`). A config is a size name (`tiny`, `small`, ...) or a JSON file: a
Hugging Face config.json, or T5Config fields (`dataclasses.asdict(config)`).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from thack_jax.cli.eval_inputs import EvalCliError, load_config, load_model, load_prompts
from thack_jax.evaluation import evaluator, watcher
from thack_jax.parallel import partitioning

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir to watch.")
flags.DEFINE_string("ckpt_subdir", "checkpoints", "Student checkpoints, relative to --workdir.")
flags.DEFINE_string("oracle_ckpt", None, "Oracle: HF safetensors dir or orbax checkpoint dir.")
flags.DEFINE_string("teacher_ckpt", None, "Teacher: HF safetensors dir or orbax checkpoint dir.")
flags.DEFINE_string("oracle_config", None, "Oracle config (size name or JSON); orbax dirs only.")
flags.DEFINE_string("teacher_config", None, "Teacher config (size name or JSON); orbax only.")
flags.DEFINE_string("student_config", None, "Student config: size name or JSON file.")
flags.DEFINE_string("prompts", None, "Held-out prompts, an int .npy file [N, Lx].")
flags.DEFINE_string("train_prompts", None, "Optional training prompts .npy: overlap is refused.")
flags.DEFINE_integer("num_samples", 4, "Responses per prompt and model.")
flags.DEFINE_integer("max_decode_len", 64, "Response length cap.")
flags.DEFINE_integer("batch_size", 16, "Prompts per device batch.")
flags.DEFINE_integer("seed", 0, "Seed of every sample (common random numbers).")
flags.DEFINE_enum("estimator", "rao_blackwell", list(evaluator.ESTIMATORS), "Estimator.")
flags.DEFINE_integer("model_parallel", 1, "Size of the mesh's model axis (data = the rest).")
flags.DEFINE_float("poll_seconds", 30.0, "Seconds between looks for new checkpoints.")
flags.DEFINE_float(
    "timeout", -1.0, "Exit after this many seconds without a new checkpoint (< 0: never)."
)
flags.DEFINE_integer(
    "stop_after_step", -1, "Exit once this step (or a later one) is evaluated (< 0: never)."
)


def build_evaluator() -> evaluator.Evaluator:
    if not FLAGS.student_config:
        raise EvalCliError("--student_config is required")
    oracle = load_model(FLAGS.oracle_ckpt, FLAGS.oracle_config, "oracle")
    teacher = load_model(FLAGS.teacher_ckpt, FLAGS.teacher_config, "teacher")
    student_config = load_config(FLAGS.student_config, "student_config")
    prompts = load_prompts(FLAGS.prompts, "prompts")
    train = load_prompts(FLAGS.train_prompts, "train_prompts") if FLAGS.train_prompts else None
    mesh = partitioning.make_mesh(partitioning.data_parallel_mesh_shape(FLAGS.model_parallel))
    return evaluator.Evaluator(
        oracle,
        teacher,
        student_config,
        prompts,
        evaluator.EvalSettings(
            FLAGS.num_samples,
            FLAGS.max_decode_len,
            seed=FLAGS.seed,
            batch_size=FLAGS.batch_size,
            estimator=FLAGS.estimator,
        ),
        mesh=mesh,
        train_prompts=train,
    )


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    try:
        ev = build_evaluator()
        steps = watcher.watch(
            FLAGS.workdir,
            ev,
            ckpt_subdir=FLAGS.ckpt_subdir,
            poll_seconds=FLAGS.poll_seconds,
            timeout=FLAGS.timeout if FLAGS.timeout >= 0 else None,
            stop_after_step=FLAGS.stop_after_step if FLAGS.stop_after_step >= 0 else None,
        )
    except (EvalCliError, FileNotFoundError, ValueError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 1
    print(f"evaluated steps: {steps}")
    return 0


def run() -> None:
    """Console script `thack-eval` (and `python launch/eval.py`)."""
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
