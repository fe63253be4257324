"""The work of each stage of the experiment: the oracle, its data, the SFTs, the
distillation runs (with the inline evaluation and the hacking guard).

A stage function does its stage's work in the workdir of a `StageContext` and nothing
else: whether a stage runs, the fingerprint it ran under and its `COMPLETE.json` marker
are the business of experiment.py, which calls these functions in order. A stage
interrupted halfway resumes here: training from its checkpoints, offline stores from their
last chunk. The workdir layout is in experiment.py's docstring.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import numpy as np

from thack_jax import models
from thack_jax.core import interrupt, storage
from thack_jax.data import generation, regimes, synthetic
from thack_jax.data.offline_store import OfflineStore
from thack_jax.decoding.settings import SamplingConfig
from thack_jax.evaluation.evaluator import Evaluator, metrics_of
from thack_jax.experiment.config import ExperimentConfig, ModelSpec, RunConfig, TrainConfig
from thack_jax.hacking import noise
from thack_jax.hacking.guard import GUARD_FILE, HackingGuard, fit_start_step, guard_settings
from thack_jax.models import hf
from thack_jax.training import optim, train_step, trainer
from thack_jax.training.metrics_io import read_metrics

# The metric the hacking guard watches (from the end of warmup, with its per-prompt values).
GUARD_KEY = "proxy/forward_kl"


def write_json(path: str, value) -> None:
    """Writes `value` to `path` atomically, local or gs:// (core/storage.py)."""
    storage.write_json(path, value)


def stop_if_interrupted(result: trainer.TrainResult, what: str, num_steps: int) -> None:
    """Raises Interrupted when SIGTERM/SIGINT stopped `result`'s training: its checkpoint is
    saved, and nothing after it (export, completion marker, later stages) may run."""
    if result.interrupted:
        raise interrupt.Interrupted(
            interrupt.requested(),
            f"during {what} at step {int(result.state.step)} of {num_steps} (checkpoint saved)",
        )


class StageContext:
    """What every stage reads: the configuration, the workdir, the mesh, progress output;
    with the task's prompts and the workdir's exported models."""

    def __init__(self, cfg: ExperimentConfig, workdir: str, mesh, progress: bool = True):
        self.cfg = cfg
        self.workdir = workdir
        self.mesh = mesh
        self.progress = progress

    def path(self, *parts) -> str:
        return storage.join(self.workdir, *parts)

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
        via_seqio = options.pop("via_seqio", False)
        return tasks.load_prompts(
            cfg.task,
            split=split,
            num_prompts=num,
            max_input_length=cfg.max_input_length,
            seed=seed,
            data=tasks.TaskData(vocabulary=vocab.sentencepiece_vocabulary(spm), **options),
            via_seqio=via_seqio,
        )

    def load_model(self, role_dir: str) -> tuple[models.T5Config, dict]:
        """(config, host params) of the model a stage exported to <role_dir>/model."""
        config, params = hf.load_hf_checkpoint(self.path(role_dir, "model"))
        return config, jax.tree.map(np.asarray, params)

    def vocab_fingerprint(self) -> str:
        return f"{self.cfg.task}:{self.cfg.model_config('oracle').vocab_size}"


def load_checkpoint(spec: ModelSpec, config: models.T5Config) -> dict:
    """The params of `spec.checkpoint` (T5X or HF format)."""
    if spec.checkpoint_format == "t5x":
        from thack_jax.models import t5x

        return t5x.load_t5x_checkpoint(spec.checkpoint, config)
    return hf.load_hf_checkpoint(spec.checkpoint, config)[1]


def make_optimizer(tc: TrainConfig):
    """(optimizer, learning-rate schedule) of a TrainConfig."""
    schedule = optim.make_schedule(
        tc.learning_rate, tc.warmup_steps, tc.schedule, total_steps=tc.num_steps
    )
    opt = optim.make_optimizer(
        optim.OptimizerConfig(
            tc.optimizer,
            learning_rate=schedule,
            weight_decay=tc.weight_decay,
            clip_norm=tc.clip_norm,
        )
    )
    return opt, schedule


# ----------------------------------------------------------------- shared stages


def oracle(ctx: StageContext) -> None:
    """The oracle (a checkpoint, or random weights with a scaled output layer) -> oracle/model."""
    cfg = ctx.cfg
    config = cfg.model_config("oracle")
    spec = cfg.oracle
    if spec.checkpoint:
        params = load_checkpoint(spec, config)
    else:
        params = models.init_params(config, jax.random.key(spec.init_seed))
        params = jax.tree.map(np.array, params)  # Writable host copies.
        # The scale sets the oracle's sharpness (per-token entropy); see docs/experiment.md.
        if config.tie_word_embeddings:
            raise ValueError("oracle_logit_scale needs an untied (v1.1) oracle")
        params["decoder"]["logits_dense"]["kernel"] *= cfg.oracle_logit_scale
    hf.save_hf_checkpoint(ctx.path("oracle", "model"), config, params)


