"""The teacher-hacking experiment: oracle -> oracle data -> teacher SFT -> student SFT ->
distillation runs (with periodic evaluation) -> report; in field mode (no oracle):
reference data -> teacher (checkpoint or SFT) -> student SFT -> distillation runs -> report.

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
    reference_data/             field mode: the task's training examples (offline store)
    eval_prompts.npy            held-out prompts of the evaluator
    eval_references.npy         one reference response per held-out prompt (field mode: the
                                task's; oracle mode: an oracle sample)
    eval_settings.json          the evaluator's settings (read by launch/eval.py)
    reference_levels.json       oracle mode: the teacher's and the initial student's golden
                                divergences, the oracle's entropy (reference_levels.py)
    runs/<name>/offline_data/   the run's offline set (offline and mixed regimes)
    runs/<name>/train/          distillation checkpoints and metrics.jsonl
    report.md, plots/*.png      the report (report.py)
"""

from __future__ import annotations

import logging
import time

import numpy as np

from thack_jax.core import interrupt, storage
from thack_jax.evaluation.evaluator import Evaluator
from thack_jax.experiment import distillation, eval_setup, markers, worlds
from thack_jax.experiment import stages as stage_work
from thack_jax.experiment.config import (
    ExperimentConfig,
    ExperimentMismatchError,
    RunConfig,
    diff,
    to_json,
)
from thack_jax.parallel import distributed, partitioning

logger = logging.getLogger(__name__)

SHARED_STAGES = ("oracle", "oracle_data", "reference_data", "teacher", "student_init")
STAGES = (*SHARED_STAGES, "distill", "report")
# The stages of each mode, in order (field mode: no oracle; the SFTs read the references).
MODE_STAGES = {
    "oracle": ("oracle", "oracle_data", "teacher", "student_init", "distill", "report"),
    "field": ("reference_data", "teacher", "student_init", "distill", "report"),
}


# The artifact each shared stage leaves for later stages, and the stages each one reads.
STAGE_OUTPUTS = {
    "oracle": "oracle/model",
    "oracle_data": "oracle_data",
    "reference_data": "reference_data",
    "teacher": "teacher/model",
    "student_init": "student_init/model",
}
STAGE_INPUTS = {
    "oracle": (),
    "oracle_data": ("oracle",),
    "reference_data": (),
    "teacher": ("oracle_data",),
    "student_init": ("oracle_data",),
    "distill": ("oracle", "teacher", "student_init"),
}
FIELD_STAGE_INPUTS = {
    "teacher": ("reference_data",),
    "student_init": ("reference_data",),
    "distill": ("teacher", "student_init"),
}


