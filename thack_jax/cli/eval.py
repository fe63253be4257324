r"""Separate-process evaluator: watches a training workdir, evaluates each new checkpoint once.

A run of an experiment (the settings, models, prompts and references are the run's own,
from `<experiment>/eval_settings.json`; flags given on the command line override them):

  python launch/eval.py --workdir=workdirs/default/runs/offline --stop_after_step=1200

Standalone (any workdir with orbax student checkpoints under `<workdir>/<ckpt_subdir>`,
not a `runs/<name>` directory; every setting from the flags):

  python launch/eval.py --workdir=workdirs/default/runs/offline/train \
    --ckpt_subdir=checkpoints --oracle_ckpt=workdirs/default/oracle/model \
    --teacher_ckpt=workdirs/default/teacher/model \
    --student_config=workdirs/default/student_init/model/config.json \
    --prompts=workdirs/default/eval_prompts.npy --num_samples=2 --max_decode_len=12

(`--mode=field` without `--oracle_ckpt`: the proxy and reference metrics only;
`--references=FILE.npy`: one reference response per prompt, int [N, Ly].)

Reads student checkpoints from `<workdir>/<ckpt_subdir>` (orbax, only finalized steps),
writes `<workdir>/eval_metrics.jsonl` and `<workdir>/eval_state.json`; restartable (see
`thack_jax.evaluation.watcher.watch`). When `--workdir` is `<experiment>/runs/<name>` and
`<experiment>/eval_settings.json` exists (the experiment runner writes it), every flag not
given takes the run's value (`eval_inputs.run_settings`: samples, length, seed, batch
size, estimator, mode, prompts, references, the experiment's oracle/teacher models, the
student config of `student_init/model/config.json`, ckpt_subdir `train/checkpoints`), so
the metrics are the inline evaluator's. A reference checkpoint (`--oracle_ckpt`,
`--teacher_ckpt`) is either a Hugging Face directory (config.json + model.safetensors) or
an orbax checkpoint directory (its newest finalized step is read; its config comes from
`--oracle_config` / `--teacher_config`). A config is a size name (`tiny`, `small`, ...) or
a JSON file: a Hugging Face config.json, or T5Config fields (`dataclasses.asdict(config)`).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from thack_jax.cli import common, eval_inputs
from thack_jax.cli.eval_inputs import EvalCliError, load_config, load_model, load_prompts
from thack_jax.evaluation import evaluator, watcher
from thack_jax.parallel import partitioning

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(common)  # --help lists --verbose
flags.DEFINE_string("workdir", None, "Training workdir to watch.")
flags.DEFINE_string("ckpt_subdir", "checkpoints", "Student checkpoints, relative to --workdir.")
flags.DEFINE_string("oracle_ckpt", None, "Oracle: HF safetensors dir or orbax checkpoint dir.")
flags.DEFINE_string("teacher_ckpt", None, "Teacher: HF safetensors dir or orbax checkpoint dir.")
flags.DEFINE_string("oracle_config", None, "Oracle config (size name or JSON); orbax dirs only.")
flags.DEFINE_string("teacher_config", None, "Teacher config (size name or JSON); orbax only.")
flags.DEFINE_string("student_config", None, "Student config: size name or JSON file.")
flags.DEFINE_string("prompts", None, "Held-out prompts, an int .npy file [N, Lx].")
flags.DEFINE_string("references", None, "Optional reference responses, an int .npy [N, Ly].")
flags.DEFINE_string("train_prompts", None, "Optional training prompts .npy: overlap is refused.")
flags.DEFINE_enum(
    "mode", "oracle", list(eval_inputs.MODES), "oracle: golden metrics; field: no oracle."
)
flags.DEFINE_integer("num_samples", 4, "Responses per prompt and model.")
flags.DEFINE_integer("max_decode_len", 64, "Response length cap.")
flags.DEFINE_integer("batch_size", 16, "Prompts per device batch.")
flags.DEFINE_integer("seed", 0, "Seed of every sample (common random numbers).")
flags.DEFINE_enum("estimator", "rao_blackwell", list(evaluator.ESTIMATORS), "Estimator.")
flags.DEFINE_integer(
    "reference_cache_mib",
    2048,
    "Device memory (MiB) for the reference models' own log-probs, computed once (0: none).",
)
flags.DEFINE_integer("model_parallel", 1, "Size of the mesh's model axis (data = the rest).")
flags.DEFINE_float("poll_seconds", 30.0, "Seconds between looks for new checkpoints.")
flags.DEFINE_float(
    "timeout", -1.0, "Exit after this many seconds without a new checkpoint (< 0: never)."
)
flags.DEFINE_integer(
    "stop_after_step", -1, "Exit once this step (or a later one) is evaluated (< 0: never)."
)


# The flags a run's eval_settings.json can supply (eval_inputs.run_settings).
RUN_FLAGS = (
    "num_samples",
    "max_decode_len",
    "seed",
    "batch_size",
    "estimator",
    "mode",
    "prompts",
    "references",
    "oracle_ckpt",
    "teacher_ckpt",
    "student_config",
    "ckpt_subdir",
)


def resolved_flags() -> dict:
    """The values of RUN_FLAGS: the command line's, else the run's settings file's (when
    --workdir is a run of an experiment), else the flag defaults."""
    values = {name: FLAGS[name].value for name in RUN_FLAGS}
    found = eval_inputs.run_settings(FLAGS.workdir)
    if found is None:
        return values
    path, run_values = found
    given = sorted(name for name in RUN_FLAGS if FLAGS[name].present)
    values |= {name: value for name, value in run_values.items() if not FLAGS[name].present}
    print(f"eval.py: settings from {path} (overridden by the command line: {given or 'none'})")
    return values


def build_evaluator(values: dict) -> evaluator.Evaluator:
    """The Evaluator of the resolved flag values (see `resolved_flags`)."""
    if not values["student_config"]:
        raise EvalCliError("--student_config is required")
    oracle = None
    if values["mode"] == "oracle":
        oracle = load_model(values["oracle_ckpt"], FLAGS.oracle_config, "oracle")
    elif values["oracle_ckpt"]:
        raise EvalCliError(
            f"--oracle_ckpt={values['oracle_ckpt']} given in field mode; pass --mode=oracle"
        )
    teacher = load_model(values["teacher_ckpt"], FLAGS.teacher_config, "teacher")
    student_config = load_config(values["student_config"], "student_config")
    prompts = load_prompts(values["prompts"], "prompts")
    refs = values["references"]
    refs = eval_inputs.load_references(refs, "references") if refs else None
    train = load_prompts(FLAGS.train_prompts, "train_prompts") if FLAGS.train_prompts else None
    mesh = partitioning.make_mesh(partitioning.data_parallel_mesh_shape(FLAGS.model_parallel))
    return evaluator.Evaluator(
        oracle,
        teacher,
        student_config,
        prompts,
        evaluator.EvalSettings(
            values["num_samples"],
            values["max_decode_len"],
            seed=values["seed"],
            batch_size=values["batch_size"],
            estimator=values["estimator"],
            reference_cache_mib=FLAGS.reference_cache_mib,
        ),
        mesh=mesh,
        train_prompts=train,
        references=refs,
        # The experiment's own references in oracle mode are oracle samples (eval_setup).
        references_sampled=values["mode"] == "oracle" and not FLAGS.references,
    )


def main(argv):
    del argv
    # The watcher's progress lines (INFO); absl's and orbax's INFO stay hidden (common.run).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    values = resolved_flags()
    ev = build_evaluator(values)
    steps = watcher.watch(
        FLAGS.workdir,
        ev,
        ckpt_subdir=values["ckpt_subdir"],
        poll_seconds=FLAGS.poll_seconds,
        timeout=FLAGS.timeout if FLAGS.timeout >= 0 else None,
        stop_after_step=FLAGS.stop_after_step if FLAGS.stop_after_step >= 0 else None,
    )
    print(f"evaluated steps: {steps}")
    return 0


def run() -> None:
    """Console script `thack-eval` (and `python launch/eval.py`)."""
    common.run(
        lambda argv: sys.exit(main(argv)), "eval.py", (EvalCliError, *common.EXPECTED_ERRORS)
    )


if __name__ == "__main__":
    run()
