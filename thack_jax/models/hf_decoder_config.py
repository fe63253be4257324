"""Hugging Face Llama / Qwen2 `config.json` to and from our DecoderConfig.

Both the transformers >= 5 layout (`rope_parameters: {rope_theta, rope_type, ...}`, `dtype`)
and the older one (`rope_theta` + `rope_scaling`, `torch_dtype`) are read; an export writes
both, so transformers 4 and 5 read it alike. Values transformers would default are
defaulted the same way (e.g. `head_dim` = hidden_size // num_attention_heads). What our
network cannot compute is refused, naming the key and value: another architecture, an
activation other than SiLU, sliding-window attention, MLP biases, RoPE scaling other than
'llama3', partial rotary embeddings.

The file's weight dtype (`dtype` / `torch_dtype`) does not set ours: an import upcasts the
stored weights exactly into `param_dtype` (float32 unless asked), as the T5 importer does.
"""

from __future__ import annotations

import os

from thack_jax.core import storage
from thack_jax.models.decoder_config import LLAMA3_KEYS, DecoderConfig
from thack_jax.models.hf_files import is_file, read_json

# architectures[0] -> (model_type, our family).
ARCHITECTURES = {"LlamaForCausalLM": ("llama", "llama"), "Qwen2ForCausalLM": ("qwen2", "qwen2")}
FAMILY_ARCHITECTURE = {family: arch for arch, (_, family) in ARCHITECTURES.items()}
# DecoderConfig field -> config.json key, for messages.
HF_FIELD_NAMES = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "d_ff": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "tie_word_embeddings": "tie_word_embeddings",
}
# transformers' defaults for keys a config.json may omit (LlamaConfig / Qwen2Config).
_DEFAULTS = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
    ),
    "qwen2": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=32768,
    ),
}


def _read(config_json: dict | str | os.PathLike) -> tuple[dict, str]:
    if isinstance(config_json, dict):
        return config_json, "config.json"
    path = os.fspath(config_json)
    if storage.isdir(path):
        path = storage.join(path, "config.json")
    if not is_file(path):
        raise FileNotFoundError(f"no Hugging Face config file at {path}")
    return read_json(path), path


def _architecture(c: dict, source: str) -> str:
    """Our family from `architectures` (else `model_type`), refusing any other model."""
    archs, model_type = c.get("architectures"), c.get("model_type")
    if archs is not None:
        if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise ValueError(
                f"{source} architectures={archs!r} is not supported; expected "
                f"{sorted(ARCHITECTURES)} (one of them)"
            )
        expected_type, family = ARCHITECTURES[archs[0]]
        if model_type is not None and model_type != expected_type:
            raise ValueError(
                f"{source} model_type={model_type!r} contradicts architectures={archs!r} "
                f"(expected {expected_type!r})"
            )
        return family
    by_type = {t: family for t, family in ARCHITECTURES.values()}
    if model_type not in by_type:
        raise ValueError(
            f"{source} has no 'architectures' and model_type={model_type!r} is not supported; "
            f"expected one of {sorted(by_type)}"
        )
    return by_type[model_type]


def _positive_int(c: dict, key: str, default, source: str) -> int:
    value = c.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source} {key}={value!r}; expected a positive integer")
    return value


def _positive_float(value, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{source} {key}={value!r}; expected a positive number")
    return float(value)


def _rope(c: dict, source: str, max_positions: int) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling as DecoderConfig's sorted (key, value) tuple or None)."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    where = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        raise ValueError(f"{source} {where}={params!r}; expected an object")
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    theta = _positive_float(theta, "rope_theta", source)
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(
            f"{source} partial_rotary_factor={partial!r} is not supported (RoPE on the whole "
            "head_dim only)"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"{source} {where}.rope_type={rope_type!r} is not supported; expected 'default' "
            "or 'llama3'"
        )
    # transformers falls back to max_position_embeddings for the pre-scaling context.
    values = {"original_max_position_embeddings": max_positions, **params}
    missing = [k for k in LLAMA3_KEYS if values.get(k) is None]
    if missing:
        raise ValueError(f"{source} {where} (rope_type='llama3') lacks {missing}")
    scaling = {k: _positive_float(values[k], f"{where}.{k}", source) for k in LLAMA3_KEYS}
    original = values["original_max_position_embeddings"]
    if isinstance(original, bool) or not isinstance(original, int):
        raise ValueError(
            f"{source} {where}.original_max_position_embeddings={original!r}; expected an integer"
        )
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(
            f"{source} {where}: high_freq_factor={values['high_freq_factor']!r} must exceed "
            f"low_freq_factor={values['low_freq_factor']!r}"
        )
    scaling["original_max_position_embeddings"] = original
    scaling["rope_type"] = "llama3"
    return theta, tuple(sorted(scaling.items()))


def _check_supported(c: dict, family: str, source: str, num_layers: int) -> bool:
    """Refuses what the network cannot compute; returns attention_bias."""
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source} hidden_act={act!r} is not supported; expected 'silu'")
    if c.get("mlp_bias"):
        raise ValueError(f"{source} mlp_bias={c['mlp_bias']!r} is not supported (no MLP biases)")
    layer_types = c.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        others = sorted({t for t in layer_types if t != "full_attention"})
        raise ValueError(
            f"{source} layer_types has {others}: only 'full_attention' layers are supported"
        )
    if family == "qwen2" and c.get("use_sliding_window"):
        window_from = c.get("max_window_layers", 28)
        if layer_types is None and window_from < num_layers:
            raise ValueError(
                f"{source} use_sliding_window=True (layers >= max_window_layers={window_from}) "
                "is not supported: only full attention"
            )
    if family == "qwen2":
        return True  # Qwen2 always has q/k/v biases (and none on o_proj).
    bias = c.get("attention_bias", False)
    if not isinstance(bias, bool):
        raise ValueError(f"{source} attention_bias={bias!r}; expected true or false")
    return bias


