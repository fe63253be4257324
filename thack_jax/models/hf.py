"""Hugging Face T5 checkpoints (config.json + safetensors) to and from our parameters.

Only safetensors files are read: PyTorch `.bin` files are pickles (loading one can run
code), so they are refused with a message saying how to convert them.

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

Tied output (T5 1.0): transformers >= 5 always shares `lm_head` with `shared` unless the file
holds a different `lm_head.weight`, and decides the d_model**-0.5 output scaling with
`scale_decoder_outputs` (older files: `tie_word_embeddings`, default True). Our
`T5Config.tie_word_embeddings` means "tied and scaled", so it is read from that scaling flag.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import safetensors.numpy
from safetensors import safe_open

from thack_jax.models.config import T5Config
from thack_jax.models.mapping import (
    CheckpointMismatchError,
    flatten,
    numpy_dtype,
    unflatten,
    validate,
)

SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "F64")
FEED_FORWARD_ACTIVATION = {"gated-gelu": "gelu_new", "relu": "relu"}
# Copies of `shared.weight` some files carry; accepted when equal to it.
EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Present in some old files; transformers ignores it (cross-attention has no position bias).
IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# T5Config field -> config.json key, for messages.
HF_FIELD_NAMES = {
    "num_encoder_layers": "num_layers",
    "feed_forward": "feed_forward_proj",
    "tie_word_embeddings": "scale_decoder_outputs/tie_word_embeddings",
}

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


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, expected a JSON object")
    return value


def _scales_decoder_outputs(c: dict, source: str) -> bool:
    """Whether the HF model scales the decoder output by d_model**-0.5 (T5 1.0, tied)."""
    tie = c.get("tie_word_embeddings", True)  # transformers' default when absent
    if "scale_decoder_outputs" not in c:
        return tie is not False
    scale = bool(c["scale_decoder_outputs"])
    if scale and tie is False:
        raise ValueError(
            f"{source} scale_decoder_outputs=True with tie_word_embeddings=False: a scaled "
            "output with a separate lm_head is not supported"
        )
    return scale


def config_from_hf(config_json: dict | str | os.PathLike, **overrides) -> T5Config:
    """A T5Config from a Hugging Face T5 `config.json` (a dict, the file, or its directory).

    Absent fields take transformers' defaults (e.g. feed_forward_proj='relu',
    tie_word_embeddings=True). `overrides` (e.g. dtype='bfloat16') are applied last.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a field we do not support, named with its value.
    """
    if isinstance(config_json, dict):
        c, source = config_json, "config.json"
    else:
        path = Path(config_json)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no Hugging Face config file at {path}")
        c, source = _read_json(path), str(path)
    model_type = c.get("model_type", "t5")
    if model_type != "t5":
        raise ValueError(f"{source} model_type={model_type!r} is not supported; expected 't5'")
    ff = c.get("feed_forward_proj", "relu")
    if ff not in FEED_FORWARD_ACTIVATION:
        raise ValueError(
            f"{source} feed_forward_proj={ff!r} is not supported; expected 'gated-gelu' "
            "(T5 v1.1 / Flan-T5) or 'relu' (T5 1.0)"
        )
    if "is_gated_act" in c and bool(c["is_gated_act"]) != ff.startswith("gated-"):
        raise ValueError(
            f"{source} is_gated_act={c['is_gated_act']} contradicts feed_forward_proj={ff!r}"
        )
    act = FEED_FORWARD_ACTIVATION[ff]
    if c.get("dense_act_fn", act) != act:
        raise ValueError(
            f"{source} dense_act_fn={c['dense_act_fn']!r} is not supported with "
            f"feed_forward_proj={ff!r} (expected {act!r})"
        )
    defaults = dict(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_heads=8,
        num_layers=6,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    )
    ints = {}
    for key, default in defaults.items():
        value = c.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source} {key}={value!r}; expected a positive integer")
        ints[key] = value
    num_decoder_layers = c.get("num_decoder_layers") or ints["num_layers"]
    if isinstance(num_decoder_layers, bool) or not isinstance(num_decoder_layers, int):
        raise ValueError(f"{source} num_decoder_layers={num_decoder_layers!r}; expected an integer")
    eps = c.get("layer_norm_epsilon", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f"{source} layer_norm_epsilon={eps!r}; expected a positive number")
    return T5Config(
        vocab_size=ints["vocab_size"],
        d_model=ints["d_model"],
        d_kv=ints["d_kv"],
        d_ff=ints["d_ff"],
        num_heads=ints["num_heads"],
        num_encoder_layers=ints["num_layers"],
        num_decoder_layers=num_decoder_layers,
        relative_attention_num_buckets=ints["relative_attention_num_buckets"],
        relative_attention_max_distance=ints["relative_attention_max_distance"],
        feed_forward=ff,
        tie_word_embeddings=_scales_decoder_outputs(c, source),
        layer_norm_epsilon=float(eps),
    ).replace(**overrides)


def config_to_hf(config: T5Config, dtype: str = "float32") -> dict:
    """The transformers `T5Config` dict (config.json) for `config`, weights stored as `dtype`."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "feed_forward_proj": config.feed_forward,
        "dense_act_fn": FEED_FORWARD_ACTIVATION[config.feed_forward],
        "is_gated_act": config.feed_forward.startswith("gated-"),
        # Both keys: transformers < 5 reads the first, >= 5 the second.
        "tie_word_embeddings": config.tie_word_embeddings,
        "scale_decoder_outputs": config.tie_word_embeddings,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "dropout_rate": 0.0,
        "initializer_factor": 1.0,
        "decoder_start_token_id": config.pad_id,
        "pad_token_id": config.pad_id,
        "eos_token_id": config.eos_id,
        "use_cache": True,
        "dtype": dtype,
    }


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint path {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(
            f"checkpoint path {directory} is a file; pass the directory holding config.json "
            "and model.safetensors"
        )
    return directory


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors or the sharded index."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        files = {}
        for name, shard in weight_map.items():
            # A shard name must be a plain file name: the index may not point elsewhere.
            if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                raise ValueError(f"{index} maps {name!r} to {shard!r}, not a file name")
            if not (directory / shard).is_file():
                raise FileNotFoundError(
                    f"{index} lists shard {shard} but {directory / shard} is missing"
                )
            files[name] = directory / shard
        return files
    pickles = sorted(p.name for p in directory.glob("*.bin"))
    if pickles:
        raise ValueError(
            f"{directory} holds {pickles} but no model.safetensors: PyTorch .bin checkpoints "
            "are pickles and are not supported. Convert once with transformers: "
            "T5ForConditionalGeneration.from_pretrained(dir).save_pretrained(out, "
            "safe_serialization=True)"
        )
    listing = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"{directory} has no model.safetensors or model.safetensors.index.json (found {listing})"
    )


