"""The jitted sampling kernel: num_samples responses per prompt from a T5 encoder-decoder.

Layout of the module:
  * `validate_sample_args`: the checks of a `settings.SamplingConfig` (validated on its own
    when made) and of the prompts that need the model config;
  * `sample_with_fn`: the decoding loop, one `jax.lax.while_loop` over `LoopState`, for any
    `tokens_to_logits(cache, token [N], step) -> (logits [N, V], cache)` (tests use fakes);
  * `sample`: validates the arguments (before anything is compiled), encodes each prompt once,
    repeats the decoding cache `num_samples` times and runs the loop; compiled once per shape,
    settings and mesh, through `partitioning.jit` (this module has no sharding code of its own:
    rows are constrained along the logical axis `batch` by `partitioning.with_logical_constraint`).

Conventions (docs/architecture.md): the decoder start token is the pad id 0, the first step
feeds it at position 0 and its logits predict the first response token. Rows are
prompt-major: row `i * n + j` is sample j of prompt i. A row ends at its first EOS; the
batch stays fixed, so ended rows keep being computed but write pad (0) and log-prob 0.
The loop stops when every row has ended or `max_decode_len` tokens were written.

Randomness: the token of row r at step t is drawn with the key
fold_in(fold_in(rng, t), first_row + r) (r the row index in the call, `first_row` 0 unless the
caller passes it), so samples do not depend on how the batch is sharded, nor, when a caller
splits a long list of prompts into calls and passes each call's first global row, on the
batch size. `first_row` is a traced uint32 argument: a new value does not recompile. The token
choice itself (greedy, temperature, top-k, top-p, and the draw: `inverse_cdf` by default,
or `gumbel`) is a strategy of `strategies.py`, called once per step.

What the log-probs are (T = temperature):
  * `token_logprobs`: log-prob of the sampled token under the SAMPLING distribution, i.e.
    log_softmax of logits / T after the top-k / top-p truncation (renormalised). Greedy
    (T = 0) samples from a point mass, so its token log-probs are 0.
  * `full_logprobs`: log_softmax(logits / T) over the whole vocabulary, never truncated by
    top-k / top-p; for greedy, log_softmax(logits). With T = 1 this is the model's own
    distribution (what `scoring.score` returns), usable as distillation targets.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from thack_jax import models
from thack_jax.core import checks
from thack_jax.decoding import strategies
from thack_jax.decoding.settings import SamplingConfig
from thack_jax.models.config import T5Config
from thack_jax.parallel import partitioning

# (cache, token [N] int32, step [] int32) -> (logits [N, V], cache).
TokensToLogits = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


class SampleOutput(NamedTuple):
    """tokens [N, Ly] int32 (0 after EOS); token_logprobs [N, Ly] (0 at pads); mask [N, Ly]
    bool (tokens incl. EOS); lengths [N] int32 (incl. EOS); full_logprobs [N, Ly, V] | None.

    N = batch * num_samples, prompt-major. `mask` is positional (`arange(Ly) < lengths`):
    an untrained model may sample the pad id 0 inside a response, so `tokens != 0` is not
    always the same thing.
    """

    tokens: jax.Array
    token_logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    full_logprobs: jax.Array | None


class LoopState(NamedTuple):
    """Carry of the decoding loop (N rows, L = max_decode_len, V = vocabulary)."""

    step: jax.Array  # [] int32: decoder position of `token`
    token: jax.Array  # [N] int32: the token fed at `step`
    cache: Any  # model cache pytree, leaves [N, ...]
    tokens: jax.Array  # [N, L] int32
    token_logprobs: jax.Array  # [N, L] float32
    full_logprobs: jax.Array | None  # [N, L, V] float32, or None when not requested
    lengths: jax.Array  # [N] int32: tokens written so far, EOS included
    ended: jax.Array  # [N] bool: EOS written


# ----------------------------------------------------------------------------- validation


def validate_sample_args(
    config: T5Config, input_shape: tuple[int, ...], settings: SamplingConfig
) -> None:
    """Checks `settings` and the prompts' shape against the model config (what
    `SamplingConfig` cannot check on its own); raises ValueError naming the problem."""
    if not isinstance(settings, SamplingConfig):
        raise ValueError(f"settings must be a SamplingConfig, got {type(settings).__name__}")
    if len(input_shape) != 2 or input_shape[0] < 1 or input_shape[1] < 1:
        raise ValueError(f"inputs must have shape [batch, length] (both >= 1); got {input_shape}")
    if input_shape[1] > config.max_input_length:
        raise ValueError(
            f"prompt length {input_shape[1]} exceeds config.max_input_length="
            f"{config.max_input_length} (inputs shape {input_shape})"
        )
    if settings.max_decode_len > config.max_target_length:
        raise ValueError(
            f"max_decode_len={settings.max_decode_len} exceeds config.max_target_length="
            f"{config.max_target_length}"
        )
    if settings.top_k > config.vocab_size:
        raise ValueError(f"top_k={settings.top_k} exceeds the vocabulary size {config.vocab_size}")


# ----------------------------------------------------------------------------- the loop


# Logical axes of the LoopState fields (None: not constrained).
_STATE_AXES = LoopState(
    step=None,
    token=("batch",),
    cache=None,
    tokens=("batch", "length"),
    token_logprobs=("batch", "length"),
    full_logprobs=("batch", "length", "vocab"),
    lengths=("batch",),
    ended=("batch",),
)


def _constrain_state(state: LoopState) -> LoopState:
    """Keeps every row-indexed field sharded along `batch` across loop iterations."""
    return LoopState(
        *(
            x if axes is None or x is None else partitioning.with_logical_constraint(x, axes)
            for x, axes in zip(state, _STATE_AXES, strict=True)
        )
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenIds:
    """The special token ids of the decoding loop.

    eos: ends a row (written, counted in `lengths`); a value outside the vocabulary (e.g.
      -1) never occurs, so every row runs to max_decode_len (benchmarks).
    start: the token fed at step 0 (T5: the pad id). pad: written after a row ended.
    """

    eos: int = 1
    start: int = 0
    pad: int = 0

    def __post_init__(self):
        for name in ("eos", "start", "pad"):
            checks.integer(self, name)
            object.__setattr__(self, name, int(getattr(self, name)))


def sample_with_fn(
    tokens_to_logits: TokensToLogits,
    cache: Any,
    rng: jax.Array,
    settings: SamplingConfig,
    *,
    batch_size: int,
    token_ids: TokenIds = TokenIds(),
    return_full_logprobs: bool = False,
    first_row: int | jax.Array = 0,
) -> SampleOutput:
    """The decoding loop (traceable; call it inside `jax.jit`).

    Args:
      tokens_to_logits: (cache, token [N] int32, step [] int32) -> (logits [N, V], cache);
        called first with `token_ids.start` at step 0, its logits predict the first token.
      cache: the initial cache pytree (any structure, may be empty) for
        N = batch_size * settings.num_samples rows (already repeated, prompt-major).
      rng: a PRNG key; row r at step t draws with fold_in(fold_in(rng, t), first_row + r).
      settings: the strategy (temperature, top_k, top_p, draw: see `strategies.DRAWS`),
        Ly = settings.max_decode_len and n = settings.num_samples.
      batch_size: B >= 1 prompts.
      token_ids: the eos / start / pad ids (`TokenIds`).
      first_row: the global index of this call's row 0 (int >= 0, or a traced uint32
        scalar); 0 keeps the draws of a call that holds every row.
    Returns:
      SampleOutput with N = batch_size * settings.num_samples rows and Ly = max_decode_len.
    """
    if not isinstance(settings, SamplingConfig):
        raise ValueError(f"settings must be a SamplingConfig, got {type(settings).__name__}")
    if not isinstance(token_ids, TokenIds):
        raise ValueError(f"token_ids must be a TokenIds, got {type(token_ids).__name__}")
    temperature, top_k, top_p = settings.temperature, settings.top_k, settings.top_p
    eos_id, start_id, pad_id = token_ids.eos, token_ids.start, token_ids.pad
    n, length = batch_size * settings.num_samples, settings.max_decode_len
    token0 = jnp.full((n,), start_id, jnp.int32)
    step0 = jnp.zeros((), jnp.int32)
    logits_shape = jax.eval_shape(tokens_to_logits, cache, token0, step0)[0].shape
    if tuple(logits_shape[:1]) != (n,) or len(logits_shape) != 2:
        raise ValueError(f"tokens_to_logits must return logits [{n}, V]; got {logits_shape}")
    vocab = logits_shape[1]
    strategies.validate_strategy(temperature, top_k, top_p, vocab, settings.draw)
    strategy = strategies.make_strategy(temperature, top_k, top_p, settings.draw)
    full_temperature = temperature if temperature > 0 else 1.0
    if isinstance(first_row, int | np.integer) and not 0 <= first_row < 2**32 - n:
        raise ValueError(f"first_row={first_row} must be in [0, 2**32 - {n})")
    rows = jnp.asarray(first_row, jnp.uint32) + jnp.arange(n, dtype=jnp.uint32)
    rows = partitioning.with_logical_constraint(rows, ("batch",))

    def cond(state: LoopState) -> jax.Array:
        return (state.step < length) & ~jnp.all(state.ended)

    def body(state: LoopState) -> LoopState:
        logits, cache = tokens_to_logits(state.cache, state.token, state.step)
        logits = partitioning.with_logical_constraint(
            logits.astype(jnp.float32), ("batch", "vocab")
        )
        step_key = jax.random.fold_in(rng, state.step)
        token, logprob = strategy(logits, jax.vmap(jax.random.fold_in, (None, 0))(step_key, rows))
        live = ~state.ended
        token = jnp.where(live, token, pad_id)
        full = state.full_logprobs
        if full is not None:
            step_full = jax.nn.log_softmax(logits / full_temperature, axis=-1)
            step_full = jnp.where(live[:, None], step_full, 0.0)[:, None]
            full = jax.lax.dynamic_update_slice_in_dim(full, step_full, state.step, axis=1)
        return _constrain_state(
            LoopState(
                step=state.step + 1,
                token=token,
                cache=cache,
                tokens=state.tokens.at[:, state.step].set(token),
                token_logprobs=state.token_logprobs.at[:, state.step].set(
                    jnp.where(live, logprob, 0.0)
                ),
                full_logprobs=full,
                lengths=state.lengths + live.astype(jnp.int32),
                ended=state.ended | (live & (token == eos_id)),
            )
        )

    init = LoopState(
        step=step0,
        token=token0,
        cache=cache,
        tokens=jnp.full((n, length), pad_id, jnp.int32),
        token_logprobs=jnp.zeros((n, length), jnp.float32),
        full_logprobs=jnp.zeros((n, length, vocab), jnp.float32) if return_full_logprobs else None,
        lengths=jnp.zeros((n,), jnp.int32),
        ended=jnp.zeros((n,), bool),
    )
    final = jax.lax.while_loop(cond, body, _constrain_state(init))
    mask = partitioning.with_logical_constraint(
        jnp.arange(length)[None, :] < final.lengths[:, None], ("batch", "length")
    )
    return SampleOutput(
        final.tokens, final.token_logprobs, mask, final.lengths, final.full_logprobs
    )


# ----------------------------------------------------------------------------- T5 entry

_TRACE_COUNT = 0


def trace_count() -> int:
    """How many times `sample`'s jitted function has been traced (for retracing tests)."""
    return _TRACE_COUNT


