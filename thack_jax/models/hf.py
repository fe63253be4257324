"""Hugging Face T5 checkpoints (config.json + safetensors) to and from our parameters.

This module maps tensor names and checks, loads and exports the parameter tree;
`hf_config` translates config.json, `hf_files` reads and writes the files (safetensors
only: PyTorch `.bin` pickles are refused).

Name mapping (torch `Linear` weights are [out, in], ours [in, out]: (T) marks a transpose;
`L` is `encoder.block.{i}.layer` / `decoder.block.{i}.layer`, ours `{stack}/layers_{i}`):

  shared.weight                               token_embedder/embedding
  {stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight (T)
                                              {stack}/relpos_bias/rel_embedding
  encoder L.0.SelfAttention.{q,k,v,o} (T)     attention/{query,key,value,out}/kernel
  encoder L.0.layer_norm, L.1.layer_norm      pre_attention_layer_norm, pre_mlp_layer_norm
  encoder L.1.DenseReluDense.{wi_0,wi_1,wi,wo} (T)  mlp/{wi_0,wi_1,wi,wo}/kernel
  decoder L.0.SelfAttention (T)               self_attention
  decoder L.1.EncDecAttention (T)             encoder_decoder_attention
  decoder L.2.DenseReluDense (T)              mlp
  decoder L.{0,1,2}.layer_norm                pre_{self_attention,cross_attention,mlp}_layer_norm
  {stack}.final_layer_norm.weight             encoder/encoder_norm, decoder/decoder_norm
  lm_head.weight (T)                          decoder/logits_dense/kernel

Tied output (T5 1.0): our `tie_word_embeddings` is read from HF's output scaling (see
`hf_config`). A tied model's `lm_head.weight`, if present, must equal `shared.weight`; an
untied config whose file has no `lm_head.weight` gets `shared.weight` as its head, as
transformers >= 5 does (unless config.json says `tie_word_embeddings: false`).
"""

from __future__ import annotations

import os
import re

import numpy as np

from thack_jax.core import storage
from thack_jax.models.config import T5Config
from thack_jax.models.hf_config import HF_FIELD_NAMES, config_from_hf, config_to_hf
from thack_jax.models.hf_files import (
    SAFETENSORS_DTYPES,
    check_values,
    checkpoint_dir,
    is_file,
    read_json,
    read_tensors,
    tensor_index,
    write_checkpoint,
)
from thack_jax.models.mapping import (
    CheckpointMismatchError,
    flatten,
    numpy_dtype,
    unflatten,
    validate,
)

# Copies of `shared.weight` some files carry; accepted when equal to it.
EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Present in some old files; transformers ignores it (cross-attention has no position bias).
IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)

_PROJECTIONS = {"q": "query", "k": "key", "v": "value", "o": "out"}
_SUBLAYERS = {  # (stack, HF layer index) -> (HF module, our module, our layer norm)
    ("encoder", 0): ("SelfAttention", "attention", "pre_attention_layer_norm"),
    ("encoder", 1): ("DenseReluDense", "mlp", "pre_mlp_layer_norm"),
    ("decoder", 0): ("SelfAttention", "self_attention", "pre_self_attention_layer_norm"),
    ("decoder", 1): (
        "EncDecAttention",
        "encoder_decoder_attention",
        "pre_cross_attention_layer_norm",
    ),
    ("decoder", 2): ("DenseReluDense", "mlp", "pre_mlp_layer_norm"),
}


def _templates() -> list[tuple[str, str, bool]]:
    """(HF name, our name, transposed); `{i}` stands for a layer index."""
    out = [
        ("shared.weight", "token_embedder/embedding", False),
        ("lm_head.weight", "decoder/logits_dense/kernel", True),
    ]
    for stack, norm in (("encoder", "encoder_norm"), ("decoder", "decoder_norm")):
        out.append((f"{stack}.final_layer_norm.weight", f"{stack}/{norm}/scale", False))
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out.append((bias, f"{stack}/relpos_bias/rel_embedding", True))
    for (stack, sub), (module, ours, norm) in _SUBLAYERS.items():
        block, layer = f"{stack}.block.{{i}}.layer.{sub}", f"{stack}/layers_{{i}}"
        out.append((f"{block}.layer_norm.weight", f"{layer}/{norm}/scale", False))
        if module == "DenseReluDense":
            for w in ("wi", "wi_0", "wi_1", "wo"):
                out.append((f"{block}.{module}.{w}.weight", f"{layer}/mlp/{w}/kernel", True))
        else:
            for short, long in _PROJECTIONS.items():
                out.append(
                    (f"{block}.{module}.{short}.weight", f"{layer}/{ours}/{long}/kernel", True)
                )
    return out


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


_TEMPLATES = [(_pattern(hf), _pattern(ours), hf, ours, t) for hf, ours, t in _templates()]


def to_ours(name: str) -> tuple[str, bool] | None:
    """HF tensor name -> (our flat name, transposed), or None for a name we do not know."""
    for hf_re, _, _, ours, transposed in _TEMPLATES:
        if m := hf_re.fullmatch(name):
            return ours.replace("{i}", m.group(1)) if m.groups() else ours, transposed
    return None


def to_hf(path: str) -> tuple[str, bool]:
    """Our flat name -> (HF tensor name, transposed). Raises ValueError for unknown names."""
    for _, ours_re, hf, _, transposed in _TEMPLATES:
        if m := ours_re.fullmatch(path):
            return hf.replace("{i}", m.group(1)) if m.groups() else hf, transposed
    raise ValueError(f"parameter {path!r} has no Hugging Face T5 name")


