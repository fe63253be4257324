"""The teacher-hacking experiment: oracle -> oracle data -> teacher SFT -> student SFT ->
distillation runs (with periodic evaluation) -> report.

Every stage writes into its own directory of the workdir and finishes by writing
`COMPLETE.json` (with the fingerprint of the configuration it ran under); a rerun skips
complete stages and resumes interrupted ones (training resumes from its checkpoints, the
offline stores from their last chunk). This module is the orchestration and the workdir's
bookkeeping; the work of each stage is in stages.py. Workdir layout:

    experiment.json             the shared configuration (refused if it differs)
    oracle/model/               HF safetensors (config.json + model.safetensors)
    oracle_data/                oracle completions on training prompts (offline store)
    teacher/{train,model}/      SFT run (checkpoints, metrics.jsonl) and exported model
    student_init/{train,model}/ the initial student, same layout
    eval_prompts.npy            held-out prompts of the evaluator
    runs/<name>/offline_data/   the run's offline set (offline and mixed regimes)
    runs/<name>/train/          distillation checkpoints and metrics.jsonl
    report.md, plots/*.png      the report (report.py)
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from thack_jax.evaluation.evaluator import EvalSettings, Evaluator
from thack_jax.experiment import stages as stage_work
from thack_jax.experiment.config import ROLES, ExperimentConfig, RunConfig, diff, to_json
from thack_jax.experiment.config import fingerprint as config_fingerprint
from thack_jax.parallel import partitioning

logger = logging.getLogger(__name__)

SHARED_STAGES = ("oracle", "oracle_data", "teacher", "student_init")
STAGES = (*SHARED_STAGES, "distill", "report")


class ExperimentMismatchError(ValueError):
    """The workdir holds stages of an experiment with another configuration."""


def _shared_section(cfg: ExperimentConfig) -> dict:
    """The part of the configuration that the shared stages depend on."""
    shared = to_json(cfg)
    for key in ("runs", "distill", "evaluation", "guard_mode", "distill_prompt_pool", "name"):
        shared.pop(key)
    return shared


def check_selection(
    cfg: ExperimentConfig, stages=STAGES, runs: tuple[str, ...] | None = None
) -> None:
    """Refuses unknown stage names and run names (None: all runs), before anything runs."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; valid stages: {list(STAGES)}")
    missing = sorted(set(runs or ()) - {r.name for r in cfg.runs})
    if missing:
        raise ValueError(f"unknown run(s) {missing}; configured: {[r.name for r in cfg.runs]}")


def check_models(cfg: ExperimentConfig) -> None:
    """Builds the three T5Configs (size names, overrides), so that a typo there is refused
    before the workdir is touched rather than when the first stage needs the model."""
    for role in ROLES:
        try:
            cfg.model_config(role)
        except (ValueError, TypeError) as e:
            raise ValueError(f"ExperimentConfig.{role}: {e}") from e


