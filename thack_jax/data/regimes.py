"""Distillation data regimes: batch sources for the trainer (numpy + jax, no TensorFlow).

Every source follows the trainer's `BatchSource` protocol:
  next_batch(step, student_params) -> {'inputs' [B, Lx] int32, 'targets' [B, Ly] int32,
                                       optionally 'teacher_logprobs' [B, Ly, V] float32}
  state_dict() -> dict (JSON-serialisable); load_state_dict(state).

Regimes (`regime_names.Regime`):
  offline         rows of an `OfflineStore` (completions generated once), reshuffled per epoch.
  online_teacher  fresh teacher samples for each batch of prompts; when the sampler's full
                  log-probs are the step's tempered teacher (sampling temperature ==
                  distillation temperature, no top-k / top-p) they come along as
                  'teacher_logprobs' and the trainer skips its teacher forward; otherwise
                  the trainer runs it, as for offline rows.
  online_student  fresh samples of the student under the params passed to `next_batch`. The
                  trainer calls `next_batch(step, params)` BEFORE the train step of `step`,
                  with the params that step starts from: the samples are on-policy for the
                  very parameters the gradient is taken at.
  mixed           each batch has k online rows and B - k offline rows (see `MixedSource`).

Randomness and resume: row orders come from `np.random.default_rng([seed, epoch, ...])`
permutations and the sampling key of step t is `fold_in(key(seed), t)`. A source's state is
only its positions in these orders, so a source restored with `load_state_dict` gives the
same batch at step t as an uninterrupted one, independent of how it got there.

Modules: `row_streams.py` (the row orders, `PromptPool`, `OfflineSource`), `generation.py`
(`OnlineSource`, `build_offline_store`), this one (`MixedSource`, `SourceConfig`,
`make_source`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from thack_jax.core import checks
from thack_jax.data.generation import OnlineSource
from thack_jax.data.offline_store import OfflineStore
from thack_jax.data.regime_names import SAMPLER_ROLES, Regime
from thack_jax.data.row_streams import (
    MIX_SALT,
    OfflineSource,
    PromptPool,
    check_batch_size,
    process_share,
)
from thack_jax.decoding.settings import SamplingConfig
from thack_jax.parallel.partitioning import to_host

# ----------------------------------------------------------------------------- mixture


class MixedSource:
    """Per-batch mixing: batch t has k(t) online rows (first) and B - k(t) offline rows.

    k(t) = floor(f*B) + [u_t < f*B - floor(f*B)] with u_t ~ U[0, 1) from
    `default_rng([seed, t, 2])`: deterministic per step, k(t) in {floor, ceil} and
    E[k] = f*B exactly, so every step's gradient has the same expected composition
    ("f of the data is online") rather than alternating whole online / offline steps.
    Offline rows keep their epoch accounting (each row once per epoch). 'teacher_logprobs'
    is never returned: the trainer's teacher forward serves all rows. `last_num_online`
    holds k of the latest batch (for logging). State: both children's states.
    """

    def __init__(
        self,
        offline: OfflineSource,
        online: OnlineSource,
        online_fraction: float,
        batch_size: int,
        seed: int = 0,
    ):
        try:
            f = float(online_fraction)
        except (TypeError, ValueError):
            f = math.nan
        if not 0 <= f <= 1:  # also refuses NaN
            raise ValueError(f"online_fraction must be a number in [0, 1], got {online_fraction!r}")
        self.batch_size, self.seed = check_batch_size(batch_size), int(seed)
        if online.provide_teacher_logprobs:
            raise ValueError(
                "MixedSource needs an online source without provide_teacher_logprobs"
                " (the trainer's teacher forward serves all rows)"
            )
        lx, ly = offline.store.inputs.shape[1], offline.store.targets.shape[1]
        if online.prompts.prompts.shape[1] != lx or online.max_decode_len != ly:
            raise ValueError(
                f"online rows [., {online.prompts.prompts.shape[1]}] -> [., "
                f"{online.max_decode_len}] do not match the offline store's inputs [., {lx}] "
                f"and targets [., {ly}]"
            )
        self.offline, self.online, self.online_fraction = offline, online, f
        self.last_num_online = None

    def num_online(self, step: int) -> int:
        x = self.online_fraction * self.batch_size
        lo = math.floor(x + 1e-9)
        frac = x - lo
        if frac <= 1e-9:
            return min(lo, self.batch_size)
        u = np.random.default_rng([self.seed, int(step), MIX_SALT]).random()
        return lo + int(u < frac)

    def next_batch(self, step: int, student_params=None) -> dict:
        k = self.num_online(step)
        # Offline first: if the store is exhausted nothing is consumed from the prompt pool.
        parts = [self.offline.next_rows(self.batch_size - k)] if k < self.batch_size else []
        if k:
            pad_to = math.ceil(self.online_fraction * self.batch_size - 1e-9)
            online = self.online.sample_rows(step, student_params, k, pad_to=pad_to)
            parts.insert(0, {"inputs": online["inputs"], "targets": to_host(online["targets"])})
        self.last_num_online = k
        keys = ("inputs", "targets")
        return process_share(
            {n: np.concatenate([p[n] for p in parts]).astype(np.int32) for n in keys}
        )

    def state_dict(self) -> dict:
        return {"offline": self.offline.state_dict(), "online": self.online.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.offline.load_state_dict(state["offline"])
        self.online.load_state_dict(state["online"])


# ----------------------------------------------------------------------------- factory


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """How a batch source draws its batches (the model-free settings of `make_source`).

    batch_size: B >= 1 rows per batch. seed: the row orders and sampling keys.
    num_epochs: offline epochs before StopIteration (None = endless).
    online_fraction: 'mixed' only, in [0, 1] (None for the other regimes).
    online_role: who samples the online rows of 'mixed' ('student' or 'teacher').
    provide_teacher_logprobs: 'online_teacher' returns the sampler's log-probs, if they are
      the train step's targets (see `distill_temperature`).
    distill_temperature: the train step's StepConfig.temperature (> 0). The sampler's
      log-probs are passed as 'teacher_logprobs' only when
      `sampling.gives_distillation_targets` of it; otherwise the step computes its tempered
      teacher forward.
    """

    batch_size: int
    seed: int
    num_epochs: int | None = None
    online_fraction: float | None = None
    online_role: str = "student"
    provide_teacher_logprobs: bool = True
    distill_temperature: float = 1.0

    def __post_init__(self):
        check_batch_size(self.batch_size)
        checks.integer(self, "seed")
        checks.optional(checks.integer, self, "num_epochs", 0)
        checks.optional(checks.number, self, "online_fraction", 0, 1)
        checks.choice(self, "online_role", SAMPLER_ROLES)
        checks.positive(self, "distill_temperature")


def make_source(
    regime: str,
    source: SourceConfig,
    *,
    offline_store: OfflineStore | None = None,
    prompts: np.ndarray | None = None,
    teacher: tuple | None = None,
    student_config=None,
    sampling: SamplingConfig | None = None,
    mesh=None,
):
    """Builds the batch source of `regime` (a `regime_names.Regime` or its value).

    Args:
      source: batch size, seed, epochs and the regime's options (`SourceConfig`).
      offline_store: a complete store; needed by 'offline' and 'mixed'. It also supplies
        defaults: its unique prompts for the online prompt pool and its target length for
        the sampler's max_decode_len.
      prompts: [N, Lx] prompts of the online regimes (default: the store's).
      teacher: (config, params) of the teacher; needed to sample from it.
      student_config: the student's T5Config; needed to sample from the student (its params
        arrive with each `next_batch` call).
      sampling: the online sampler's settings (num_samples 1; default: temperature 1, no
        top-k / top-p, max_decode_len the store's target length).
    Raises:
      ValueError: unknown regime (lists the valid ones) or a missing / stray argument.
    """
    regime = Regime.parse(regime).value
    if not isinstance(source, SourceConfig):
        raise ValueError(f"source must be a SourceConfig, got {type(source).__name__}")
    batch_size, seed, online_fraction = source.batch_size, source.seed, source.online_fraction
    if online_fraction is not None and regime != "mixed":
        raise ValueError(
            f"online_fraction={online_fraction!r} only applies to regime 'mixed', not {regime!r}"
        )
    if regime in ("offline", "mixed") and offline_store is None:
        raise ValueError(f"regime {regime!r} needs offline_store")
    if regime == "offline":
        return OfflineSource(offline_store, batch_size, seed, source.num_epochs)

    role = {"online_teacher": "teacher", "online_student": "student"}.get(
        regime, source.online_role
    )
    if prompts is None:
        if offline_store is None:
            raise ValueError(
                f"regime {regime!r} needs prompts (or an offline_store to take them from)"
            )
        prompts = offline_store.prompts
    if sampling is None:
        if offline_store is None:
            raise ValueError(
                f"regime {regime!r} needs sampling=SamplingConfig(max_decode_len=...) "
                "(or an offline_store to take max_decode_len from)"
            )
        sampling = SamplingConfig(max_decode_len=offline_store.spec.max_target_length)
    if role == "teacher":
        if teacher is None:
            raise ValueError(
                f"regime {regime!r} samples from the teacher: pass teacher=(config, params)"
            )
        config, params = teacher
    else:
        if student_config is None:
            raise ValueError(f"regime {regime!r} samples from the student: pass student_config")
        config, params = student_config, None
    pool = PromptPool(prompts, batch_size, seed)
    distill_temperature = source.distill_temperature
    provide = (
        source.provide_teacher_logprobs
        and regime == "online_teacher"
        and sampling.gives_distillation_targets(distill_temperature)
    )
    online = OnlineSource(
        role,
        pool,
        config,
        params,
        sampling,
        seed,
        targets_temperature=distill_temperature if provide else None,
        mesh=mesh,
    )
    if regime != "mixed":
        return online
    if online_fraction is None:
        raise ValueError("regime 'mixed' needs online_fraction in [0, 1]")
    offline = OfflineSource(offline_store, batch_size, seed, source.num_epochs)
    return MixedSource(offline, online, online_fraction, batch_size, seed=seed)
