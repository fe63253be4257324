"""Decoder-only (Llama / Qwen2) configuration: one frozen dataclass and the named sizes.

The dataclass is hashable so it can be a static argument of `jax.jit`; `rope_scaling` is
therefore a tuple of (key, value) pairs, not a dict (`rope_scaling_dict()` gives the dict).
The named sizes are the published config.json values of the HF checkpoints they name.
"""

from __future__ import annotations

import dataclasses

from thack_jax.core import checks

DTYPES = ("float32", "bfloat16", "float16")
FAMILIES = ("llama", "qwen2")
ROPE_TYPES = ("llama3",)  # rope_scaling types implemented (transformers' names)
LLAMA3_KEYS = ("factor", "high_freq_factor", "low_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a pre-norm decoder-only transformer (Llama / Qwen2).

    Attention: `num_heads` query heads of width `head_dim`, `num_kv_heads` key/value heads
    (grouped-query attention; 1 = multi-query), rotary position embeddings (`rope_theta`,
    optional Llama-3 `rope_scaling`). Qwen2 sets `attention_bias` (q/k/v biases, none on the
    output projection). `dtype` is the activation dtype, `param_dtype` the storage dtype.
    Token 0 is padding and `eos_id` (1, the T5 vocabularies' EOS that the package's tasks
    use) ends a sampled response (the package convention; see docs/architecture.md).
    `max_input_length` / `max_target_length`: the prompt and response caps the sampler and
    the evaluator check, as for T5Config (a row's positions reach their sum).
    """

    vocab_size: int = 128
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    d_ff: int = 128
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    family: str = "llama"
    init_std: float = 0.02
    pad_id: int = 0
    eos_id: int = 1
    max_input_length: int = 512
    max_target_length: int = 512

    def __post_init__(self):
        for field in (
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "d_ff",
            "max_input_length",
            "max_target_length",
        ):
            checks.integer(self, field, 1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"DecoderConfig.num_heads={self.num_heads!r} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads!r}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"DecoderConfig.head_dim={self.head_dim!r} must be even (rotary embeddings)"
            )
        checks.positive(self, "rope_theta")
        checks.positive(self, "rms_norm_eps")
        checks.positive(self, "init_std")
        checks.choice(self, "dtype", DTYPES)
        checks.choice(self, "param_dtype", DTYPES)
        checks.choice(self, "family", FAMILIES)
        for field in ("tie_word_embeddings", "attention_bias"):
            checks.instance(self, field, bool)
        checks.integer(self, "pad_id", 0)
        checks.integer(self, "eos_id", 0)
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        where = checks.where(self, "rope_scaling")
        pairs_ok = isinstance(scaling, tuple) and all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in scaling
        )
        if not pairs_ok:
            raise checks.FieldTypeError(f"{where} must be None or a tuple of (key, value) pairs")
        values = dict(scaling)
        rope_type = values.get("rope_type", values.get("type"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{where}: rope_type {rope_type!r} must be one of {ROPE_TYPES}")
        missing = [k for k in LLAMA3_KEYS if not checks.is_number(values.get(k))]
        if missing:
            raise ValueError(f"{where}: llama3 scaling needs numbers for {missing}")
        if values["high_freq_factor"] <= values["low_freq_factor"]:
            raise ValueError(f"{where}: high_freq_factor must exceed low_freq_factor")

    def replace(self, **overrides) -> DecoderConfig:
        return dataclasses.replace(self, **overrides)

    def rope_scaling_dict(self) -> dict | None:
        """`rope_scaling` as a dict (transformers' config.json form), or None."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head, num_heads // num_kv_heads."""
        return self.num_heads // self.num_kv_heads


_TINY = dict(
    vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128
)

# Published sizes (HF config.json of HuggingFaceTB/SmolLM2-135M, Qwen/Qwen2.5-0.5B,
# meta-llama/Llama-3.2-1B). Parameter counts: tests/models/test_decoder_model.py.
DECODER_CONFIGS: dict[str, dict] = {
    "llama-tiny": dict(_TINY),
    "qwen2-tiny": dict(_TINY, attention_bias=True, tie_word_embeddings=True, family="qwen2"),
    "smollm2-135m": dict(
        vocab_size=49152,
        d_model=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        d_ff=1536,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        d_model=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        d_ff=4864,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=True,
        family="qwen2",
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        rope_theta=500000.0,
        rope_scaling=(
            ("factor", 32.0),
            ("high_freq_factor", 4.0),
            ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 8192),
            ("rope_type", "llama3"),
        ),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}


def get_decoder_config(name: str, **overrides) -> DecoderConfig:
    """Returns the named decoder-only configuration, with `overrides` applied.

    Raises:
      ValueError: unknown name (the message lists the valid names) or an unknown field.
    """
    if name not in DECODER_CONFIGS:
        raise ValueError(f"unknown decoder size {name!r}; valid names: {sorted(DECODER_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(DecoderConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown DecoderConfig field(s) {unknown}; valid fields: {sorted(fields)}"
        )
    return DecoderConfig(**{**DECODER_CONFIGS[name], **overrides})