def check_workdir(cfg: ExperimentConfig, workdir: str) -> None:
    """Writes experiment.json, or refuses a workdir made under another configuration."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "experiment.json")
    requested = _shared_section(cfg)
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        differences = diff(stored, requested)
        if differences:
            raise ExperimentMismatchError(
                f"workdir {workdir} holds another experiment's stages ({path}); differing "
                "fields:\n  " + "\n  ".join(differences) + "\nUse a new workdir."
            )
    else:
        stage_work.write_json(path, requested)


def _is_complete(directory: str, fp: str) -> bool:
    path = os.path.join(directory, "COMPLETE.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        stored = json.load(f).get("fingerprint")
    if stored != fp:
        raise ExperimentMismatchError(
            f"{path} was written under configuration {stored}, this run is {fp}; the stage "
            "config changed. Use a new workdir (or a new run name)."
        )
    return True


def _mark_complete(directory: str, fp: str, **info) -> None:
    stage_work.write_json(os.path.join(directory, "COMPLETE.json"), {"fingerprint": fp, **info})


class Experiment(stage_work.StageContext):
    """Runs the stages of one ExperimentConfig in one workdir: skips the complete ones (their
    COMPLETE.json fingerprint must match) and marks the ones it finishes."""

    def __init__(self, cfg: ExperimentConfig, workdir: str, progress: bool = True):
        super().__init__(cfg, workdir, partitioning.make_mesh(dict(cfg.mesh_shape)), progress)
        check_models(cfg)
        check_workdir(cfg, workdir)

    # ------------------------------------------------------------------ stages
    def stage_oracle(self) -> None:
        cfg, out = self.cfg, self.path("oracle")
        fp = config_fingerprint([cfg.oracle, cfg.oracle_logit_scale])
        if _is_complete(out, fp):
            return
        stage_work.oracle(self)
        _mark_complete(out, fp)

    def stage_oracle_data(self) -> None:
        cfg, out = self.cfg, self.path("oracle_data")
        fp = config_fingerprint([cfg.oracle, cfg.oracle_logit_scale, cfg.oracle_data_prompts])
        if _is_complete(out, fp):
            return
        stage_work.oracle_data(self)
        _mark_complete(out, fp)

    def stage_sft(self, role: str) -> None:
        """SFT of `role` ('teacher' or 'student') on the oracle data -> <dir>/model."""
        cfg, s = self.cfg, stage_work.sft_settings(self.cfg, role)
        fp = config_fingerprint([s.spec, s.train, s.limit, cfg.oracle_data_prompts, s.logit_scale])
        if _is_complete(self.path(s.directory), fp):
            return
        n = stage_work.sft(self, role)
        _mark_complete(self.path(s.directory), fp, sft_examples=n)

    def eval_prompts(self) -> np.ndarray:
        """Held-out prompts (validation split, fixed by the eval seed), cached as .npy."""
        path = self.path("eval_prompts.npy")
        ev = self.cfg.evaluation
        prompts = self.prompts("validation", ev.num_prompts, ev.seed)
        if os.path.exists(path):
            stored = np.load(path, allow_pickle=False)
            if not np.array_equal(stored, prompts):
                raise ExperimentMismatchError(f"{path} differs from the configured eval prompts")
        else:
            np.save(path, prompts, allow_pickle=False)
        return prompts

    def evaluator(self) -> Evaluator:
        ev = self.cfg.evaluation
        return Evaluator(
            oracle=self.load_model("oracle"),
            teacher=self.load_model("teacher"),
            student_config=self.cfg.model_config("student"),
            prompts=self.eval_prompts(),
            settings=EvalSettings(
                ev.num_samples,
                self.cfg.max_target_length,
                seed=ev.seed,
                batch_size=ev.batch_size,
                estimator=ev.estimator,
            ),
            mesh=self.mesh,
        )

    def stage_distill(self, run: RunConfig, evaluator: Evaluator | None = None) -> str:
        """One distillation run with periodic evaluation; returns its metrics path."""
        cfg = self.cfg
        out = self.path("runs", run.name)
        fp = config_fingerprint([run, cfg.distill, cfg.evaluation, cfg.guard_mode])
        metrics_path = os.path.join(out, "train", "metrics.jsonl")
        stage_work.write_guard_settings(self, out)  # also for a finished run: the report reads it
        if _is_complete(out, fp):
            return metrics_path
        stage_work.write_json(os.path.join(out, "run.json"), to_json(run))
        seconds = stage_work.distill(self, run, evaluator or self.evaluator())
        _mark_complete(out, fp, wall_seconds=round(seconds, 1))
        return metrics_path

    # --------------------------------------------------------------------- run
    def run(self, stages=STAGES, runs: tuple[str, ...] | None = None) -> None:
        check_selection(self.cfg, stages, runs)
        timings = {}
        for stage in STAGES:
            if stage not in stages:
                continue
            start = time.time()
            logger.info("stage %s", stage)
            if stage == "oracle":
                self.stage_oracle()
            elif stage == "oracle_data":
                self.stage_oracle_data()
            elif stage == "teacher":
                self.stage_sft("teacher")
            elif stage == "student_init":
                self.stage_sft("student")
            elif stage == "distill":
                selected = [r for r in self.cfg.runs if runs is None or r.name in runs]
                evaluator = self.evaluator() if selected else None
                for run in selected:
                    self.stage_distill(run, evaluator)
            elif stage == "report":
                from thack_jax.reporting import report

                report.write_report([self.workdir], self.workdir)
            timings[stage] = round(time.time() - start, 1)
            print(f"[thack_jax] stage {stage} done in {timings[stage]} s", flush=True)
