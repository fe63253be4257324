"""One distillation run: its batch source, the inline evaluation, the hacking guard, the
snapshots of the students the guard may keep and, at the end, the exported students.

`distill` is called by `runner.Experiment.stage_distill` for each configured run (which
decides whether it runs and marks it complete). Workdir of a run (runs/<name>/):
    offline_data/           the run's offline set (offline and mixed regimes)
    train/                  checkpoints, metrics.jsonl, per_prompt/step_*.npz
    guard_settings.json     what the guard is fed; guard.json once it fired
    candidates/step_<k>/    the student at the evaluations the guard may still choose
    export/{final,guard_best}/  the exported students (HF format + model card), export.json
"""

from __future__ import annotations

import time

import jax
import numpy as np

from thack_jax.core import storage
from thack_jax.data import generation, regimes
from thack_jax.decoding.settings import SamplingConfig
from thack_jax.evaluation.evaluator import Evaluator, metrics_of
from thack_jax.experiment import export
from thack_jax.experiment.config import DECODER_SIZES, RunConfig
from thack_jax.experiment.stages import (
    StageContext,
    make_optimizer,
    stop_if_interrupted,
    write_json,
)
from thack_jax.hacking import noise
from thack_jax.hacking.guard import GUARD_FILE, HackingGuard, fit_start_step, guard_settings
from thack_jax.training import checkpoints, train_step, trainer
from thack_jax.training.metrics_io import read_metrics

# The metric the hacking guard watches (from the end of warmup, with its per-prompt values).
GUARD_KEY = "proxy/forward_kl"


def write_guard_settings(ctx: StageContext, run_dir: str) -> None:
    """<run_dir>/guard_settings.json: what the run's guard is fed (read by the report and
    launch/diagnose.py, so it is written even for a finished run)."""
    guard = HackingGuard(mode=ctx.cfg.guard_mode)
    first_step = fit_start_step(ctx.cfg.distill.warmup_steps)
    settings = guard_settings(first_step, GUARD_KEY, guard.config)
    write_json(storage.join(run_dir, GUARD_FILE), settings)


def last_checkpoint(ctx: StageContext, run: RunConfig) -> int | None:
    """The newest finalized checkpoint step of the run (runs/<name>/train/checkpoints), the
    one `trainer.train` resumes from, or None."""
    return checkpoints.latest_step(ctx.path("runs", run.name, "train", "checkpoints"))


def guard_stopped(ctx: StageContext, run: RunConfig) -> int | None:
    """The step at which the hacking guard stopped the run (guard_mode 'stop' and its
    guard.json, written when it fired), or None when it did not stop it."""
    path = ctx.path("runs", run.name, "guard.json")
    if ctx.cfg.guard_mode != "stop" or not storage.exists(path):
        return None
    return int(storage.read_json(path)["last_eval_step"])


def distill_source(ctx: StageContext, run: RunConfig, teacher, student_config):
    """The run's batch source; builds (or resumes) its offline set runs/<name>/offline_data."""
    cfg, tc = ctx.cfg, ctx.cfg.distill
    store = None
    if run.regime in ("offline", "mixed"):
        prompts = ctx.prompts("train", run.num_prompts, cfg.seed + 1000 + run.seed)
        store = generation.build_offline_store(
            ctx.path("runs", run.name, "offline_data"),
            model=teacher,
            prompts=prompts,
            generation=generation.GenerationConfig(
                generating_model="teacher",
                completions_per_prompt=run.completions_per_prompt,
                max_decode_len=cfg.max_target_length,
                seed=cfg.seed + 2000 + run.seed,
                vocab_fingerprint=ctx.vocab_fingerprint(),
            ),
            progress=ctx.progress,
            mesh=ctx.mesh,
        )
    pool = None
    if run.regime != "offline":
        pool = ctx.prompts("train", cfg.distill_prompt_pool, cfg.seed + 3000)
    source = regimes.SourceConfig(
        batch_size=tc.batch_size,
        seed=tc.seed + run.seed,
        online_fraction=run.online_fraction if run.regime == "mixed" else None,
        online_role=run.online_role,
        distill_temperature=tc.temperature,  # the sampler's log-probs only if they match
    )
    return regimes.make_source(
        run.regime,
        source,
        offline_store=store,
        prompts=pool,
        teacher=teacher,
        student_config=student_config,
        sampling=SamplingConfig(max_decode_len=cfg.max_target_length),
        mesh=ctx.mesh,
    )