def config_from_hf(config_json: dict | str | os.PathLike, **overrides) -> DecoderConfig:
    """A DecoderConfig from a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM `config.json`
    (a dict, the file, or its directory; local or a URI).

    Absent keys take transformers' defaults; `overrides` (e.g. dtype='bfloat16') are applied
    last. A Llama with `attention_bias: true` is accepted (its o_proj biases must be zero,
    see hf_decoder): our attention has q/k/v biases only.

    Raises:
      FileNotFoundError: no such file.
      ValueError: an unsupported architecture or value, named with its key.
    """
    c, source = _read(config_json)
    family = _architecture(c, source)
    defaults = _DEFAULTS[family]
    ints = {
        key: _positive_int(c, key, default, source)
        for key, default in defaults.items()
        if key != "num_key_value_heads"
    }
    heads, hidden = ints["num_attention_heads"], ints["hidden_size"]
    kv_heads = _positive_int(
        c, "num_key_value_heads", defaults.get("num_key_value_heads", heads), source
    )
    if heads % kv_heads:
        raise ValueError(
            f"{source} num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}"
        )
    head_dim = _positive_int(c, "head_dim", hidden // heads, source)
    theta, scaling = _rope(c, source, ints["max_position_embeddings"])
    bias = _check_supported(c, family, source, ints["num_hidden_layers"])
    eps = _positive_float(c.get("rms_norm_eps", 1e-6), "rms_norm_eps", source)
    # transformers allows none or a list; none keeps the package's EOS (1).
    eos = c.get("eos_token_id")
    eos = 1 if eos is None else eos
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if not isinstance(eos, int) or isinstance(eos, bool) or eos < 0:
        raise ValueError(f"{source} eos_token_id={c.get('eos_token_id')!r}; expected a token id")
    tie = c.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ValueError(f"{source} tie_word_embeddings={tie!r}; expected true or false")
    return DecoderConfig(
        vocab_size=ints["vocab_size"],
        d_model=hidden,
        num_layers=ints["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        d_ff=ints["intermediate_size"],
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=eps,
        tie_word_embeddings=tie,
        attention_bias=bias,
        family=family,
        eos_id=eos,
    ).replace(**overrides)


def _max_positions(config: DecoderConfig) -> int:
    """max_position_embeddings for an export: RoPE needs no table, so this only informs
    transformers (generation limits, llama3 validation): the scaled context under llama3
    scaling, else the family's transformers default."""
    scaling = dict(config.rope_scaling or ())
    if scaling:
        return int(scaling["original_max_position_embeddings"] * scaling["factor"])
    return _DEFAULTS[config.family]["max_position_embeddings"]


def config_to_hf(config: DecoderConfig, dtype: str = "float32") -> dict:
    """The transformers config.json dict for `config`, weights stored as `dtype`.

    Raises:
      ValueError: family 'qwen2' without attention_bias (Qwen2 always has q/k/v biases).
    """
    if config.family == "qwen2" and not config.attention_bias:
        raise ValueError(
            "DecoderConfig(family='qwen2', attention_bias=False) cannot be written as "
            "Qwen2ForCausalLM, which always has q/k/v biases; use family='llama'"
        )
    rope = {"rope_theta": config.rope_theta, "rope_type": "default"}
    rope.update(dict(config.rope_scaling or ()))
    out = {
        "architectures": [FAMILY_ARCHITECTURE[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _max_positions(config),
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        # transformers >= 5 reads rope_parameters, older versions rope_theta + rope_scaling.
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "attention_dropout": 0.0,
        "pad_token_id": 0,  # the package's padding token
        "eos_token_id": config.eos_id,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if config.family == "llama":
        out |= {"attention_bias": config.attention_bias, "mlp_bias": False}
    else:
        out |= {"use_sliding_window": False, "sliding_window": None}
        out["max_window_layers"] = config.num_layers
    return out