def repeat_rows(tree: Any, n: int) -> Any:
    """Repeats every leaf [B, ...] of a pytree n times along axis 0 -> [B * n, ...], each
    row's copies adjacent (prompt-major)."""
    if n == 1:
        return tree
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


def _sample_t5(
    params,
    inputs,
    rng,
    first_row,
    *,
    config: T5Config,
    settings: SamplingConfig,
    eos_id: int,
    return_full_logprobs: bool,
) -> SampleOutput:
    global _TRACE_COUNT
    _TRACE_COUNT += 1
    inputs = partitioning.with_logical_constraint(inputs.astype(jnp.int32), ("batch", "length"))
    # Encoder and cross-attention K/V once per prompt, then one cache copy per sample.
    encoded = models.encode(config, params, inputs)
    cache = models.init_cache(config, params, encoded, inputs, settings.max_decode_len)
    cache = repeat_rows(cache, settings.num_samples)

    def tokens_to_logits(cache, token, step):
        return models.decode_step(config, params, cache, token, step)

    return sample_with_fn(
        tokens_to_logits,
        cache,
        rng,
        settings,
        batch_size=inputs.shape[0],
        token_ids=TokenIds(eos=eos_id, start=config.pad_id, pad=config.pad_id),
        return_full_logprobs=return_full_logprobs,
        first_row=first_row,
    )


