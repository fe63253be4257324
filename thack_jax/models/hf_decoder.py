"""Hugging Face LlamaForCausalLM / Qwen2ForCausalLM checkpoints to and from our parameters.

This module maps tensor names and layouts, checks, loads and exports the decoder-only
parameter tree (decoder_network's); `hf_decoder_config` translates config.json and
`hf_files` reads and writes the safetensors files (PyTorch `.bin` pickles are refused).

Name mapping (`L` = `model.layers.{i}`, ours `layers_{i}`; torch `Linear` weights are
[out, in], ours [in, out]; H heads, K kv heads, Dh head_dim):

  model.embed_tokens.weight [V, D]            embed/embedding [V, D]
  L.input_layernorm.weight [D]                layers_{i}/attn_norm/scale
  L.self_attn.q_proj.weight [H*Dh, D]         layers_{i}/attention/query/kernel [D, H, Dh]
  L.self_attn.{k,v}_proj.weight [K*Dh, D]     layers_{i}/attention/{key,value}/kernel [D, K, Dh]
  L.self_attn.{q,k,v}_proj.bias [H*Dh|K*Dh]   layers_{i}/attention/{query,key,value}/bias [H|K, Dh]
  L.self_attn.o_proj.weight [D, H*Dh]         layers_{i}/attention/out/kernel [H, Dh, D]
  L.post_attention_layernorm.weight [D]       layers_{i}/mlp_norm/scale
  L.mlp.{gate,up}_proj.weight [F, D]          layers_{i}/mlp/{gate,up}/kernel [D, F]
  L.mlp.down_proj.weight [D, F]               layers_{i}/mlp/down/kernel [F, D]
  model.norm.weight [D]                       final_norm/scale
  lm_head.weight [V, D]                       lm_head/kernel [D, V] (untied only)

A tied model (`tie_word_embeddings`) has no lm_head; a file's `lm_head.weight`, if present,
must equal `model.embed_tokens.weight`. `*.rotary_emb.inv_freq` buffers (old files) are
ignored: RoPE is computed from the config. A Llama with `attention_bias: true` also has
`o_proj.bias`, which our attention lacks: it is accepted when all zero (and written as
zeros), otherwise refused.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import safetensors.numpy

from thack_jax.core import storage
from thack_jax.models.decoder_config import DecoderConfig
from thack_jax.models.hf_decoder_config import config_from_hf, config_to_hf
from thack_jax.models.hf_files import (
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    WEIGHTS_FILE,
    check_values,
    checkpoint_dir,
    is_file,
    read_tensors,
    tensor_index,
    write_checkpoint,
)
from thack_jax.models.mapping import CheckpointMismatchError, flatten, numpy_dtype, unflatten

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
_LAYER = "model.layers.{i}"
_O_BIAS = _LAYER + ".self_attn.o_proj.bias"  # Llama attention_bias only; must be zero
_IGNORED = re.compile(r"(.+\.)?rotary_emb\.inv_freq")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")

# Layouts (HF tensor -> ours): copy; T: transpose; in: [N*Dh, D] -> T -> [D, N, Dh];
# out: [D, H*Dh] -> T -> [H, Dh, D]; flat: [N*Dh] -> [N, Dh].
_TRANSPOSED = ("T", "in", "out")
_Q = "num_attention_heads*head_dim"
_KV = "num_key_value_heads*head_dim"


_D, _F, _V = "hidden_size", "intermediate_size", "vocab_size"
# (HF name, our name, layout, config.json fields of the HF axes); `{i}` = a layer index.
_TABLE = [
    (EMBED, "embed/embedding", "copy", (_V, _D)),
    (HEAD, "lm_head/kernel", "T", (_V, _D)),
    ("model.norm.weight", "final_norm/scale", "copy", (_D,)),
    (f"{_LAYER}.input_layernorm.weight", "layers_{i}/attn_norm/scale", "copy", (_D,)),
    (f"{_LAYER}.post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale", "copy", (_D,)),
    *[
        (f"{_LAYER}.self_attn.{s}_proj.{kind}", f"layers_{{i}}/attention/{ours}/{leaf}", lay, f)
        for s, ours, width in (("q", "query", _Q), ("k", "key", _KV), ("v", "value", _KV))
        for kind, leaf, lay, f in (
            ("weight", "kernel", "in", (width, _D)),
            ("bias", "bias", "flat", (width,)),
        )
    ],
    (f"{_LAYER}.self_attn.o_proj.weight", "layers_{i}/attention/out/kernel", "out", (_D, _Q)),
    (f"{_LAYER}.mlp.gate_proj.weight", "layers_{i}/mlp/gate/kernel", "T", (_F, _D)),
    (f"{_LAYER}.mlp.up_proj.weight", "layers_{i}/mlp/up/kernel", "T", (_F, _D)),
    (f"{_LAYER}.mlp.down_proj.weight", "layers_{i}/mlp/down/kernel", "T", (_D, _F)),
]


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


_TEMPLATES = [(_pattern(h), _pattern(o), h, o, lay, f) for h, o, lay, f in _TABLE]


def _match(name: str, by_ours: bool):
    """(template, layer index or None) whose HF (or our) name matches, else None."""
    for t in _TEMPLATES:
        if m := t[1 if by_ours else 0].fullmatch(name):
            return t, (m.group(1) if m.groups() else None)
    return None


def to_ours(name: str) -> tuple[str, str] | None:
    """HF tensor name -> (our flat name, layout), or None for a name we do not map."""
    if (found := _match(name, by_ours=False)) is None:
        return None
    (_, _, _, ours, layout, _), i = found
    return ours.replace("{i}", i) if i is not None else ours, layout


def to_hf(path: str) -> tuple[str, str]:
    """Our flat name -> (HF tensor name, layout). Raises ValueError for unknown names."""
    if (found := _match(path, by_ours=True)) is None:
        raise ValueError(f"parameter {path!r} has no Hugging Face Llama/Qwen2 name")
    (_, _, hf, _, layout, _), i = found
    return hf.replace("{i}", i) if i is not None else hf, layout


def expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Our flat parameter names -> shapes (the parameter tree of decoder_network)."""
    d, h, k, dh, f, v = (
        config.d_model,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.d_ff,
        config.vocab_size,
    )
    out = {"embed/embedding": (v, d), "final_norm/scale": (d,)}
    if not config.tie_word_embeddings:
        out["lm_head/kernel"] = (d, v)
    for i in range(config.num_layers):
        p = f"layers_{i}"
        out |= {f"{p}/attn_norm/scale": (d,), f"{p}/mlp_norm/scale": (d,)}
        for name, heads in (("query", h), ("key", k), ("value", k)):
            out[f"{p}/attention/{name}/kernel"] = (d, heads, dh)
            if config.attention_bias:
                out[f"{p}/attention/{name}/bias"] = (heads, dh)
        out[f"{p}/attention/out/kernel"] = (h, dh, d)
        out |= {f"{p}/mlp/gate/kernel": (d, f), f"{p}/mlp/up/kernel": (d, f)}
        out[f"{p}/mlp/down/kernel"] = (f, d)
    return out


