"""The work of each stage of the experiment: the oracle, its data, the SFTs, the
distillation runs (with the inline evaluation and the hacking guard).

A stage function does its stage's work in the workdir of a `StageContext` and nothing
else: whether a stage runs, the fingerprint it ran under and its `COMPLETE.json` marker
are the business of experiment.py, which calls these functions in order. A stage
interrupted halfway resumes here: training from its checkpoints, offline stores from their
last chunk. The workdir layout is in experiment.py's docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from thack_jax import models
from thack_jax.core import interrupt, storage
from thack_jax.data import generation
from thack_jax.data.offline_store import OfflineStore
from thack_jax.experiment import task_data
from thack_jax.experiment.config import ExperimentConfig, ModelSpec, TrainConfig
from thack_jax.models import hf_io
from thack_jax.training import optim, train_step, trainer


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
        return task_data.prompts(self.cfg, split, num, seed)

    def examples(self, split: str, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, references) of the task (`task_data.examples`)."""
        return task_data.examples(self.cfg, split, num, seed)

    @property
    def sft_data(self) -> str:
        """The store the SFT stages train on: the oracle's data, or (field mode) the task's
        references."""
        return "oracle_data" if self.cfg.mode == "oracle" else "reference_data"

    def load_model(self, role_dir: str) -> tuple[models.ModelConfig, dict]:
        """(config, host params) of the model a stage exported to <role_dir>/model. A T5
        model's config is its config.json's; a decoder-only one's is the role's (HF's
        config.json has no length caps), checked against the checkpoint's shape."""
        role = "student" if role_dir == "student_init" else role_dir
        expected = self.cfg.model_config(role)
        expected = expected if models.is_decoder_only(expected) else None
        config, params = hf_io.load(self.path(role_dir, "model"), config=expected)
        return config, jax.tree.map(np.asarray, params)

    def vocab_fingerprint(self) -> str:
        return task_data.vocab_fingerprint(self.cfg)


def load_checkpoint(spec: ModelSpec, config: models.ModelConfig) -> dict:
    """The params of `spec.checkpoint` (T5X or HF format; decoder-only: HF)."""
    if spec.checkpoint_format == "t5x":
        if models.is_decoder_only(config):
            raise ValueError(f"{spec.checkpoint}: T5X checkpoints hold T5 models only")
        from thack_jax.models import t5x

        return t5x.load_t5x_checkpoint(spec.checkpoint, config)
    return hf_io.load(spec.checkpoint, config)[1]


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
        _scale_output_layer(config, params, cfg.oracle_logit_scale, "oracle_logit_scale")
    hf_io.save(ctx.path("oracle", "model"), config, params)


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


def reference_data(ctx: StageContext) -> dict:
    """Field mode: the task's training examples and references -> the store reference_data/."""
    return {"examples": task_data.build_reference_data(ctx.path("reference_data"), ctx.cfg)}


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
    """SFT of `role` ('teacher' or 'student') on the oracle data (field mode: the task's
    references) -> <dir>/model; returns the number of rows trained on. With 0 steps the
    checkpoint (or initialisation) is exported as it is (a field-mode teacher)."""
    s = sft_settings(ctx.cfg, role)
    tc = s.train
    config = ctx.cfg.model_config(role)
    if s.spec.checkpoint:
        params = load_checkpoint(s.spec, config)
    else:
        params = models.init_params(config, jax.random.key(s.spec.init_seed))
    n = 0
    if tc.num_steps > 0:
        params, n = _train_sft(ctx, role, s, (config, params))
    params = jax.tree.map(np.array, params)
    _scale_output_layer(config, params, s.logit_scale, "teacher_logit_scale")
    hf_io.save(ctx.path(s.directory, "model"), config, params)
    return n


def _train_sft(ctx: StageContext, role: str, s: SftSettings, model) -> tuple[dict, int]:
    """(trained params, rows trained on) of `role`'s SFT on the store `ctx.sft_data`."""
    config, params = model
    tc = s.train
    store = OfflineStore.open(ctx.path(ctx.sft_data))
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
    return result.state.params, n


def _scale_output_layer(config, params: dict, scale: float, field: str) -> None:
    """Multiplies the output layer of host `params` by `scale` in place (1.0: unchanged)."""
    if scale == 1.0:
        return
    if config.tie_word_embeddings:
        raise ValueError(f"ExperimentConfig.{field} needs a model with an untied output layer")
    if models.is_decoder_only(config):
        params["lm_head"]["kernel"] *= scale
    else:
        params["decoder"]["logits_dense"]["kernel"] *= scale
