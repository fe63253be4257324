"""Layer 1: the T5 family (config, Flax network, cached decoding, checkpoint I/O)."""

from thack_jax.models.api import (
    count_params,
    decode_logits,
    decode_step,
    encode,
    init_cache,
    init_params,
    logits,
    param_axes,
    param_shapes,
    shift_right,
)
from thack_jax.models.config import NAMED_CONFIGS, T5Config, get_config

__all__ = [
    "NAMED_CONFIGS",
    "T5Config",
    "count_params",
    "decode_logits",
    "decode_step",
    "encode",
    "get_config",
    "init_cache",
    "init_params",
    "logits",
    "param_axes",
    "param_shapes",
    "shift_right",
]
