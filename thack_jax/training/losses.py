"""Token-level distillation losses (pure jnp functions).

Every loss takes `teacher_logprobs [batch, length, vocab]` (float32 log-probabilities of the
teacher, **already tempered**: make them with `log_softmax_with_temperature(teacher_logits, t)`
or take them from the sampler), `student_logits [batch, length, vocab]` (raw logits, any float
dtype; divided by `temperature` here) and `mask [batch, length]` (1 = scored target token,
EOS included; 0 = pad). It returns `(loss_sum, num_tokens)`: the float32 sum over masked
tokens of the per-token divergence and the float32 number of masked tokens. The trainer
divides by the global token count over all microbatches, so accumulating gradients over
microbatches equals one big batch.

Numerics: everything is computed in float32; a vocabulary entry with probability 0
(log-prob -inf) contributes 0 where it is the weighting distribution (x log x -> 0); each
per-token divergence is clamped at >= 0 so rounding never yields a negative divergence.
Teacher log-probs at pad positions are ignored (even NaN there is harmless).

Per-token versions (`*_per_token`) take two log-prob arrays `[..., vocab]` and return `[...]`;
`divergences.py` can reuse them.
"""

import functools
import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

# Mixture weights (beta, alpha) must be 0 or at least this: below it, float32 cannot represent
# the mixture and the limit value (w = 0) is the right answer anyway.
_MIN_WEIGHT = 1e-30


def log_softmax_with_temperature(logits: Array, temperature: float = 1.0) -> Array:
    """Float32 `log_softmax(logits / temperature)` over the last axis. [..., V] -> [..., V]."""
    _check_temperature(temperature)
    return jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32) / temperature, axis=-1)


def _check_temperature(temperature) -> None:
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_weight(name: str, value) -> float:
    """Validates a static mixture weight (beta / alpha) and returns it as a Python float."""
    try:
        value = float(value)
    except TypeError as e:  # a tracer: weights pick code paths, so they must be static
        raise TypeError(f"{name} must be a Python float (static), got {value!r}") from e
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    if 0.0 < value < _MIN_WEIGHT:
        raise ValueError(f"{name}={value} is below {_MIN_WEIGHT}; use {name}=0 for the limit")
    return value


def _log1p_mix(w: float, d: Array) -> Array:
    """log((1 - w) + w * exp(d)) for a constant w in (0, 1) and finite d, elementwise.

    Accurate also when the result is tiny (w -> 0 or d -> 0), which the normalised JSD needs:
    there `log1p(w * expm1(d))` is used; elsewhere (|result| > ~0.4) `logaddexp`.
    """
    # Clamping d keeps the unused branch finite (so no NaN reaches the gradient); with
    # w >= 1e-30 any clamped value lies on the logaddexp branch.
    t = w * jnp.expm1(jnp.minimum(d, 80.0))
    small = jnp.abs(t) <= 0.5
    near = jnp.log1p(jnp.where(small, t, 0.0))
    far = jnp.logaddexp(math.log1p(-w), math.log(w) + jnp.where(small, 0.0, d))
    return jnp.where(small, near, far)


def _kl_to_mixture(la: Array, lb: Array, w: float) -> Array:
    """sum_v p_a (log p_a - log((1 - w) p_a + w p_b)): KL(p_a || (1-w) p_a + w p_b).

    la, lb: log-probs [..., V] (may hold -inf); w: Python float in [0, 1]. Returns [...],
    not clamped. w = 1 is KL(p_a || p_b) (+inf where p_b = 0 < p_a); w = 0 is 0.
    """
    if w == 0.0:
        return jnp.zeros(la.shape[:-1], jnp.float32)
    a_zero = la == -jnp.inf
    b_zero = lb == -jnp.inf
    la_safe = jnp.where(a_zero, 0.0, la)
    lb_safe = jnp.where(b_zero, 0.0, lb)
    if w == 1.0:
        log_ratio = jnp.where(b_zero, jnp.inf, la_safe - lb_safe)
    else:
        log_ratio = -_log1p_mix(w, lb_safe - la_safe)
        # p_b = 0: the mixture is (1 - w) p_a.
        log_ratio = jnp.where(b_zero, -math.log1p(-w), log_ratio)
    terms = jnp.where(a_zero, 0.0, jnp.exp(la_safe) * log_ratio)
    return jnp.sum(terms, axis=-1)