def load_hf_checkpoint(
    path: str | os.PathLike, config: T5Config | None = None, dtype: str | None = None
) -> tuple[T5Config, dict]:
    """Loads a Hugging Face T5ForConditionalGeneration safetensors checkpoint.

    Args:
      path: directory with config.json and model.safetensors (or the sharded
        model.safetensors.index.json and its shards); local or a URI (gs://...).
      config: use this config instead of config.json (the weights are checked against it).
      dtype: parameter dtype ('float32', 'bfloat16', 'float16'); default config.param_dtype.

    Returns:
      (config, params): params is our nested dict of numpy arrays, e.g.
      params['encoder']['layers_0']['attention']['query']['kernel'] [D, H*Dk].

    Raises:
      FileNotFoundError: the path, config.json or the weight files are missing.
      CheckpointMismatchError (a ValueError): every missing, unexpected or mis-shaped
        tensor and unsupported dtype, at once, and the config fields the weights contradict.
      DamagedCheckpointError (a ValueError): a truncated or damaged file, or tensors with
        NaN/inf or |x| >= 1e30 (every such tensor listed, with its file and counts).
      ValueError: an unsupported config.json value, or only a pickle (.bin) checkpoint.
    """
    directory = checkpoint_dir(path)
    config_file = storage.join(directory, "config.json")
    hf_config = read_json(config_file) if is_file(config_file) else None
    if config is None:
        if hf_config is None:
            raise FileNotFoundError(f"{directory} has no config.json; pass config=")
        config, config_name = config_from_hf(config_file), "config.json"
    else:
        config_name = "config"
    if dtype is not None:
        numpy_dtype(dtype)
        config = config.replace(param_dtype=dtype)
    target = numpy_dtype(config.param_dtype)
    index = tensor_index(directory)

    found, sources, unknown, problems = {}, {}, [], []
    for name, (_, stored, shape, _, _) in sorted(index.items()):
        if stored not in SAFETENSORS_DTYPES:
            problems.append(f"unsupported dtype {stored} for {name}; expected {SAFETENSORS_DTYPES}")
        if name in EMBEDDING_COPIES or name in IGNORED:
            continue
        mapped = to_ours(name)
        if mapped is None:
            unknown.append((name, shape))
            continue
        ours, transposed = mapped
        found[ours] = tuple(reversed(shape)) if transposed else shape
        sources[ours] = name
    head, embedding = "decoder/logits_dense/kernel", "token_embedder/embedding"
    # A tied lm_head (absent, or equal to shared.weight) is checked against shared.weight.
    copies = [n for n in EMBEDDING_COPIES if n in index]
    if config.tie_word_embeddings and head in found:
        copies.append(sources.pop(head))
        del found[head]
    hf_ties = hf_config is not None and hf_config.get("tie_word_embeddings", True) is not False
    shared_head = not config.tie_word_embeddings and head not in found and hf_ties
    if shared_head and embedding in found:
        found[head] = tuple(reversed(found[embedding]))
        sources[head] = "shared.weight"
    validate(
        config,
        found,
        str(directory),
        to_hf,
        config_name=config_name,
        field_names=HF_FIELD_NAMES,
        unknown=unknown,
        extra_problems=problems,
    )

    arrays = read_tensors(index, sorted(set(sources.values()) | set(copies)))
    _check_values(directory, arrays, sources, index)
    for name in copies:
        if not np.array_equal(arrays[name], arrays["shared.weight"]):
            problems.append(f"{name} differs from shared.weight (the model ties them)")
    if problems:
        raise CheckpointMismatchError(str(directory), problems)
    flat = {}
    for ours, name in sources.items():
        array = arrays[name].T if to_hf(ours)[1] else arrays[name]
        flat[ours] = np.asarray(array, dtype=target, order="C")
    return config, unflatten(flat)


def _check_values(directory: str, arrays: dict, sources: dict, index: dict) -> None:
    """Raises DamagedCheckpointError listing every tensor with NaN/inf or implausibly large
    values (file's name, ours, file, counts): damaged bytes inside the tensor data leave the
    format valid, and such weights would make every later number NaN or silently 0."""
    ours: dict[str, list[str]] = {}
    for path, name in sorted(sources.items()):
        ours.setdefault(name, []).append(path)

    def label(name: str) -> str:
        paths = ", ".join(ours.get(name, ["a copy of token_embedder/embedding"]))
        return f"{name} (ours: {paths}) in {index[name].file}"

    check_values(directory, arrays, label)


def save_hf_checkpoint(
    path: str | os.PathLike, config: T5Config, params: dict, dtype: str = "float32"
) -> None:
    """Writes config.json + model.safetensors that transformers' T5ForConditionalGeneration
    loads with `from_pretrained(path)` (local or a URI, each file written atomically).
    Existing files of those names are replaced.

    Raises:
      CheckpointMismatchError: params do not match config (every problem listed).
      FileExistsError: the directory already holds a sharded checkpoint.
    """
    target = numpy_dtype(dtype)
    flat = flatten(params)
    shapes = {k: tuple(np.shape(v)) for k, v in flat.items()}
    validate(config, shapes, "params", lambda p: (p, False))
    tensors = {}
    for ours, value in flat.items():
        name, transposed = to_hf(ours)
        array = np.asarray(value)
        tensors[name] = np.ascontiguousarray((array.T if transposed else array).astype(target))
    write_checkpoint(os.fspath(path), config_to_hf(config, dtype), tensors)
