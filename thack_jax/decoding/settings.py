"""What the sampler draws: the sampling settings as one frozen, validated value.

`SamplingConfig` is checked once, when it is made (the strategy arguments by
`strategies.validate_strategy`, the counts here); the checks that need the model
(max_decode_len <= config.max_target_length, top_k <= the vocabulary size, the prompt
shape) stay in `sampling.validate_sample_args`, where the model is known. It is hashable,
so it keys the sampler's compile cache.
"""

from __future__ import annotations

import dataclasses

from thack_jax.core import checks
from thack_jax.decoding import strategies


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How `sampling.sample` draws responses.

    max_decode_len: Ly >= 1, the response length cap (required).
    num_samples: n >= 1 responses per prompt (rows prompt-major: i * n + j).
    temperature: 0 = greedy, else the logits are divided by it.
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass (1 = off). Not both.
    draw: how a token is drawn from the sampling distribution (`strategies.DRAWS`).
    """

    max_decode_len: int
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    draw: str = "inverse_cdf"

    def __post_init__(self):
        checks.integer(self, "max_decode_len", 1)
        checks.integer(self, "num_samples", 1)
        strategies.validate_strategy(self.temperature, self.top_k, self.top_p, draw=self.draw)
        # Plain Python scalars: equal settings hash equal and trace the same graph.
        for name, kind in (
            ("max_decode_len", int),
            ("num_samples", int),
            ("temperature", float),
            ("top_k", int),
            ("top_p", float),
        ):
            object.__setattr__(self, name, kind(getattr(self, name)))

    @property
    def truncated(self) -> bool:
        """Whether top-k or top-p cuts the sampling distribution."""
        return self.top_k > 0 or self.top_p < 1

    def gives_distillation_targets(self, temperature: float) -> bool:
        """True when the sampler's full log-probs of these settings are the targets a train
        step at distillation `temperature` computes from the same model,
        log_softmax(logits / temperature): the sampling temperature equals it and the
        sampling distribution is not truncated (top-k / top-p)."""
        return self.temperature == temperature and not self.truncated