def _hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of a tensor of our `shape` in `layout`."""
    if layout == "T":
        return tuple(reversed(shape))
    if layout == "in":  # [D, N, Dh] -> [N*Dh, D]
        return (math.prod(shape[1:]), shape[0])
    if layout == "out":  # [H, Dh, D] -> [D, H*Dh]
        return (shape[-1], math.prod(shape[:-1]))
    if layout == "flat":
        return (math.prod(shape),)
    return tuple(shape)


def _to_hf_array(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "in":
        return array.reshape(array.shape[0], -1).T
    if layout == "out":
        return array.reshape(-1, array.shape[-1]).T
    if layout == "flat":
        return array.reshape(-1)
    return array.T if layout == "T" else array


def _o_biases(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """A Llama with attention_bias has o_proj biases that we hold implicitly as zeros."""
    if config.family != "llama" or not config.attention_bias:
        return {}
    return {_O_BIAS.replace("{i}", str(i)): (config.d_model,) for i in range(config.num_layers)}


def expected_hf_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor names -> shapes that transformers' model for `config` has."""
    out = {}
    for path, shape in expected_shapes(config).items():
        name, layout = to_hf(path)
        out[name] = _hf_shape(layout, shape)
    return out | _o_biases(config)


def _field_values(config: DecoderConfig) -> dict[str, int]:
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        _Q: config.num_heads * config.head_dim,
        _KV: config.num_kv_heads * config.head_dim,
    }


