"""Hugging Face checkpoints of either family, chosen by config.json's `model_type`: 't5'
(T5ForConditionalGeneration, models/hf.py) or 'llama' / 'qwen2' (LlamaForCausalLM,
Qwen2ForCausalLM: models/hf_decoder.py). The stages, the export and the eval CLI read and
write models through this module only, so an experiment's roles can be of either family.
"""

from __future__ import annotations

import dataclasses
import os

from thack_jax.models import hf, hf_decoder, hf_files
from thack_jax.models.config import T5Config
from thack_jax.models.decoder_config import DecoderConfig

T5_TYPES = ("t5",)
DECODER_TYPES = ("llama", "qwen2")
# DecoderConfig fields that are not the network's shape: a checkpoint need not match them.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "init_std", "pad_id", "eos_id")
_RUNTIME_FIELDS += ("max_input_length", "max_target_length")


def model_type(directory: str | os.PathLike) -> str:
    """config.json's `model_type` ('t5' when absent, as older T5 exports have it).

    Raises:
      FileNotFoundError: no config.json; ValueError: a model type neither family reads.
    """
    path = os.path.join(hf_files.checkpoint_dir(directory), "config.json")
    kind = hf_files.read_json(path).get("model_type", "t5")
    if kind not in T5_TYPES + DECODER_TYPES:
        raise ValueError(
            f"{path}: model_type={kind!r} is not supported; expected one of "
            f"{list(T5_TYPES + DECODER_TYPES)}"
        )
    return kind


def load(
    directory: str | os.PathLike,
    config: T5Config | DecoderConfig | None = None,
    dtype: str | None = None,
) -> tuple[T5Config | DecoderConfig, dict]:
    """(config, params) of the checkpoint in `directory`. With `config` (the experiment's
    role), the checkpoint must be of its family and shape (every differing field named);
    `config` is returned, so its runtime fields (dtypes, length caps) apply."""
    kind = model_type(directory)
    if kind in T5_TYPES:
        if isinstance(config, DecoderConfig):
            raise ValueError(f"{directory} holds a T5 checkpoint; the role is decoder-only")
        return hf.load_hf_checkpoint(directory, config=config, dtype=dtype)
    if isinstance(config, T5Config):
        raise ValueError(f"{directory} holds a {kind} (decoder-only) checkpoint; the role is T5")
    loaded, params = hf_decoder.load_hf_decoder(directory, dtype=dtype)
    if config is None:
        return loaded, params
    differing = [
        f"{f.name}: checkpoint {getattr(loaded, f.name)!r}, config {getattr(config, f.name)!r}"
        for f in dataclasses.fields(DecoderConfig)
        if f.name not in _RUNTIME_FIELDS and getattr(loaded, f.name) != getattr(config, f.name)
    ]
    if differing:
        raise ValueError(
            f"{directory}: the checkpoint's shape differs from the role's config: "
            + "; ".join(differing)
        )
    return config, params


def save(
    directory: str | os.PathLike,
    config: T5Config | DecoderConfig,
    params: dict,
    dtype: str = "float32",
) -> None:
    """Writes config.json + model.safetensors that transformers loads with
    `AutoModelForSeq2SeqLM` (T5) or `AutoModelForCausalLM` (decoder-only)."""
    if isinstance(config, DecoderConfig):
        hf_decoder.save_hf_decoder(directory, config, params, dtype=dtype)
    else:
        hf.save_hf_checkpoint(directory, config, params, dtype=dtype)
