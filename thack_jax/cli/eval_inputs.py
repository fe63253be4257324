"""The inputs of the separate evaluator (`launch/eval.py`): model configs, checkpoints and
prompt files, local or gs://, each refusal naming the flag and the file. Kept free of absl
flags so that tests and other tools can import it next to another entry point's flags."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from thack_jax import models
from thack_jax.core import storage
from thack_jax.models import hf, hf_config
from thack_jax.models.config import T5Config
from thack_jax.training import checkpoints


class EvalCliError(Exception):
    pass


def _is_file(path: str) -> bool:
    """os.path.isfile for local paths and URIs."""
    return storage.exists(path) and not storage.isdir(path)


def load_config(spec: str, flag: str) -> T5Config:
    """A size name, or a JSON file (HF config.json or T5Config fields)."""
    if spec in models.NAMED_CONFIGS:
        return models.get_config(spec)
    if not _is_file(spec):
        raise EvalCliError(
            f"--{flag}={spec!r} is neither a size name {sorted(models.NAMED_CONFIGS)} nor a file"
        )
    data = storage.read_json(spec)  # ValueError naming the file when it is not JSON
    if not isinstance(data, dict):
        raise EvalCliError(f"--{flag}={spec}: a JSON object expected, got {type(data).__name__}")
    if "num_layers" in data or "model_type" in data:  # a Hugging Face config.json
        return hf_config.config_from_hf(spec)
    fields = {f.name for f in dataclasses.fields(T5Config)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise EvalCliError(f"--{flag}={spec}: unknown T5Config field(s) {unknown}")
    return T5Config(**data)


def load_model(path: str, config_spec: str | None, role: str) -> tuple[T5Config, dict]:
    """(config, params) of a reference model from an HF or an orbax checkpoint directory."""
    if not path:
        raise EvalCliError(f"--{role}_ckpt is required")
    if not storage.isdir(path):
        raise EvalCliError(f"--{role}_ckpt={path}: the directory does not exist")
    config = load_config(config_spec, f"{role}_config") if config_spec else None
    names = set(storage.listdir(path))
    if names & {"model.safetensors", "model.safetensors.index.json"}:
        return hf.load_hf_checkpoint(path, config=config)
    steps = checkpoints.list_finalized_steps(path)
    if not steps:
        raise EvalCliError(
            f"--{role}_ckpt={path} holds no checkpoint: no model.safetensors and no finalized "
            f"orbax step (found {sorted(names)[:10]})"
        )
    if config is None:
        raise EvalCliError(f"--{role}_ckpt={path} is an orbax checkpoint: pass --{role}_config")
    params = checkpoints.restore_params(path, steps[-1], models.param_shapes(config))
    logging.info("%s: step %d of %s", role, steps[-1], path)
    return config, params


def load_prompts(path: str | None, flag: str) -> np.ndarray:
    if not path:
        raise EvalCliError(f"--{flag} is required")
    if not _is_file(path):
        raise EvalCliError(f"--{flag}={path}: file not found")
    prompts = storage.load_npy(path)  # ValueError naming the file when it is damaged
    if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
        raise EvalCliError(f"--{flag}={path}: want int [N, Lx], got {prompts.dtype}{prompts.shape}")
    return prompts