def _hints(config: DecoderConfig, found: dict, expected: dict, config_name: str) -> list[str]:
    """Sentences naming each config.json field the weights contradict (first tensor each)."""
    values, blamed, hints = _field_values(config), set(), []
    for name in sorted(set(found) & set(expected)):
        got, want = found[name], expected[name]
        matched = _match(name, by_ours=False)
        fields = matched[0][5] if matched else ("hidden_size",)  # o_proj.bias: [D]
        if got == want or len(got) != len(want):
            continue
        for axis, field in enumerate(fields):
            if got[axis] != want[axis] and field not in blamed:
                blamed.add(field)
                hints.append(f"{config_name} {field}={values[field]} but {name} has shape {got}")
    layers = {int(m.group(1)) for n in found if (m := _HF_LAYER.match(n))}
    if layers and max(layers) + 1 != config.num_layers:
        hints.append(
            f"{config_name} num_hidden_layers={config.num_layers} but the checkpoint has "
            f"{max(layers) + 1} layers"
        )
    if not config.tie_word_embeddings and HEAD not in found:
        hints.append(f"{config_name} tie_word_embeddings=false but the checkpoint has no {HEAD}")
    return hints


def _shape_problems(found: dict, expected: dict) -> list[str]:
    """missing / unexpected / wrong shape lines, each naming the tensor."""
    problems = [
        f"missing {n} (expected shape {expected[n]})" for n in sorted(set(expected) - set(found))
    ]
    for n in sorted(set(found) - set(expected)):
        problems.append(f"unexpected {n} (shape {found[n]})")
    for n in sorted(set(found) & set(expected)):
        if found[n] != expected[n]:
            problems.append(f"wrong shape {n}: expected {expected[n]}, found {found[n]}")
    return problems


def load_hf_decoder(
    directory: str | os.PathLike, dtype: str | None = None
) -> tuple[DecoderConfig, dict]:
    """Loads a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM safetensors checkpoint.

    Args:
      directory: holds config.json and model.safetensors (or the sharded
        model.safetensors.index.json and its shards), e.g. a hub snapshot folder; local
        or a URI (gs://...).
      dtype: parameter dtype ('float32', 'bfloat16', 'float16'); default config.param_dtype
        (float32): stored weights are converted exactly (bf16 -> f32) or rounded.

    Returns:
      (config, params): params is our nested dict of numpy arrays, e.g.
      params['layers_0']['attention']['query']['kernel'] [D, H, Dh].

    Raises:
      FileNotFoundError: the directory, config.json or the weight files are missing.
      CheckpointMismatchError (a ValueError): every missing, unexpected or mis-shaped tensor,
        unsupported dtype and untied/non-zero copy at once, with the config.json fields the
        weights contradict.
      DamagedCheckpointError (a ValueError): a truncated or damaged file, or tensors with
        NaN/inf or |x| >= 1e30 (each listed with its file).
      ValueError: an unsupported config.json value, or only a pickle (.bin) checkpoint.
    """
    directory = checkpoint_dir(directory)
    config_file = storage.join(directory, "config.json")
    if not is_file(config_file):
        raise FileNotFoundError(f"{directory} has no config.json")
    config = config_from_hf(config_file)
    if dtype is not None:
        numpy_dtype(dtype)
        config = config.replace(param_dtype=dtype)
    target = numpy_dtype(config.param_dtype)
    index = tensor_index(directory)

    found, problems = {}, []
    for name, info in sorted(index.items()):
        if _IGNORED.fullmatch(name):
            continue
        if info.dtype not in SAFETENSORS_DTYPES:
            problems.append(
                f"unsupported dtype {info.dtype} for {name}; expected {SAFETENSORS_DTYPES}"
            )
        found[name] = info.shape
    copies = []
    if config.tie_word_embeddings and HEAD in found:
        copies.append(HEAD)  # transformers may still save the tied head: checked below
        del found[HEAD]
    expected = expected_hf_shapes(config)
    problems = [
        *_hints(config, found, expected, "config.json"),
        *_shape_problems(found, expected),
        *problems,  # the dtypes
    ]
    if problems:
        raise CheckpointMismatchError(directory, problems)

    arrays = read_tensors(index, sorted(expected) + copies)
    _check_values(directory, arrays, index)
    for name in copies:
        if not np.array_equal(arrays[name], arrays[EMBED]):
            problems.append(
                f"{name} differs from {EMBED} but config.json has tie_word_embeddings=true "
                "(a tied model uses the embedding as its output layer)"
            )
    for name in sorted(_o_biases(config)):
        if np.any(arrays[name] != 0):
            problems.append(
                f"{name} is not zero (max |x| = {float(np.abs(arrays[name]).max()):.3g}): our "
                "attention has no output bias"
            )
    if problems:
        raise CheckpointMismatchError(directory, problems)
    flat = {}
    for path, shape in expected_shapes(config).items():
        name, layout = to_hf(path)
        array = arrays[name].T if layout in _TRANSPOSED else arrays[name]
        flat[path] = np.asarray(array.reshape(shape), dtype=target, order="C")
    return config, unflatten(flat)


