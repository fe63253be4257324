"""Layer 1: the model families (T5 encoder-decoder; decoder-only Llama / Qwen2): configs,
Flax networks, cached decoding and checkpoint I/O, behind one API (api.py) chosen by the
config's type."""

from thack_jax.models.api import (
    ModelConfig,
    count_params,
    decode_logits,
    decode_step,
    encode,
    init_cache,
    init_params,
    is_decoder_only,
    logits,
    param_axes,
    param_shapes,
    shift_right,
)
from thack_jax.models.config import NAMED_CONFIGS, T5Config, get_config
from thack_jax.models.decoder_config import DECODER_CONFIGS, DecoderConfig

__all__ = [
    "DECODER_CONFIGS",
    "DecoderConfig",
    "ModelConfig",
    "NAMED_CONFIGS",
    "T5Config",
    "count_params",
    "decode_logits",
    "decode_step",
    "encode",
    "get_config",
    "init_cache",
    "init_params",
    "is_decoder_only",
    "logits",
    "param_axes",
    "param_shapes",
    "shift_right",
]