def _headers(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, safetensors dtype string), reading only the file headers."""
    out = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                if files.get(name) == path:
                    piece = f.get_slice(name)
                    out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    missing = sorted(set(files) - set(out))
    if missing:
        raise ValueError(f"the safetensors index lists tensors its shards lack: {missing}")
    return out


def _read(files: dict[str, Path], names: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted({files[n] for n in names}):
        with safe_open(path, framework="numpy") as f:
            for name in names:
                if files[name] == path:
                    out[name] = f.get_tensor(name)
    return out


def load_hf_checkpoint(
    path: str | os.PathLike, config: T5Config | None = None, dtype: str | None = None
) -> tuple[T5Config, dict]:
    """Loads a Hugging Face T5ForConditionalGeneration safetensors checkpoint.

    Args:
      path: directory with config.json and model.safetensors (or the sharded
        model.safetensors.index.json and its shards).
      config: use this config instead of config.json (the weights are checked against it).
      dtype: parameter dtype ('float32', 'bfloat16', 'float16'); default config.param_dtype.

    Returns:
      (config, params): params is our nested dict of numpy arrays, e.g.
      params['encoder']['layers_0']['attention']['query']['kernel'] [D, H*Dk].

    Raises:
      FileNotFoundError: the path, config.json or the weight files are missing.
      CheckpointMismatchError (a ValueError): every missing, unexpected or mis-shaped
        tensor and unsupported dtype, at once, and the config fields the weights contradict.
      ValueError: an unsupported config.json value, or only a pickle (.bin) checkpoint.
    """
    directory = _checkpoint_dir(path)
    config_file = directory / "config.json"
    hf_config = _read_json(config_file) if config_file.is_file() else None
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
    files = _weight_files(directory)
    headers = _headers(files)

    found, sources, unknown, problems = {}, {}, [], []
    for name, (shape, stored) in sorted(headers.items()):
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
    copies = [n for n in EMBEDDING_COPIES if n in headers]
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

    arrays = _read(files, sorted(set(sources.values()) | set(copies)))
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


def save_hf_checkpoint(
    path: str | os.PathLike, config: T5Config, params: dict, dtype: str = "float32"
) -> None:
    """Writes config.json + model.safetensors that transformers' T5ForConditionalGeneration
    loads with `from_pretrained(path)`. Existing files of those names are replaced.

    Raises:
      CheckpointMismatchError: params do not match config (every problem listed).
      FileExistsError: the directory already holds a sharded checkpoint.
    """
    target = numpy_dtype(dtype)
    flat = flatten(params)
    shapes = {k: tuple(np.shape(v)) for k, v in flat.items()}
    validate(config, shapes, "params", lambda p: (p, False))
    directory = Path(path)
    if (directory / "model.safetensors.index.json").exists():
        raise FileExistsError(
            f"{directory} already holds a sharded checkpoint; use a new directory"
        )
    tensors = {}
    for ours, value in flat.items():
        name, transposed = to_hf(ours)
        array = np.asarray(value)
        tensors[name] = np.ascontiguousarray((array.T if transposed else array).astype(target))
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "config.json", "w") as f:
        json.dump(config_to_hf(config, dtype), f, indent=2, sort_keys=True)
    # transformers refuses safetensors files without this metadata.
    safetensors.numpy.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