def _as_logprobs(x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def forward_kl_per_token(teacher_logprobs: Array, student_logprobs: Array) -> Array:
    """KL(p_t || p_s) = sum_v p_t (log p_t - log p_s). [..., V] x2 -> [...]."""
    lt, ls = _as_logprobs(teacher_logprobs), _as_logprobs(student_logprobs)
    return jnp.maximum(_kl_to_mixture(lt, ls, 1.0), 0.0)


def reverse_kl_per_token(teacher_logprobs: Array, student_logprobs: Array) -> Array:
    """KL(p_s || p_t); +inf where the teacher gives 0 to a token the student does not."""
    lt, ls = _as_logprobs(teacher_logprobs), _as_logprobs(student_logprobs)
    return jnp.maximum(_kl_to_mixture(ls, lt, 1.0), 0.0)


def skew_kl_per_token(teacher_logprobs: Array, student_logprobs: Array, alpha: float) -> Array:
    """Skew forward KL (DistiLLM): KL(p_t || alpha p_t + (1 - alpha) p_s). [...]."""
    alpha = _check_weight("alpha", alpha)
    lt, ls = _as_logprobs(teacher_logprobs), _as_logprobs(student_logprobs)
    return jnp.maximum(_kl_to_mixture(lt, ls, 1.0 - alpha), 0.0)


def skew_reverse_kl_per_token(
    teacher_logprobs: Array, student_logprobs: Array, alpha: float
) -> Array:
    """Skew reverse KL (DistiLLM): KL(p_s || alpha p_s + (1 - alpha) p_t). [...]."""
    alpha = _check_weight("alpha", alpha)
    lt, ls = _as_logprobs(teacher_logprobs), _as_logprobs(student_logprobs)
    return jnp.maximum(_kl_to_mixture(ls, lt, 1.0 - alpha), 0.0)


def generalized_jsd_per_token(
    teacher_logprobs: Array, student_logprobs: Array, beta: float, normalized: bool = True
) -> Array:
    """Generalised Jensen-Shannon divergence (GKD convention for the mixture). [...].

    With m = beta p_t + (1 - beta) p_s, GKD's value is
        JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m),
    which tends to 0 at both ends. With `normalized=True` (the default) this returns
        JSD_beta / (beta (1 - beta)) = KL(p_t || m) / (1 - beta) + KL(p_s || m) / beta,
    which is continuous on [0, 1] with beta = 0 -> KL(p_t || p_s) (forward KL) and
    beta = 1 -> KL(p_s || p_t) (reverse KL); beta = 0.5 gives 4 * JS(p_t, p_s).
    `normalized=False` returns JSD_beta itself (beta = 0.5: the plain JS divergence; 0 at
    beta in {0, 1}).
    """
    beta = _check_weight("beta", beta)
    lt, ls = _as_logprobs(teacher_logprobs), _as_logprobs(student_logprobs)
    if beta in (0.0, 1.0):
        if not normalized:
            return jnp.zeros(lt.shape[:-1], jnp.float32)
        # The limits; KL(p_s || m) / beta -> 0 as beta -> 0 (it is O(beta^2)), and symmetrically.
        return jnp.maximum(_kl_to_mixture(*((lt, ls) if beta == 0.0 else (ls, lt)), 1.0), 0.0)
    # KL(p_t || m) with m = (1 - w) p_t + w p_s, w = 1 - beta; KL(p_s || m) with w = beta.
    kl_teacher = _kl_to_mixture(lt, ls, 1.0 - beta)
    kl_student = _kl_to_mixture(ls, lt, beta)
    if normalized:
        value = kl_teacher / (1.0 - beta) + kl_student / beta
    else:
        value = beta * kl_teacher + (1.0 - beta) * kl_student
    return jnp.maximum(value, 0.0)


def total_variation_per_token(teacher_logprobs: Array, student_logprobs: Array) -> Array:
    """0.5 * sum_v |p_t - p_s|. [..., V] x2 -> [...]."""
    lt, ls = _as_logprobs(teacher_logprobs), _as_logprobs(student_logprobs)
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(lt) - jnp.exp(ls)), axis=-1)


def _prepare(teacher_logprobs, student_logits, mask, temperature):
    """Checks shapes; returns float32 (teacher_logprobs, student_logprobs, valid [B, L] bool)."""
    t_shape, s_shape = jnp.shape(teacher_logprobs), jnp.shape(student_logits)
    if t_shape != s_shape:
        raise ValueError(
            f"teacher_logprobs shape {t_shape} != student_logits shape {s_shape} "
            "(both must be [batch, length, vocab])"
        )
    if len(t_shape) < 1 or jnp.shape(mask) != t_shape[:-1]:
        raise ValueError(
            f"mask shape {jnp.shape(mask)} must be the logits shape without vocab, {t_shape[:-1]}"
        )
    student = log_softmax_with_temperature(student_logits, temperature)
    valid = jnp.asarray(mask) > 0
    # Pads: replace the teacher by the (constant) student so pads give exactly 0, and no
    # inf/NaN from unused teacher rows can leak into gradients.
    teacher = jnp.where(
        valid[..., None], _as_logprobs(teacher_logprobs), jax.lax.stop_gradient(student)
    )
    return teacher, student, valid