@functools.lru_cache(maxsize=64)
def _compiled(config: T5Config, settings: SamplingConfig, mesh, **loop_kwargs):
    """One jitted sampler per model config, settings, mesh and loop options (eos_id,
    return_full_logprobs); `partitioning.jit` runs it under the mesh's axis rules."""
    fn = functools.partial(_sample_t5, config=config, settings=settings, **loop_kwargs)
    return partitioning.jit(fn, mesh)


_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(SamplingConfig))


def _resolve_settings(settings: SamplingConfig | None, keywords: dict) -> SamplingConfig:
    """`settings`, or a SamplingConfig of the keyword arguments (those not None); not both."""
    given = {name: value for name, value in keywords.items() if value is not None}
    if settings is not None:
        if given:
            raise ValueError(
                f"pass the sampling settings either as a SamplingConfig or as keywords, not "
                f"both; got settings={settings} and keywords {sorted(given)}"
            )
        return settings
    if "max_decode_len" not in given:
        raise ValueError("sample needs max_decode_len (or a SamplingConfig)")
    return SamplingConfig(**given)


def sample(
    config: T5Config,
    params: dict,
    inputs: jax.Array,
    rng: jax.Array,
    settings: SamplingConfig | None = None,
    *,
    return_full_logprobs: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    eos_id: int | None = None,
    first_row: int = 0,
    **keywords,
) -> SampleOutput:
    """Samples `settings.num_samples` responses per prompt.

    Args:
      config, params: the T5 model.
      inputs: prompts [B, Lx] int, pad 0 (Lx <= config.max_input_length).
      rng: a PRNG key (`jax.random.key` or `jax.random.PRNGKey`).
      settings: a `SamplingConfig` (max_decode_len <= config.max_target_length). Instead of
        it the same fields may be given as keywords (`max_decode_len=...` required, e.g.
        `sample(config, params, inputs, rng, max_decode_len=8, temperature=0.7)`), not both.
      return_full_logprobs: also return log_softmax(logits / T) [B * n, Ly, V] (see module
        doc; T = 1 for greedy).
      mesh: run on this mesh (Auto axis types) under its logical axis rules
        (`partitioning.activate`); rows are sharded along `batch`. Arguments not already on
        the mesh are replicated onto it. None: the default device.
      eos_id: None = config.eos_id; -1 never occurs (benchmarks: every row runs to Ly).
      first_row: the global index of this call's row 0 (prompt-major, so a call on prompts
        b*B .. (b+1)*B-1 of a list passes b*B*n): row r draws with
        fold_in(fold_in(rng, t), first_row + r), and samples of a prompt do not depend on
        how the list was cut into calls. Passed as a uint32 array: no recompilation.
    Returns:
      SampleOutput (see its docstring); rows prompt-major (i * n + j); positions after EOS
      hold pad 0 and log-prob 0.
    Raises:
      ValueError: bad arguments (checked before anything is compiled).
    """
    unknown = sorted(set(keywords) - set(_SETTING_NAMES))
    if unknown:
        raise TypeError(f"sample() got unexpected keyword arguments {unknown}")
    settings = _resolve_settings(settings, keywords)
    validate_sample_args(config, tuple(np.shape(inputs)), settings)
    dtype = inputs.dtype if hasattr(inputs, "dtype") else np.asarray(inputs).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"inputs must be integer token ids; got dtype {dtype}")
    num_rows = int(np.shape(inputs)[0]) * settings.num_samples
    if (
        isinstance(first_row, bool)
        or not isinstance(first_row, int | np.integer)
        or not 0 <= first_row < 2**32 - num_rows
    ):
        raise ValueError(f"first_row={first_row!r} must be an integer in [0, 2**32 - {num_rows})")
    first_row = np.uint32(first_row)
    fn = _compiled(
        config,
        settings,
        mesh,
        eos_id=config.eos_id if eos_id is None else int(eos_id),
        return_full_logprobs=bool(return_full_logprobs),
    )
    if mesh is None:
        return fn(params, inputs, rng, first_row)
    return fn(*partitioning.put_replicated((params, inputs, rng, first_row), mesh))