def stages_of(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The stages of `cfg`'s mode, in order."""
    return MODE_STAGES[cfg.mode]


def stage_inputs(cfg: ExperimentConfig, stage: str) -> tuple[str, ...]:
    """The shared stages whose outputs `stage` reads, in `cfg`'s mode."""
    if cfg.mode == "field":
        return FIELD_STAGE_INPUTS.get(stage, STAGE_INPUTS[stage])
    return STAGE_INPUTS[stage]


class ChangedInputError(ExperimentMismatchError):
    """A file a finished stage wrote was changed (or damaged) before a later stage read it."""


def _shared_section(cfg: ExperimentConfig) -> dict:
    """The part of the configuration that the shared stages depend on, with the seeds of
    its world (worlds.in_world; a world > 0 also records the world and the base seeds)."""
    cfg = worlds.in_world(cfg)  # idempotent: a mapped configuration is kept as it is
    shared = to_json(cfg)
    for key in ("runs", "distill", "evaluation", "guard_mode", "distill_prompt_pool", "name"):
        shared.pop(key)
    if cfg.mode == "oracle":
        # Written as before field mode existed, so that older oracle workdirs stay valid.
        del shared["mode"], shared["reference_examples"]
    if cfg.world == 0:  # likewise written as before worlds existed
        del shared["world"]
    else:
        shared[worlds.BASE_KEY] = worlds.base_seeds(cfg, shared)
    return shared


def check_selection(
    cfg: ExperimentConfig, stages=None, runs: tuple[str, ...] | None = None
) -> None:
    """Refuses unknown stage names (None: all the mode's stages), stages of the other mode,
    and unknown run names (None: all runs), before anything runs."""
    valid = stages_of(cfg)
    unknown = sorted(set(stages or valid) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; valid stages: {list(valid)}")
    other = sorted(set(stages or valid) - set(valid))
    if other:
        raise ValueError(
            f"stage(s) {other} do not exist in ExperimentConfig.mode={cfg.mode!r}; its stages: "
            f"{list(valid)}"
        )
    missing = sorted(set(runs or ()) - {r.name for r in cfg.runs})
    if missing:
        raise ValueError(f"unknown run(s) {missing}; configured: {[r.name for r in cfg.runs]}")


def check_models(cfg: ExperimentConfig) -> None:
    """Builds the mode's model configs (size names, overrides), so that a typo there is
    refused before the workdir is touched rather than when the first stage needs the model;
    and refuses roles of different vocabularies (distillation and every divergence compare
    distributions over one vocabulary), naming each role's size."""
    sizes = {}
    for role in cfg.roles:
        try:
            sizes[role] = cfg.model_config(role).vocab_size
        except (ValueError, TypeError) as e:
            raise ValueError(f"ExperimentConfig.{role}: {e}") from e
    if len(set(sizes.values())) > 1:
        named = ", ".join(f"{role} {size}" for role, size in sizes.items())
        raise ValueError(
            f"the roles' vocabularies differ ({named}): distillation and the divergences "
            "compare distributions over one vocabulary; give every role the same vocab_size "
            "(a checkpoint's padded vocabulary, e.g. Qwen2.5-0.5B's 151936 against the 7B's "
            "152064, needs the others' overrides to match)"
        )


def check_workdir(cfg: ExperimentConfig, workdir: str, write: bool = True) -> None:
    """Writes experiment.json (`write`), or refuses a workdir made under another
    configuration. Refuses a workdir scheme storage cannot write (storage.check_scheme)."""
    storage.check_scheme(workdir)
    if write:
        storage.makedirs(workdir)
    path = storage.join(workdir, "experiment.json")
    requested = _shared_section(cfg)
    if storage.exists(path):
        stored = storage.read_json(path)
        differences = diff(stored, requested)
        if differences:
            raise ExperimentMismatchError(
                f"workdir {workdir} holds another experiment's stages ({path}); differing "
                "fields:\n  " + "\n  ".join(differences) + "\nUse a new workdir."
            )
    elif write:
        stage_work.write_json(path, requested)


class Experiment(stage_work.StageContext):
    """Runs the stages of one ExperimentConfig in one workdir: skips the complete ones (their
    COMPLETE.json fingerprint must match) and marks the ones it finishes.

    A finished shared stage records the sha256 of every file it left for later stages
    (`STAGE_OUTPUTS`) in its COMPLETE.json; a stage that reads them first checks that they
    are unchanged (ChangedInputError naming the file otherwise), and its own fingerprint
    covers those digests, so a retrained teacher invalidates the distillation runs made
    from the old one instead of being silently mixed with them."""

    def __init__(self, cfg: ExperimentConfig, workdir: str, progress: bool = True):
        # Every stage reads the seeds of cfg's world (the identity in world 0); once here.
        cfg = worlds.in_world(cfg)
        super().__init__(cfg, workdir, partitioning.make_mesh(dict(cfg.mesh_shape)), progress)
        check_models(cfg)
        check_workdir(cfg, workdir)
        distributed.check_shared_workdir(workdir)  # multi-process: one workdir, or refuse
        self._verified: dict[str, dict[str, str]] = {}  # stage -> its checked output digests

    # ------------------------------------------------------------- bookkeeping
    def stage_outputs(self, stage: str) -> dict[str, str]:
        """The digests `stage` recorded for its output, checked against the files now."""
        if stage in self._verified:
            return self._verified[stage]
        marker = self.path(stage, "COMPLETE.json")
        output = STAGE_OUTPUTS[stage]
        if not storage.exists(marker):
            raise ExperimentMismatchError(
                f"{self.path(output)} is read by a later stage but stage {stage!r} is not "
                f"complete ({marker} missing); run --stages={stage} first"
            )
        recorded = storage.read_json(marker).get("outputs")
        if recorded is None:
            raise ExperimentMismatchError(
                f"{marker} records no output digests (written by an older thack_jax); "
                "use a new workdir"
            )
        current = markers.file_digests(self.path(output))
        for name in sorted(set(recorded) | set(current)):
            if recorded.get(name) != current.get(name):
                path = self.path(output, name)
                what = "is missing" if name not in current else "was changed or damaged"
                if name not in recorded:
                    what = "was added"
                raise ChangedInputError(
                    f"{path} {what} after stage {stage!r} finished (sha256 recorded "
                    f"{recorded.get(name)}, now {current.get(name)}); restore it, or delete "
                    f"{marker} to redo the stage (and the stages after it)"
                )
        self._verified[stage] = recorded
        return recorded

    def inputs_of(self, stage: str) -> dict[str, dict[str, str]]:
        """{producing stage: its checked output digests} for everything `stage` reads."""
        return {
            producer: self.stage_outputs(producer) for producer in stage_inputs(self.cfg, stage)
        }

    def _run_shared(self, stage: str, parts: dict, work) -> bool:
        """Skips `stage` if complete under this configuration (`parts`: {name: value}) and
        these inputs, else runs `work()` (returning extra COMPLETE.json fields) and marks it
        complete. Returns whether it ran."""
        out = self.path(stage)
        fp, config = markers.stage_config(parts, self.inputs_of(stage))
        if markers.is_complete(out, fp, config):
            self.stage_outputs(stage)  # a damaged output is found now, not by its reader
            return False
        info = work() or {}
        outputs = markers.file_digests(self.path(STAGE_OUTPUTS[stage]))
        markers.mark_complete(out, fp, config, outputs=outputs, **info)
        self._verified[stage] = outputs
        return True

    # ------------------------------------------------------------------ stages
    def stage_oracle(self) -> bool:
        cfg = self.cfg
        parts = {"oracle": cfg.oracle, "oracle_logit_scale": cfg.oracle_logit_scale}
        return self._run_shared("oracle", parts, lambda: stage_work.oracle(self))

    def stage_oracle_data(self) -> bool:
        cfg = self.cfg
        parts = {
            "oracle": cfg.oracle,
            "oracle_logit_scale": cfg.oracle_logit_scale,
            "oracle_data_prompts": cfg.oracle_data_prompts,
        }
        return self._run_shared("oracle_data", parts, lambda: stage_work.oracle_data(self))

    def stage_reference_data(self) -> bool:
        """Field mode: the task's training examples with their references -> reference_data/."""
        cfg = self.cfg
        names = ("task", "task_options", "reference_examples", "seed")
        names += ("max_input_length", "max_target_length")
        parts = {name: getattr(cfg, name) for name in names}
        return self._run_shared("reference_data", parts, lambda: stage_work.reference_data(self))

    def stage_sft(self, role: str) -> bool:
        """SFT of `role` ('teacher' or 'student') on the oracle data (field mode: the
        references) -> <dir>/model."""
        cfg, s = self.cfg, stage_work.sft_settings(self.cfg, role)
        examples = cfg.oracle_data_prompts if cfg.mode == "oracle" else cfg.reference_examples
        parts = {
            role: s.spec,
            f"{role}_sft": s.train,
            f"{role}_sft_examples": s.limit,
            "oracle_data_prompts" if cfg.mode == "oracle" else "reference_examples": examples,
            f"{role}_logit_scale": s.logit_scale,
        }
        return self._run_shared(
            s.directory, parts, lambda: {"sft_examples": stage_work.sft(self, role)}
        )

    def eval_prompts(self) -> np.ndarray:
        """Held-out prompts [N, Lx] of the evaluator (eval_setup.py), cached as .npy."""
        return eval_setup.eval_prompts(self)

    def evaluator(self) -> Evaluator:
        """The inline evaluator of every run (and eval_settings.json for launch/eval.py)."""
        return eval_setup.build_evaluator(self)

    def _distill_config(self, run: RunConfig) -> tuple[str, dict]:
        cfg = self.cfg
        parts = {
            "run": run,
            "distill": cfg.distill,
            "evaluation": cfg.evaluation,
            "guard_mode": cfg.guard_mode,
        }
        return markers.stage_config(parts, self.inputs_of("distill"))

    def _run_state(self, run: RunConfig) -> tuple[bool, markers.Extension | None]:
        """(complete, extension): a finished run whose only change is a larger step budget
        is not complete but extended (markers.extension says when that is refused)."""
        out = self.path("runs", run.name)
        fp, config = self._distill_config(run)
        extension = markers.extension(
            out,
            fp,
            config,
            last_checkpoint=lambda: distillation.last_checkpoint(self, run),
            guard_stopped=lambda: distillation.guard_stopped(self, run),
        )
        if extension is not None:
            return False, extension
        return markers.is_complete(out, fp, config), None

    def run_is_complete(self, run: RunConfig) -> bool:
        """Whether `run` finished under this configuration (another one is refused, naming
        the fields that differ; a larger distill.num_steps alone extends the run)."""
        return self._run_state(run)[0]

    def stage_distill(self, run: RunConfig, evaluator: Evaluator | None = None) -> str:
        """One distillation run with periodic evaluation; returns its metrics path. A
        finished run given a larger step budget resumes from its last checkpoint."""
        out = self.path("runs", run.name)
        metrics_path = storage.join(out, "train", "metrics.jsonl")
        distillation.write_guard_settings(self, out)  # also for a finished run: the report reads it
        complete, extension = self._run_state(run)
        if complete:
            return metrics_path
        if extension is not None:
            print(extension.line(run.name), flush=True)
        stage_work.write_json(storage.join(out, "run.json"), to_json(run))
        seconds = distillation.distill(self, run, evaluator or self.evaluator())
        fp, config = self._distill_config(run)
        info = (
            extension.complete_info(seconds) if extension else {"wall_seconds": round(seconds, 1)}
        )
        markers.mark_complete(out, fp, config, **info)
        return metrics_path

    def _run_distill(self, runs: tuple[str, ...] | None) -> bool:
        """The selected runs in order; the evaluator is built once, for the first run with
        work left. Returns whether any run ran."""
        selected = [r for r in self.cfg.runs if runs is None or r.name in runs]
        self.inputs_of("distill")  # the models are checked before the evaluator loads them
        evaluator, ran = None, False
        for run in selected:
            distributed.stop_if_signalled(f"before distillation run {run.name}")
            if self.run_is_complete(run):
                distillation.write_guard_settings(self, self.path("runs", run.name))
                print(f"[thack_jax] run {run.name} skipped (complete)", flush=True)
                continue
            evaluator = evaluator or self.evaluator()
            self.stage_distill(run, evaluator)
            ran = True
        return ran

    # --------------------------------------------------------------------- run
    def run(self, stages=None, runs: tuple[str, ...] | None = None) -> None:
        """Runs the selected stages (None: every stage of the mode) in order. SIGTERM /
        SIGINT: the current step is saved, no stage is marked complete, no later stage runs,
        and interrupt.Interrupted is raised (the entry point exits with 128 + the signal)."""
        check_selection(self.cfg, stages, runs)
        stages = stages or stages_of(self.cfg)
        with interrupt.handling():
            for stage in stages_of(self.cfg):
                if stage in stages:
                    distributed.stop_if_signalled(f"before stage {stage}")
                    self._run_stage(stage, runs)
        # Process 0 alone writes the report; the others wait for it here, not in JAX's
        # shutdown barrier, whose timeout a slow report (or bucket) can exceed.
        distributed.barrier("experiment_end")

    def _run_stage(self, stage: str, runs: tuple[str, ...] | None) -> None:
        start = time.time()
        logger.info("stage %s", stage)
        ran = True
        if stage == "oracle":
            ran = self.stage_oracle()
        elif stage == "oracle_data":
            ran = self.stage_oracle_data()
        elif stage == "reference_data":
            ran = self.stage_reference_data()
        elif stage == "teacher":
            ran = self.stage_sft("teacher")
        elif stage == "student_init":
            ran = self.stage_sft("student")
        elif stage == "distill":
            ran = self._run_distill(runs)
        elif stage == "report":
            from thack_jax.reporting import report

            report.write_report([self.workdir], self.workdir)
        if not ran:
            print(f"[thack_jax] stage {stage} skipped (complete)", flush=True)
            return
        seconds = round(time.time() - start, 1)
        print(f"[thack_jax] stage {stage} done in {seconds} s", flush=True)