def _masked_sum(per_token: Array, valid: Array) -> tuple[Array, Array]:
    loss_sum = jnp.sum(jnp.where(valid, per_token, 0.0), dtype=jnp.float32)
    return loss_sum, jnp.sum(valid, dtype=jnp.float32)


def _token_loss(per_token_fn, teacher_logprobs, student_logits, mask, temperature, **kwargs):
    teacher, student, valid = _prepare(teacher_logprobs, student_logits, mask, temperature)
    return _masked_sum(per_token_fn(teacher, student, **kwargs), valid)


def forward_kl(teacher_logprobs, student_logits, mask, temperature: float = 1.0):
    """Sum over masked tokens of KL(p_t || p_s). Returns (loss_sum, num_tokens) float32."""
    return _token_loss(forward_kl_per_token, teacher_logprobs, student_logits, mask, temperature)


def reverse_kl(teacher_logprobs, student_logits, mask, temperature: float = 1.0):
    """Sum over masked tokens of KL(p_s || p_t). Infinite if the teacher has zeros (use
    `skew_reverse_kl` or `generalized_jsd` with such teachers)."""
    return _token_loss(reverse_kl_per_token, teacher_logprobs, student_logits, mask, temperature)


def generalized_jsd(
    teacher_logprobs,
    student_logits,
    mask,
    temperature: float = 1.0,
    beta: float = 0.5,
    normalized: bool = True,
):
    """Sum over masked tokens of the generalised JSD; see `generalized_jsd_per_token` for
    the convention (default: normalised, beta=0 forward KL, beta=1 reverse KL)."""
    return _token_loss(
        generalized_jsd_per_token,
        teacher_logprobs,
        student_logits,
        mask,
        temperature,
        beta=beta,
        normalized=normalized,
    )


def total_variation(teacher_logprobs, student_logits, mask, temperature: float = 1.0):
    """Sum over masked tokens of 0.5 * sum_v |p_t - p_s|."""
    return _token_loss(
        total_variation_per_token, teacher_logprobs, student_logits, mask, temperature
    )


def skew_kl(teacher_logprobs, student_logits, mask, temperature: float = 1.0, alpha: float = 0.1):
    """Sum over masked tokens of KL(p_t || alpha p_t + (1 - alpha) p_s); alpha=0: forward KL."""
    return _token_loss(
        skew_kl_per_token, teacher_logprobs, student_logits, mask, temperature, alpha=alpha
    )


def skew_reverse_kl(
    teacher_logprobs, student_logits, mask, temperature: float = 1.0, alpha: float = 0.1
):
    """Sum over masked tokens of KL(p_s || alpha p_s + (1 - alpha) p_t); alpha=0: reverse KL."""
    return _token_loss(
        skew_reverse_kl_per_token, teacher_logprobs, student_logits, mask, temperature, alpha=alpha
    )


def cross_entropy(student_logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """SFT loss: sum over masked tokens of -log p_s(target).

    student_logits [B, L, V], targets [B, L] int, mask [B, L]. Returns (loss_sum, num_tokens).
    """
    if jnp.shape(targets) != jnp.shape(student_logits)[:-1] or jnp.shape(mask) != jnp.shape(
        targets
    ):
        raise ValueError(
            f"cross_entropy shapes: student_logits {jnp.shape(student_logits)}, targets "
            f"{jnp.shape(targets)}, mask {jnp.shape(mask)}; want [B, L, V], [B, L], [B, L]"
        )
    logprobs = log_softmax_with_temperature(student_logits, 1.0)
    index = jnp.asarray(targets).astype(jnp.int32)[..., None]
    token_logprobs = jnp.take_along_axis(logprobs, index, axis=-1)[..., 0]
    return _masked_sum(-token_logprobs, jnp.asarray(mask) > 0)


LossFn = Callable[..., tuple[Array, Array]]

LOSSES: dict[str, LossFn] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "tv": total_variation,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
}


def get_loss(name: str, **kwargs) -> LossFn:
    """The loss `name` from LOSSES with options bound, e.g. get_loss("jsd", beta=0.1).

    The result is called as fn(teacher_logprobs, student_logits, mask) -> (loss_sum, num_tokens).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}")
    fn = LOSSES[name]
    options = list(inspect.signature(fn).parameters)[3:]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"loss {name!r} has no option(s) {unknown}; options: {options}")
    for weight in ("alpha", "beta"):
        if weight in kwargs:
            kwargs[weight] = _check_weight(weight, kwargs[weight])
    if "temperature" in kwargs:
        _check_temperature(kwargs["temperature"])
    return functools.partial(fn, **kwargs)
