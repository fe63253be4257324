"""T5 configuration: one frozen dataclass and the named sizes.

The dataclass is hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses

from thack_jax.core import checks

FEED_FORWARD_KINDS = ("gated-gelu", "relu")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 encoder-decoder.

    T5 v1.1 / Flan-T5: `feed_forward='gated-gelu'`, `tie_word_embeddings=False`.
    T5 1.0: `feed_forward='relu'`, `tie_word_embeddings=True` (logits scaled by d_model^-0.5).
    `dtype` is the activation (compute) dtype, `param_dtype` the storage dtype of parameters.
    Dropout is not modelled: the paper (and every stage of the study) trains with dropout 0.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward: str = "gated-gelu"
    tie_word_embeddings: bool = False
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    max_input_length: int = 1024
    max_target_length: int = 512
    pad_id: int = 0
    eos_id: int = 1

    def __post_init__(self):
        checks.choice(self, "feed_forward", FEED_FORWARD_KINDS)
        checks.choice(self, "dtype", DTYPES)
        checks.choice(self, "param_dtype", DTYPES)
        for field in (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_heads",
            "num_encoder_layers",
            "num_decoder_layers",
            "relative_attention_num_buckets",
        ):
            checks.integer(self, field, 1)

    def replace(self, **overrides) -> T5Config:
        return dataclasses.replace(self, **overrides)

    @property
    def inner_dim(self) -> int:
        """Width of the joined attention heads, num_heads * d_kv."""
        return self.num_heads * self.d_kv


def _v11(d_model, d_ff, num_heads, num_layers, d_kv=64) -> dict:
    return dict(
        d_model=d_model,
        d_ff=d_ff,
        num_heads=num_heads,
        d_kv=d_kv,
        num_encoder_layers=num_layers,
        num_decoder_layers=num_layers,
    )


def _v10(d_model: int, d_ff: int, num_heads: int, num_layers: int) -> dict:
    """Original T5 (1.0): a v1.1 shape with a ReLU feed-forward and tied embeddings."""
    return dict(
        _v11(d_model, d_ff, num_heads, num_layers), feed_forward="relu", tie_word_embeddings=True
    )


# Published T5 v1.1 / Flan-T5 sizes (HF google/t5-v1_1-* configs).
NAMED_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        max_input_length=64,
        max_target_length=64,
    ),
    "small": _v11(512, 1024, 6, 8),
    "base": _v11(768, 2048, 12, 12),
    "large": _v11(1024, 2816, 16, 24),
    "xl": _v11(2048, 5120, 32, 24),
    "xxl": _v11(4096, 10240, 64, 24),
    # Original T5 (1.0): ReLU feed-forward, tied input/output embedding.
    "t5_1_0_small": _v10(512, 2048, 8, 6),
    "t5_1_0_base": _v10(768, 3072, 12, 12),
}


def get_config(name: str, **overrides):
    """Returns the named configuration, with `overrides` applied: a T5Config for the T5
    sizes (NAMED_CONFIGS), a DecoderConfig for the decoder-only ones (DECODER_CONFIGS of
    decoder_config.py: 'llama-tiny', 'qwen2-tiny', 'smollm2-135m', ...).

    Raises:
      ValueError: unknown name (the message lists the valid names) or an unknown field.
    """
    from thack_jax.models import decoder_config

    if name in decoder_config.DECODER_CONFIGS:
        return decoder_config.get_decoder_config(name, **overrides)
    if name not in NAMED_CONFIGS:
        valid = sorted(NAMED_CONFIGS) + sorted(decoder_config.DECODER_CONFIGS)
        raise ValueError(f"unknown model size {name!r}; valid names: {valid}")
    fields = {f.name for f in dataclasses.fields(T5Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown T5Config field(s) {unknown}; valid fields: {sorted(fields)}")
    return T5Config(**{**NAMED_CONFIGS[name], **overrides})
