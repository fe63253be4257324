"""Hugging Face T5 `config.json` to and from our T5Config.

Tied output (T5 1.0): transformers >= 5 always shares `lm_head` with `shared` unless the file
holds a different `lm_head.weight`, and decides the d_model**-0.5 output scaling with
`scale_decoder_outputs` (older files: `tie_word_embeddings`, default True). Our
`T5Config.tie_word_embeddings` means "tied and scaled", so it is read from that scaling flag.
"""

from __future__ import annotations

import os

from thack_jax.core import storage
from thack_jax.models.config import T5Config
from thack_jax.models.hf_files import is_file, read_json

FEED_FORWARD_ACTIVATION = {"gated-gelu": "gelu_new", "relu": "relu"}
# T5Config field -> config.json key, for messages.
HF_FIELD_NAMES = {
    "num_encoder_layers": "num_layers",
    "feed_forward": "feed_forward_proj",
    "tie_word_embeddings": "scale_decoder_outputs/tie_word_embeddings",
}


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
    """A T5Config from a Hugging Face T5 `config.json` (a dict, the file, or its directory;
    local or a URI).

    Absent fields take transformers' defaults (e.g. feed_forward_proj='relu',
    tie_word_embeddings=True). `overrides` (e.g. dtype='bfloat16') are applied last.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a field we do not support, named with its value.
    """
    if isinstance(config_json, dict):
        c, source = config_json, "config.json"
    else:
        path = os.fspath(config_json)
        if storage.isdir(path):
            path = storage.join(path, "config.json")
        if not is_file(path):
            raise FileNotFoundError(f"no Hugging Face config file at {path}")
        c, source = read_json(path), path
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
