"""Runs the teacher-hacking experiment (all stages, or some) from gin files.

    python launch/train.py --gin_file=experiments/default.gin --workdir=/tmp/thack_default
    python launch/train.py --gin_file=experiments/default.gin --workdir=... \
        --stages=distill --runs=offline --gin_bindings="ExperimentConfig.seed = 1"
    python launch/train.py --gin_file=experiments/field_demo.gin --workdir=/tmp/thack_field

Gin files are looked up in --gin_search_paths, then in the repository's gin_configs/.
A configuration error (a gin file that does not parse, a field the config dataclasses
refuse, an unknown stage or run) stops it before anything is written to the workdir, with
one line `train.py: error: <dataclass>.<field>=<value> ...` and exit status 1.

SIGTERM (preemption, `timeout`) or SIGINT (Ctrl-C): the running training step finishes and
is checkpointed, no stage is marked complete, no later stage runs, and it exits with status
128 + the signal (143 / 130) and `train.py: interrupted by SIGTERM during distillation run
<name> at step <k> of <n> (checkpoint saved); rerun the same command to resume`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin files (relative to the search paths).")
flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. 'TrainConfig.seed = 1'.")
flags.DEFINE_multi_string("gin_search_paths", [], "Directories to search for gin files.")
flags.DEFINE_string("workdir", None, "Experiment directory (local path or gs://).")
flags.DEFINE_list(
    "stages",
    ["all"],
    "Stages to run: all, or some of oracle, oracle_data, teacher, student_init, distill, "
    "report (field mode: reference_data, teacher, student_init, distill, report).",
)
flags.DEFINE_list("runs", None, "Distillation runs to do (default: all configured).")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # orbax/absl INFO lines drown the progress lines.
        logging.set_verbosity(logging.WARNING)
    if not FLAGS.gin_file:
        raise app.UsageError("--gin_file is required, e.g. experiments/default.gin")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    # The configuration is built and checked before jax starts: it needs neither jax nor
    # the devices, so a typo fails in a second, on every host alike.
    from thack_jax.experiment import gin_registry

    try:
        gin_registry.parse(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
        cfg = gin_registry.experiment_config()
    except (gin_registry.GinConfigError, gin_registry.ConfigError) as e:
        raise SystemExit(f"train.py: error: {e}") from None
    from thack_jax.parallel import distributed

    distributed.initialize()  # Multi-host (Cloud TPU, GPU clusters); no-op otherwise.
    from thack_jax.experiment import runner

    stages = runner.stages_of(cfg) if FLAGS.stages == ["all"] else tuple(FLAGS.stages)
    try:
        runner.check_selection(cfg, stages, FLAGS.runs)
        runner.check_models(cfg)
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    print(f"[thack_jax] experiment {cfg.name} -> {FLAGS.workdir}, stages {stages}", flush=True)
    from thack_jax.core import interrupt

    try:
        runner.Experiment(cfg, FLAGS.workdir).run(stages, runs=FLAGS.runs)
    except interrupt.Interrupted as e:
        # Preemption is not success: no stage was marked complete, the status says so.
        print(f"train.py: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def run() -> None:
    """Console script `thack-train` (and `python launch/train.py`)."""
    app.run(main)


if __name__ == "__main__":
    run()