def _check_values(directory: str, arrays: dict, index: dict) -> None:
    """Raises DamagedCheckpointError listing every tensor with NaN/inf or implausible values:
    damaged bytes inside the tensor data leave the format valid."""
    check_values(directory, arrays, lambda name: f"{name} in {index[name].file}")


def hf_tensors(config: DecoderConfig, params: dict, dtype: str = "float32") -> dict:
    """HF tensor name -> numpy array (`dtype`, C order) for our `params`.

    Raises:
      CheckpointMismatchError: params do not match config (every problem listed, our names).
    """
    target = numpy_dtype(dtype)
    flat = flatten(params)
    shapes = {k: tuple(np.shape(v)) for k, v in flat.items()}
    problems = _shape_problems(shapes, expected_shapes(config))
    if problems:
        raise CheckpointMismatchError("params", problems)
    tensors = {}
    for path, value in flat.items():
        name, layout = to_hf(path)
        array = _to_hf_array(np.asarray(value), layout)
        tensors[name] = np.ascontiguousarray(array.astype(target))
    for name, shape in _o_biases(config).items():
        tensors[name] = np.zeros(shape, target)
    return tensors


def save_hf_decoder(
    directory: str | os.PathLike,
    config: DecoderConfig,
    params: dict,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
) -> None:
    """Writes config.json + safetensors that transformers' LlamaForCausalLM /
    Qwen2ForCausalLM (`config.family`) loads with `from_pretrained(directory)`.

    One model.safetensors (replaced if present), or with `max_shard_bytes` the shards
    model-0000k-of-0000n.safetensors (each at most that size unless one tensor is larger)
    and model.safetensors.index.json; local or a URI, each file written atomically.

    Raises:
      CheckpointMismatchError: params do not match config (every problem listed).
      ValueError: an unsupported dtype, or a config transformers cannot express.
      FileExistsError: the directory already holds a sharded checkpoint (or, for a sharded
        export, any checkpoint): stale shards would mix with the new ones.
    """
    directory = os.fspath(directory)
    config_json = config_to_hf(config, dtype)
    tensors = hf_tensors(config, params, dtype)
    if max_shard_bytes is None:
        write_checkpoint(directory, config_json, tensors)
        return
    if (
        isinstance(max_shard_bytes, bool)
        or not isinstance(max_shard_bytes, int)
        or max_shard_bytes < 1
    ):
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r}; expected a positive integer")
    _write_sharded(directory, config_json, tensors, max_shard_bytes)


def _write_sharded(directory: str, config_json: dict, tensors: dict, max_bytes: int) -> None:
    for existing in (WEIGHTS_FILE, INDEX_FILE):
        if storage.exists(storage.join(directory, existing)):
            raise FileExistsError(f"{directory} already holds {existing}; use a new directory")
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    storage.makedirs(directory)
    weight_map = {}
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        # transformers refuses safetensors files without this metadata.
        data = safetensors.numpy.save({n: tensors[n] for n in names}, metadata={"format": "pt"})
        storage.write_atomic(storage.join(directory, file), data)
        weight_map |= {n: file for n in names}
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    # The index last: a reader finds either no checkpoint or a complete one.
    storage.write_json(storage.join(directory, "config.json"), config_json)
    storage.write_json(storage.join(directory, INDEX_FILE), index)