def distill(ctx: StageContext, run: RunConfig, evaluator: Evaluator) -> float:
    """One distillation run into runs/<name>/train, evaluated at the configured steps and
    watched by the hacking guard; returns the wall seconds from building the batch source
    to the end of training.

    A resumed run (interrupted, or finished and extended to a larger num_steps:
    `markers.extension`) continues from its last checkpoint: the metrics lines up to it stay
    (the trainer drops only later ones), the guard replays their evaluations, later
    evaluations follow `EvalConfig.steps` of the current num_steps, the candidate snapshots
    on disk are those the replayed guard keeps, and the export is rewritten at the end."""
    cfg, tc = ctx.cfg, ctx.cfg.distill
    out = ctx.path("runs", run.name)
    metrics_path = storage.join(out, "train", "metrics.jsonl")
    guard = HackingGuard(mode=cfg.guard_mode)
    first_step = fit_start_step(tc.warmup_steps)
    teacher = ctx.load_model("teacher")
    student_config, student_params = ctx.load_model("student_init")
    last = {}
    per_prompt_dir = storage.join(out, "train", noise.PER_PROMPT_DIR)
    snapshots = export.StudentSnapshots(out, student_config)

    def update_guard(step, metrics, per_prompt):
        # The law holds after warmup; a non-positive estimate has no place in log-log axes.
        # No stderrs: every evaluation reuses the same prompts, so the stderr is the
        # uncertainty of the level; the per-prompt values give the error covariance across
        # evaluations instead (docs/diagnostics.md, section 2).
        if step >= first_step and metrics[GUARD_KEY] > 0:
            last["result"] = guard.update(step, metrics[GUARD_KEY], per_prompt=per_prompt)
            last["step"] = step
            if last["result"].fired and "fired_at" not in last:
                last["fired_at"] = step  # the first evaluation with guard/fired = 1
            return last["result"]
        return None

    def replay_logged_evaluations(before_step):
        # Resume: the guard's state is the logged curve up to the restored checkpoint. Read
        # at the first evaluation after the restore, when the trainer has already dropped
        # the lines logged after that checkpoint (a crash between two checkpoints leaves
        # evaluations the rerun repeats; replaying those too broke the first resume).
        last["replayed"] = True
        if not storage.exists(metrics_path):
            return
        for row in read_metrics(metrics_path):
            if GUARD_KEY in row and row["step"] < before_step:
                saved = noise.read_per_prompt(per_prompt_dir, row["step"])
                update_guard(row["step"], row, saved[GUARD_KEY])

    def eval_fn(step, params):
        if "replayed" not in last:
            replay_logged_evaluations(step)
        estimates = evaluator.estimates(params, step=step)
        metrics = metrics_of(estimates)
        per_prompt = {key: est.per_prompt for key, est in estimates.items()}
        if jax.process_index() == 0:  # kept for the report and launch/diagnose.py
            noise.save_per_prompt(per_prompt_dir, step, per_prompt)
        result = update_guard(step, metrics, per_prompt[GUARD_KEY])
        if result is not None:
            # The student of every evaluation the guard may still name as its best is kept
            # (on every process: gathering the params is a collective).
            keep = guard.candidate_steps()
            if step in keep:
                snapshots.save(step, params)
            snapshots.prune(keep)
            statistic = float(result.statistic)
            metrics["guard/statistic"] = statistic if np.isfinite(statistic) else 0.0
            metrics["guard/fired"] = float(result.fired)
        return metrics

    def stop_hook(step, metrics):
        result = last.get("result")
        if result is None or not result.fired:
            return False
        # The oracle-free rule's best checkpoint, for the user (guard_mode 'stop' keeps it).
        write_json(
            storage.join(out, "guard.json"),
            {
                "fired_at_eval_step": last["fired_at"],
                "best_step": result.best_step,
                "last_eval_step": last["step"],
            },
        )
        return bool(result.should_stop)

    opt, schedule = make_optimizer(tc)
    start = time.time()
    step_config = train_step.StepConfig(
        objective="distill",
        loss=tc.loss,
        temperature=tc.temperature,
        num_microbatches=tc.num_microbatches,
    )
    result = trainer.train(
        workdir=storage.join(out, "train"),
        student=trainer.Student(student_config, student_params, opt, step_config, schedule),
        source=distill_source(ctx, run, teacher, student_config),
        loop=trainer.LoopConfig(
            tc.num_steps,
            checkpoint_every=tc.checkpoint_every,
            eval_steps=cfg.evaluation.steps(tc.num_steps),
            progress=ctx.progress,
            seed=tc.seed + run.seed,
        ),
        teacher=trainer.Teacher(*teacher),
        hooks=trainer.Hooks(eval_fn, stop=(stop_hook,)),
        mesh=ctx.mesh,
    )
    stop_if_interrupted(result, f"distillation run {run.name}", tc.num_steps)
    if "replayed" not in last:  # resumed at its end: no evaluation ran in this process
        replay_logged_evaluations(int(result.state.step) + 1)
    export_run(ctx, run, result, last, metrics_path)
    return time.time() - start


def export_run(ctx: StageContext, run: RunConfig, result, last: dict, metrics_path: str) -> dict:
    """Exports the run's final student and the guard's (runs/<name>/export/)."""
    cfg = ctx.cfg
    final_step = int(result.state.step)
    best_step = last["result"].best_step if "result" in last else final_step
    kind = "decoder-only" if cfg.teacher.size in DECODER_SIZES else "T5"
    teacher = cfg.teacher.checkpoint or f"{kind} '{cfg.teacher.size}' (SFT in this experiment)"
    metrics = {}
    for row in read_metrics(metrics_path):
        if GUARD_KEY in row:
            metrics[row["step"]] = {k: v for k, v in row.items() if k != "step"}
    card = export.CardInfo(
        run.name,
        run.regime,
        f"{teacher}; mode {cfg.mode}",
        cfg.distill.num_steps,
        metrics=metrics,
        fired_at=last.get("fired_at"),
        family=getattr(ctx.cfg.model_config("student"), "family", "t5"),
    )
    return export.export_students(
        ctx.path("runs", run.name),
        config=ctx.cfg.model_config("student"),
        final_params=result.state.params,
        final_step=final_step,
        best_step=best_step,
        card=card,
    )
