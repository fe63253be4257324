"""The inputs of the separate evaluator (`launch/eval.py`): model configs, checkpoints,
prompt and reference files, local or gs://, each refusal naming the flag and the file; and
the settings of an experiment's run (`run_settings`). Kept free of absl flags so that tests
and other tools can import it next to another entry point's flags."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from thack_jax import models
from thack_jax.core import storage
from thack_jax.experiment.config import MODES
from thack_jax.experiment.eval_setup import EVAL_SETTINGS
from thack_jax.models import hf_config, hf_decoder_config, hf_io
from thack_jax.models.config import T5Config
from thack_jax.training import checkpoints


class EvalCliError(Exception):
    pass


RUN_CKPT_SUBDIR = "train/checkpoints"  # a run's student checkpoints, relative to the run
_SETTING_TYPES = {
    "num_samples": int,
    "max_decode_len": int,
    "seed": int,
    "batch_size": int,
    "estimator": str,
    "mode": str,
    "prompts": str,
}


def run_settings(workdir: str) -> tuple[str, dict] | None:
    """The evaluation settings of the experiment that holds run directory `workdir`
    (`<experiment>/runs/<name>`, its `<experiment>/eval_settings.json`), as flag values.

    Returns None outside an experiment (no `runs/` parent or no settings file); else
    (the settings file, {flag name: value}) for num_samples, max_decode_len, seed,
    batch_size, estimator, mode, prompts, references, oracle_ckpt (None in field mode),
    teacher_ckpt, student_config and ckpt_subdir, paths joined to the experiment's.
    Raises EvalCliError naming the file and the field that is missing or wrong.
    """
    run = workdir.rstrip("/")
    if not storage.is_remote(run):
        run = os.path.abspath(run)
    runs = storage.dirname(run)
    path = storage.join(storage.dirname(runs), EVAL_SETTINGS)
    if storage.basename(runs) != "runs" or not storage.exists(path):
        return None
    record = storage.read_json(path)  # ValueError naming the file when damaged
    if not isinstance(record, dict):
        raise EvalCliError(f"{path}: a JSON object expected, got {type(record).__name__}")
    for key, kind in _SETTING_TYPES.items():
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise EvalCliError(f"{path}: {key}={value!r} must be a {kind.__name__}")
    if record["mode"] not in MODES:
        raise EvalCliError(f"{path}: mode={record['mode']!r} must be one of {MODES}")
    refs = record.get("references")
    if refs is not None and not isinstance(refs, str):
        raise EvalCliError(f"{path}: references={refs!r} must be a file name or null")
    experiment = storage.dirname(runs)
    values = {key: record[key] for key in _SETTING_TYPES if key != "prompts"}
    values |= {
        "prompts": storage.join(experiment, record["prompts"]),
        "references": storage.join(experiment, refs) if refs else None,
        "oracle_ckpt": (
            storage.join(experiment, "oracle", "model") if record["mode"] == "oracle" else None
        ),
        "teacher_ckpt": storage.join(experiment, "teacher", "model"),
        "student_config": storage.join(experiment, "student_init", "model", "config.json"),
        "ckpt_subdir": RUN_CKPT_SUBDIR,
    }
    return path, values


def _is_file(path: str) -> bool:
    """os.path.isfile for local paths and URIs."""
    return storage.exists(path) and not storage.isdir(path)


def load_config(spec: str, flag: str) -> models.ModelConfig:
    """A size name (T5 or decoder-only), or a JSON file (HF config.json of either family,
    or T5Config fields)."""
    if spec in models.NAMED_CONFIGS or spec in models.DECODER_CONFIGS:
        return models.get_config(spec)
    if not _is_file(spec):
        names = sorted(models.NAMED_CONFIGS) + sorted(models.DECODER_CONFIGS)
        raise EvalCliError(f"--{flag}={spec!r} is neither a size name {names} nor a file")
    data = storage.read_json(spec)  # ValueError naming the file when it is not JSON
    if not isinstance(data, dict):
        raise EvalCliError(f"--{flag}={spec}: a JSON object expected, got {type(data).__name__}")
    if data.get("model_type") in hf_io.DECODER_TYPES:  # a Llama / Qwen2 config.json
        return hf_decoder_config.config_from_hf(data)
    if "num_layers" in data or "model_type" in data:  # a Hugging Face T5 config.json
        return hf_config.config_from_hf(spec)
    fields = {f.name for f in dataclasses.fields(T5Config)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise EvalCliError(f"--{flag}={spec}: unknown T5Config field(s) {unknown}")
    return T5Config(**data)


def load_model(path: str, config_spec: str | None, role: str) -> tuple[models.ModelConfig, dict]:
    """(config, params) of a reference model from an HF or an orbax checkpoint directory."""
    if not path:
        raise EvalCliError(f"--{role}_ckpt is required")
    if not storage.isdir(path):
        raise EvalCliError(f"--{role}_ckpt={path}: the directory does not exist")
    config = load_config(config_spec, f"{role}_config") if config_spec else None
    names = set(storage.listdir(path))
    if names & {"model.safetensors", "model.safetensors.index.json"}:
        return hf_io.load(path, config=config)
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
    return _int_matrix(path, flag, "[N, Lx]")


def _int_matrix(path: str, flag: str, shape: str) -> np.ndarray:
    """The int .npy [rows, columns] at `path` (named by `--flag` in every refusal)."""
    if not _is_file(path):
        raise EvalCliError(f"--{flag}={path}: file not found")
    array = storage.load_npy(path)  # ValueError naming the file when it is damaged
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise EvalCliError(f"--{flag}={path}: want int {shape}, got {array.dtype}{array.shape}")
    return array


def load_references(path: str, flag: str) -> np.ndarray:
    """An int .npy [N, Ly_ref] of reference responses (the evaluator checks it against the
    prompts and the models)."""
    return _int_matrix(path, flag, "[N, Ly]")
