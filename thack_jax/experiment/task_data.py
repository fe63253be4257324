"""The task's data as the stages read it: prompts, examples with references, the field
mode's reference store and the oracle world's evaluation references.

Kept apart from stages.py so that the one place that decides where a stage's prompts and
references come from is short: the synthetic task is generated here without TensorFlow; a
real task (XSum, WMT-14, Natural Instructions) goes through `data/tasks.py` (seqio / TFDS,
imported only when such a task is used), with `ExperimentConfig.task_options` naming the
SentencePiece model and the data directories.
"""

from __future__ import annotations

import jax
import numpy as np

from thack_jax.data import synthetic
from thack_jax.decoding import sampling
from thack_jax.decoding.settings import SamplingConfig
from thack_jax.evaluation.references import batches_of
from thack_jax.experiment.config import ExperimentConfig
from thack_jax.parallel import partitioning

# The evaluator samples the oracle, the teacher and the student on streams 0, 1, 2 of
# key(EvalConfig.seed); the oracle world's references use their own stream.
REFERENCE_STREAM = 3


def _task_arguments(cfg: ExperimentConfig) -> dict:
    """The keyword arguments of `tasks.load_examples` that `cfg.task_options` gives."""
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
    return {
        "data": tasks.TaskData(vocabulary=vocab.sentencepiece_vocabulary(spm), **options),
        "via_seqio": via_seqio,
    }


def prompts(cfg: ExperimentConfig, split: str, num: int, seed: int) -> np.ndarray:
    """[num, max_input_length] int32 prompts of the task."""
    if cfg.task == "synthetic":
        return synthetic.synthetic_prompts(
            num, split=split, seed=seed, max_length=cfg.max_input_length
        )
    from thack_jax.data import tasks

    return tasks.load_prompts(
        cfg.task,
        split=split,
        num_prompts=num,
        max_input_length=cfg.max_input_length,
        seed=seed,
        **_task_arguments(cfg),
    )


def examples(cfg: ExperimentConfig, split: str, num: int, seed: int):
    """(inputs [num, max_input_length], references [num, max_target_length]) int32 of the
    task: its own responses (the human references of a real task; the synthetic task's
    procedural ones). The inputs equal `prompts(cfg, split, num, seed)`."""
    from thack_jax.data import tasks

    arguments = {} if cfg.task == "synthetic" else _task_arguments(cfg)
    out = tasks.load_examples(
        cfg.task,
        split=split,
        num_examples=num,
        max_input_length=cfg.max_input_length,
        max_target_length=cfg.max_target_length,
        seed=seed,
        **arguments,
    )
    return out["inputs"], out["targets"]


def vocab_fingerprint(cfg: ExperimentConfig) -> str:
    """The vocabulary a store's token ids belong to (the task and the models' size)."""
    return f"{cfg.task}:{cfg.model_config(cfg.roles[0]).vocab_size}"


def build_reference_data(directory: str, cfg: ExperimentConfig) -> int:
    """Field mode: `cfg.reference_examples` training examples of the task with their
    references -> the offline store `directory` (what the SFT stages read); returns the rows."""
    from thack_jax.data import references

    inputs, targets = examples(cfg, "train", cfg.reference_examples, cfg.seed)
    references.build_reference_store(
        directory,
        inputs=inputs,
        targets=targets,
        vocab_fingerprint=vocab_fingerprint(cfg),
        source=cfg.task,
        seed=cfg.seed,
    )
    return len(inputs)


def oracle_references(model, prompts_: np.ndarray, cfg: ExperimentConfig, mesh) -> np.ndarray:
    """One oracle sample per prompt [N, max_target_length] int32: the references of the
    oracle world (so the reference metric can be checked against the golden one). Row i
    draws with row key i of `REFERENCE_STREAM` (per-row keys: independent of the batch)."""
    config, params = model
    ev = cfg.evaluation
    key = jax.random.fold_in(jax.random.key(ev.seed), REFERENCE_STREAM)
    settings = SamplingConfig(max_decode_len=cfg.max_target_length)
    batches = batches_of(np.asarray(prompts_, np.int32), ev.batch_size)
    out = []
    for b, batch in enumerate(batches):
        s = sampling.sample(
            config, params, batch, key, settings, mesh=mesh, first_row=b * ev.batch_size
        )
        out.append(partitioning.to_host(s.tokens))
    return np.concatenate(out)[: len(prompts_)].astype(np.int32)
