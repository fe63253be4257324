"""What the evaluator measures and with which resources: `EvalSettings`, one frozen value
checked when it is made (evaluator.py re-exports it)."""

from __future__ import annotations

import dataclasses

from thack_jax.core import checks
from thack_jax.decoding.settings import SamplingConfig

ESTIMATORS = ("rao_blackwell", "plain")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How the `Evaluator` measures: one frozen value, checked when it is made.

    num_samples: responses per prompt and per model.
    max_decode_len: response length cap (a row without EOS is cut there: a complete
      response of that length, as the sampler does).
    seed: the key of every sample drawn (references once, student at every call).
    batch_size: prompts per device batch (bounds memory: scoring a batch holds a few
      arrays [batch_size * num_samples, max_decode_len, V] float32 at once).
    estimator: 'rao_blackwell' (lower variance, never negative) or 'plain'.
    reference_cache_mib: device memory (MiB, all devices together) the evaluator may keep
      for the reference models' full log-probs of their own samples, computed once instead
      of at every checkpoint (batch_scoring.Fixed; num_prompts x num_samples x
      max_decode_len x V x 4 bytes per reference model, the oracle's first). It changes
      how much is recomputed, never a number; 0 caches nothing (not even the reference
      encoders' outputs, which are otherwise always kept: B x Lx x D per batch).
    """

    num_samples: int
    max_decode_len: int
    _: dataclasses.KW_ONLY
    seed: int = 0
    batch_size: int = 16
    estimator: str = "rao_blackwell"
    reference_cache_mib: int = 2048

    def __post_init__(self):
        checks.choice(self, "estimator", ESTIMATORS)
        for name in ("num_samples", "batch_size", "max_decode_len"):
            checks.integer(self, name, 1)
        checks.integer(self, "seed")
        checks.integer(self, "reference_cache_mib", 0)
        # Plain Python ints: equal settings compare and hash equal.
        for name in ("num_samples", "max_decode_len", "seed", "batch_size", "reference_cache_mib"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def sampling(self) -> SamplingConfig:
        """What every model draws: its own distribution (T = 1, untruncated)."""
        return SamplingConfig(max_decode_len=self.max_decode_len, num_samples=self.num_samples)
