"""Runs the teacher-hacking experiment (all stages, or some) from gin files.

    python launch/train.py --gin_file=experiments/default.gin --workdir=workdirs/default
    python launch/train.py --gin_file=experiments/default.gin --workdir=workdirs/default \
        --stages=distill --runs=offline --gin_bindings="distill/TrainConfig.num_steps = 3000"
    python launch/train.py --gin_file=experiments/default.gin --workdir=workdirs/seed1 \
        --gin_bindings="ExperimentConfig.seed = 1" --dry_run
    python launch/train.py --gin_file=experiments/field_demo.gin --workdir=workdirs/field_demo

The second line extends the finished offline run to 3000 steps (it resumes from its last
checkpoint); the third checks a configuration and prints what would run, writing nothing.

Gin files are looked up in --gin_search_paths, then in the package's gin_configs/, then
relative to the current folder. A configuration error (a gin file that does not parse, a
field the config dataclasses refuse, an unknown stage or run, a workdir made under another
configuration) stops it before anything is written to the workdir, with one line
`train.py: error: <message>` (the file, field and value) and exit status 1; `--verbose`
shows the traceback instead.

SIGTERM (preemption, `timeout`) or SIGINT (Ctrl-C): the running training step finishes and
is checkpointed, no stage is marked complete, no later stage runs, and it exits with status
128 + the signal (143 / 130) and `train.py: interrupted by SIGTERM during distillation run
<name> at step <k> of <n> (checkpoint saved); rerun the same command to resume`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from thack_jax.cli import common

FLAGS = flags.FLAGS
common.define_gin_flags()
flags.adopt_module_key_flags(common)  # --help lists the gin flags and --verbose
flags.DEFINE_string("workdir", None, "Experiment directory (local path or gs://).")
flags.DEFINE_list(
    "stages",
    ["all"],
    "Stages to run: all, or some of oracle, oracle_data, teacher, student_init, distill, "
    "report (field mode: reference_data, teacher, student_init, distill, report).",
)
flags.DEFINE_list("runs", None, "Distillation runs to do (default: all configured).")
flags.DEFINE_bool(
    "dry_run",
    False,
    "Check the configuration, the stage and run names and the workdir (no jax, writes "
    "nothing), print what would run, and exit.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    cfg = common.experiment_config("train.py")
    from thack_jax.experiment import runner

    stages = runner.stages_of(cfg) if FLAGS.stages == ["all"] else tuple(FLAGS.stages)
    runner.check_selection(cfg, stages, FLAGS.runs)
    runner.check_models(cfg)
    if FLAGS.dry_run:
        runner.check_workdir(cfg, FLAGS.workdir, write=False)
        runs = [r.name for r in cfg.runs if FLAGS.runs is None or r.name in FLAGS.runs]
        print(f"[thack_jax] dry run: experiment {cfg.name} ({cfg.mode} mode) -> {FLAGS.workdir}")
        print(f"[thack_jax] stages {list(stages)}; runs {runs}; nothing written")
        return
    from thack_jax.parallel import distributed

    distributed.initialize()  # Multi-host (Cloud TPU, GPU clusters); no-op otherwise.
    print(f"[thack_jax] experiment {cfg.name} -> {FLAGS.workdir}, stages {stages}", flush=True)
    from thack_jax.core import interrupt

    try:
        runner.Experiment(cfg, FLAGS.workdir).run(stages, runs=FLAGS.runs)
        distributed.shutdown()  # every process passed run()'s last barrier: leave together
    except interrupt.Interrupted as e:
        # Preemption is not success: no stage was marked complete, the status says so.
        print(f"train.py: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def run() -> None:
    """Console script `thack-train` (and `python launch/train.py`)."""
    common.run(main, "train.py")


if __name__ == "__main__":
    run()
