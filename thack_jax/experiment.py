"""The teacher-hacking experiment: oracle -> oracle data -> teacher SFT -> student SFT ->
distillation runs (with periodic evaluation) -> report.

Every stage writes into its own directory of the workdir and finishes by writing
`COMPLETE.json` (with the fingerprint of the configuration it ran under); a rerun skips
complete stages and resumes interrupted ones (training resumes from its checkpoints, the
offline stores from their last chunk). Workdir layout:

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

import jax
import numpy as np

from thack_jax import (
    diagnostics,
    evaluation,
    models,
    noise,
    optim,
    partitioning,
    train_step,
    trainer,
)
from thack_jax.data import generation, regimes, synthetic
from thack_jax.data.offline_store import OfflineStore
from thack_jax.diagnostics import HackingGuard
from thack_jax.evaluation import Evaluator
from thack_jax.experiment_config import ExperimentConfig, RunConfig, TrainConfig, diff, to_json
from thack_jax.experiment_config import fingerprint as config_fingerprint
from thack_jax.metrics_io import read_metrics
from thack_jax.models import hf

logger = logging.getLogger(__name__)

SHARED_STAGES = ("oracle", "oracle_data", "teacher", "student_init")
STAGES = (*SHARED_STAGES, "distill", "report")


class ExperimentMismatchError(ValueError):
    """The workdir holds stages of an experiment with another configuration."""


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _shared_section(cfg: ExperimentConfig) -> dict:
    """The part of the configuration that the shared stages depend on."""
    shared = to_json(cfg)
    for key in ("runs", "distill", "evaluation", "guard_mode", "distill_prompt_pool", "name"):
        shared.pop(key)
    return shared


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
        _write_json(path, requested)


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
    _write_json(os.path.join(directory, "COMPLETE.json"), {"fingerprint": fp, **info})


class Experiment:
    """Runs the stages of one ExperimentConfig in one workdir."""

    def __init__(self, cfg: ExperimentConfig, workdir: str, progress: bool = True):
        self.cfg = cfg
        self.workdir = workdir
        self.progress = progress
        self.mesh = partitioning.make_mesh(dict(cfg.mesh_shape))
        check_workdir(cfg, workdir)

    # ----------------------------------------------------------------- helpers
    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)

    def prompts(self, split: str, num: int, seed: int) -> np.ndarray:
        """[num, max_input_length] int32 prompts of the task."""
        cfg = self.cfg
        if cfg.task == "synthetic":
            return synthetic.synthetic_prompts(
                num, split=split, seed=seed, max_length=cfg.max_input_length
            )
        from thack_jax.data import tasks, vocab  # TF only for real tasks.

        options = dict(cfg.task_options)
        spm = options.pop("sentencepiece_model", None)
        if spm is None:
            raise ValueError(
                f"task {cfg.task!r} needs ExperimentConfig.task_options['sentencepiece_model'] "
                "(the T5 SentencePiece model file, e.g. gs://t5-data/vocabs/cc_all.32000/"
                "sentencepiece.model copied locally)"
            )
        return tasks.load_prompts(
            cfg.task,
            split=split,
            num_prompts=num,
            max_input_length=cfg.max_input_length,
            seed=seed,
            vocabulary=vocab.sentencepiece_vocabulary(spm),
            **options,
        )

    def load_model(self, role_dir: str) -> tuple[models.T5Config, dict]:
        config, params = hf.load_hf_checkpoint(self.path(role_dir, "model"))
        return config, jax.tree.map(np.asarray, params)

    def _config_for(self, role: str) -> models.T5Config:
        return self.cfg.model_config(role)

    # ------------------------------------------------------------------ stages
    def stage_oracle(self) -> None:
        cfg, out = self.cfg, self.path("oracle")
        fp = config_fingerprint([cfg.oracle, cfg.oracle_logit_scale])
        if _is_complete(out, fp):
            return
        config = self._config_for("oracle")
        spec = cfg.oracle
        if spec.checkpoint:
            params = self._load_checkpoint(spec, config)
        else:
            params = models.init_params(config, jax.random.key(spec.init_seed))
            params = jax.tree.map(np.array, params)  # Writable host copies.
            # The scale sets the oracle's sharpness (per-token entropy); see docs/experiment.md.
            if config.tie_word_embeddings:
                raise ValueError("oracle_logit_scale needs an untied (v1.1) oracle")
            params["decoder"]["logits_dense"]["kernel"] *= cfg.oracle_logit_scale
        hf.save_hf_checkpoint(os.path.join(out, "model"), config, params)
        _mark_complete(out, fp)

    def _load_checkpoint(self, spec, config):
        if spec.checkpoint_format == "t5x":
            from thack_jax.models import t5x

            return t5x.load_t5x_checkpoint(spec.checkpoint, config)
        return hf.load_hf_checkpoint(spec.checkpoint, config)[1]

    def _vocab_fingerprint(self) -> str:
        return f"{self.cfg.task}:{self._config_for('oracle').vocab_size}"

    def stage_oracle_data(self) -> None:
        cfg, out = self.cfg, self.path("oracle_data")
        fp = config_fingerprint([cfg.oracle, cfg.oracle_logit_scale, cfg.oracle_data_prompts])
        if _is_complete(out, fp):
            return
        config, params = self.load_model("oracle")
        prompts = self.prompts("train", cfg.oracle_data_prompts, cfg.seed)
        generation.build_offline_store(
            out,
            generating_model="oracle",
            config=config,
            params=params,
            prompts=prompts,
            completions_per_prompt=1,
            max_decode_len=cfg.max_target_length,
            seed=cfg.seed,
            vocab_fingerprint=self._vocab_fingerprint(),
            progress=self.progress,
            mesh=self.mesh,
        )
        _mark_complete(out, fp)

    def _optimizer(self, tc: TrainConfig):
        schedule = optim.make_schedule(
            tc.learning_rate, tc.warmup_steps, tc.schedule, total_steps=tc.num_steps
        )
        opt = optim.make_optimizer(
            tc.optimizer,
            learning_rate=schedule,
            weight_decay=tc.weight_decay,
            clip_norm=tc.clip_norm,
        )
        return opt, schedule

    def stage_sft(self, role: str) -> None:
        """SFT of `role` ('teacher' or 'student') on the oracle data -> <dir>/model."""
        cfg = self.cfg
        directory = "teacher" if role == "teacher" else "student_init"
        tc = cfg.teacher_sft if role == "teacher" else cfg.student_sft
        limit = cfg.teacher_sft_examples if role == "teacher" else cfg.student_sft_examples
        spec = getattr(cfg, role)
        scale = cfg.teacher_logit_scale if role == "teacher" else 1.0
        fp = config_fingerprint([spec, tc, limit, cfg.oracle_data_prompts, scale])
        if _is_complete(self.path(directory), fp):
            return
        config = self._config_for(role)
        if spec.checkpoint:
            params = self._load_checkpoint(spec, config)
        else:
            params = models.init_params(config, jax.random.key(spec.init_seed))
        store = OfflineStore.open(self.path("oracle_data"))
        n = limit or store.inputs.shape[0]
        source = trainer.ArraySource(
            np.asarray(store.inputs[:n]), np.asarray(store.targets[:n]), tc.batch_size, tc.seed
        )
        opt, schedule = self._optimizer(tc)
        result = trainer.train(
            workdir=self.path(directory, "train"),
            student_config=config,
            init_params=params,
            optimizer=opt,
            step_config=train_step.StepConfig(objective="sft"),
            source=source,
            num_steps=tc.num_steps,
            mesh=self.mesh,
            seed=tc.seed,
            checkpoint_every=tc.checkpoint_every,
            progress=self.progress,
            learning_rate_fn=schedule,
        )
        params = jax.tree.map(np.array, result.state.params)
        if scale != 1.0:
            if config.tie_word_embeddings:
                raise ValueError("teacher_logit_scale needs an untied (v1.1) teacher")
            params["decoder"]["logits_dense"]["kernel"] *= scale
        hf.save_hf_checkpoint(self.path(directory, "model"), config, params)
        _mark_complete(self.path(directory), fp, sft_examples=n)

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
            student_config=self._config_for("student"),
            prompts=self.eval_prompts(),
            num_samples=ev.num_samples,
            max_decode_len=self.cfg.max_target_length,
            seed=ev.seed,
            batch_size=ev.batch_size,
            mesh=self.mesh,
            estimator=ev.estimator,
        )

    def _source(self, run: RunConfig, teacher, student_config):
        cfg, tc = self.cfg, self.cfg.distill
        store = None
        if run.regime in ("offline", "mixed"):
            prompts = self.prompts("train", run.num_prompts, cfg.seed + 1000 + run.seed)
            store = generation.build_offline_store(
                self.path("runs", run.name, "offline_data"),
                generating_model="teacher",
                config=teacher[0],
                params=teacher[1],
                prompts=prompts,
                completions_per_prompt=run.completions_per_prompt,
                max_decode_len=cfg.max_target_length,
                seed=cfg.seed + 2000 + run.seed,
                vocab_fingerprint=self._vocab_fingerprint(),
                progress=self.progress,
                mesh=self.mesh,
            )
        pool = None
        if run.regime != "offline":
            pool = self.prompts("train", cfg.distill_prompt_pool, cfg.seed + 3000)
        return regimes.make_source(
            run.regime,
            batch_size=tc.batch_size,
            seed=tc.seed + run.seed,
            offline_store=store,
            prompts=pool,
            teacher=teacher,
            student_config=student_config,
            max_decode_len=cfg.max_target_length,
            online_fraction=run.online_fraction if run.regime == "mixed" else None,
            online_role=run.online_role,
            mesh=self.mesh,
        )

    def stage_distill(self, run: RunConfig, evaluator: Evaluator | None = None) -> str:
        """One distillation run with periodic evaluation; returns its metrics path."""
        cfg, tc = self.cfg, self.cfg.distill
        out = self.path("runs", run.name)
        fp = config_fingerprint([run, tc, cfg.evaluation, cfg.guard_mode])
        metrics_path = os.path.join(out, "train", "metrics.jsonl")
        guard = HackingGuard(mode=cfg.guard_mode)
        key = "proxy/forward_kl"
        first_step = diagnostics.fit_start_step(tc.warmup_steps)
        # Written even for a finished run: the report and launch/diagnose.py read it.
        os.makedirs(out, exist_ok=True)
        settings = diagnostics.guard_settings(first_step, key, guard.config)
        _write_json(os.path.join(out, diagnostics.GUARD_FILE), settings)
        if _is_complete(out, fp):
            return metrics_path
        _write_json(os.path.join(out, "run.json"), to_json(run))
        teacher = self.load_model("teacher")
        student_config, student_params = self.load_model("student_init")
        evaluator = evaluator or self.evaluator()
        last = {}

        def update_guard(step, metrics):
            # The law holds after warmup; a non-positive estimate has no place in log-log axes.
            # No stderrs: every evaluation reuses the same prompts, so the stderr is the
            # uncertainty of the level, not the noise between evaluations (diagnostics.md).
            if step >= first_step and metrics[key] > 0:
                last["result"] = guard.update(step, metrics[key])
                last["step"] = step
                return last["result"]
            return None

        if os.path.exists(metrics_path):  # Resume: the guard's state is the logged curve.
            for row in read_metrics(metrics_path):
                if key in row:
                    update_guard(row["step"], row)

        def eval_fn(step, params):
            estimates = evaluator.estimates(params)
            metrics = evaluation.metrics_of(estimates)
            if jax.process_index() == 0:  # for a bootstrap of the evaluation noise (noise.py)
                per_prompt = {key: est.per_prompt for key, est in estimates.items()}
                noise.save_per_prompt(
                    os.path.join(out, "train", noise.PER_PROMPT_DIR), step, per_prompt
                )
            result = update_guard(step, metrics)
            if result is not None:
                statistic = float(result.statistic)
                metrics["guard/statistic"] = statistic if np.isfinite(statistic) else 0.0
                metrics["guard/fired"] = float(result.fired)
            return metrics

        def stop_hook(step, metrics):
            result = last.get("result")
            if result is None or not result.fired:
                return False
            # The oracle-free rule's best checkpoint, for the user (guard_mode 'stop' keeps it).
            _write_json(
                os.path.join(out, "guard.json"),
                {"fired_at_eval_step": last["step"], "best_step": result.best_step},
            )
            return bool(result.should_stop)

        opt, schedule = self._optimizer(tc)
        start = time.time()
        trainer.train(
            workdir=os.path.join(out, "train"),
            student_config=student_config,
            init_params=student_params,
            optimizer=opt,
            step_config=train_step.StepConfig(
                objective="distill",
                loss=tc.loss,
                temperature=tc.temperature,
                num_microbatches=tc.num_microbatches,
            ),
            source=self._source(run, teacher, student_config),
            num_steps=tc.num_steps,
            teacher_config=teacher[0],
            teacher_params=teacher[1],
            mesh=self.mesh,
            seed=tc.seed + run.seed,
            checkpoint_every=tc.checkpoint_every,
            eval_steps=cfg.evaluation.steps(tc.num_steps),
            eval_fn=eval_fn,
            hooks=(stop_hook,),
            progress=self.progress,
            learning_rate_fn=schedule,
        )
        _mark_complete(out, fp, wall_seconds=round(time.time() - start, 1))
        return metrics_path

    # --------------------------------------------------------------------- run
    def run(self, stages=STAGES, runs: tuple[str, ...] | None = None) -> None:
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; valid stages: {list(STAGES)}")
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
                missing = sorted(set(runs or ()) - {r.name for r in self.cfg.runs})
                if missing:
                    raise ValueError(
                        f"unknown run(s) {missing}; configured: {[r.name for r in self.cfg.runs]}"
                    )
                evaluator = self.evaluator() if selected else None
                for run in selected:
                    self.stage_distill(run, evaluator)
            elif stage == "report":
                from thack_jax import report

                report.write_report([self.workdir], self.workdir)
            timings[stage] = round(time.time() - start, 1)
            print(f"[thack_jax] stage {stage} done in {timings[stage]} s", flush=True)