def oracle_data(ctx: StageContext) -> None:
    """One oracle completion per training prompt -> the offline store oracle_data/."""
    cfg = ctx.cfg
    config, params = ctx.load_model("oracle")
    prompts = ctx.prompts("train", cfg.oracle_data_prompts, cfg.seed)
    generation.build_offline_store(
        ctx.path("oracle_data"),
        model=(config, params),
        prompts=prompts,
        generation=generation.GenerationConfig(
            generating_model="oracle",
            completions_per_prompt=1,
            max_decode_len=cfg.max_target_length,
            seed=cfg.seed,
            vocab_fingerprint=ctx.vocab_fingerprint(),
        ),
        progress=ctx.progress,
        mesh=ctx.mesh,
    )


class SftSettings(NamedTuple):
    """What the SFT of one role reads from the configuration."""

    directory: str  # in the workdir: <directory>/{train,model}
    spec: ModelSpec
    train: TrainConfig
    limit: int  # oracle-data rows to train on (0: all)
    logit_scale: float  # applied to the output layer after training


def sft_settings(cfg: ExperimentConfig, role: str) -> SftSettings:
    """The SFT settings of `role` ('teacher' or 'student')."""
    if role == "teacher":
        return SftSettings(
            "teacher",
            cfg.teacher,
            cfg.teacher_sft,
            cfg.teacher_sft_examples,
            cfg.teacher_logit_scale,
        )
    return SftSettings("student_init", cfg.student, cfg.student_sft, cfg.student_sft_examples, 1.0)


def sft(ctx: StageContext, role: str) -> int:
    """SFT of `role` ('teacher' or 'student') on the oracle data -> <dir>/model; returns the
    number of oracle-data rows trained on."""
    s = sft_settings(ctx.cfg, role)
    tc = s.train
    config = ctx.cfg.model_config(role)
    if s.spec.checkpoint:
        params = load_checkpoint(s.spec, config)
    else:
        params = models.init_params(config, jax.random.key(s.spec.init_seed))
    store = OfflineStore.open(ctx.path("oracle_data"))
    n = s.limit or store.inputs.shape[0]
    source = trainer.ArraySource(
        np.asarray(store.inputs[:n]), np.asarray(store.targets[:n]), tc.batch_size, tc.seed
    )
    opt, schedule = make_optimizer(tc)
    result = trainer.train(
        workdir=ctx.path(s.directory, "train"),
        student=trainer.Student(
            config, params, opt, train_step.StepConfig(objective="sft"), schedule
        ),
        source=source,
        loop=trainer.LoopConfig(
            tc.num_steps,
            checkpoint_every=tc.checkpoint_every,
            progress=ctx.progress,
            seed=tc.seed,
        ),
        mesh=ctx.mesh,
    )
    stop_if_interrupted(result, f"the {role} SFT", tc.num_steps)
    params = jax.tree.map(np.array, result.state.params)
    if s.logit_scale != 1.0:
        if config.tie_word_embeddings:
            raise ValueError("teacher_logit_scale needs an untied (v1.1) teacher")
        params["decoder"]["logits_dense"]["kernel"] *= s.logit_scale
    hf.save_hf_checkpoint(ctx.path(s.directory, "model"), config, params)
    return n


# ----------------------------------------------------------------- distillation


def write_guard_settings(ctx: StageContext, run_dir: str) -> None:
    """<run_dir>/guard_settings.json: what the run's guard is fed (read by the report and
    launch/diagnose.py, so it is written even for a finished run)."""
    guard = HackingGuard(mode=ctx.cfg.guard_mode)
    first_step = fit_start_step(ctx.cfg.distill.warmup_steps)
    settings = guard_settings(first_step, GUARD_KEY, guard.config)
    write_json(storage.join(run_dir, GUARD_FILE), settings)


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
    to the end of training."""
    cfg, tc = ctx.cfg, ctx.cfg.distill
    out = ctx.path("runs", run.name)
    metrics_path = storage.join(out, "train", "metrics.jsonl")
    guard = HackingGuard(mode=cfg.guard_mode)
    first_step = fit_start_step(tc.warmup_steps)
    teacher = ctx.load_model("teacher")
    student_config, student_params = ctx.load_model("student_init")
    last = {}
    per_prompt_dir = storage.join(out, "train", noise.PER_PROMPT_DIR)

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
    return time.time() - start
