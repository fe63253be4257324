"""Tests for thack_jax.training.losses against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from thack_jax.training import losses

SHAPES = [(2, 3, 5), (1, 7, 11), (3, 1, 4)]


def np_log_softmax(x, t=1.0):
    x = np.asarray(x, np.float64) / t
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def xlogy_ratio(p, lp, lq):
    """sum_v p (lp - lq) with 0 where p = 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p > 0, p * (lp - lq), 0.0).sum(-1)


def ref_per_token(name, lt, ls, beta=0.5, alpha=0.1, normalized=True):
    """Direct float64 formulas, one token per row of [..., V]."""
    pt, ps = np.exp(lt), np.exp(ls)
    if name == "forward_kl":
        return xlogy_ratio(pt, lt, ls)
    if name == "reverse_kl":
        return xlogy_ratio(ps, ls, lt)
    if name == "tv":
        return 0.5 * np.abs(pt - ps).sum(-1)
    with np.errstate(divide="ignore"):
        if name == "skew_kl":
            return xlogy_ratio(pt, lt, np.log(alpha * pt + (1 - alpha) * ps))
        if name == "skew_reverse_kl":
            return xlogy_ratio(ps, ls, np.log(alpha * ps + (1 - alpha) * pt))
        if name == "jsd":
            lm = np.log(beta * pt + (1 - beta) * ps)
            value = beta * xlogy_ratio(pt, lt, lm) + (1 - beta) * xlogy_ratio(ps, ls, lm)
            return value / (beta * (1 - beta)) if normalized else value
    raise AssertionError(name)


def make_inputs(shape, seed, temperature=1.0, scale=3.0):
    rng = np.random.default_rng(seed)
    teacher_logits = rng.normal(size=shape) * scale
    student_logits = rng.normal(size=shape) * scale
    mask = (rng.random(shape[:-1]) < 0.7).astype(np.int32)
    mask.reshape(-1)[0] = 1
    lt = np_log_softmax(teacher_logits, temperature)
    return lt, student_logits, mask


def call(name, lt, s_logits, mask, temperature=1.0, **kw):
    fn = losses.get_loss(name, **kw)
    return fn(jnp.asarray(lt, jnp.float32), jnp.asarray(s_logits, jnp.float32), mask, temperature)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "name,kw",
    [
        ("forward_kl", {}),
        ("reverse_kl", {}),
        ("tv", {}),
        ("skew_kl", {"alpha": 0.1}),
        ("skew_reverse_kl", {"alpha": 0.3}),
        ("jsd", {"beta": 0.5}),
        ("jsd", {"beta": 0.2, "normalized": False}),
    ],
)
def test_losses_match_float64_reference(shape, name, kw):
    for temperature in (1.0, 2.0):
        lt, s_logits, mask = make_inputs(shape, seed=sum(shape) * 31 + len(name))
        loss_sum, count = call(name, lt, s_logits, mask, temperature, **kw)
        ref = ref_per_token(name, lt, np_log_softmax(s_logits, temperature), **kw)
        assert loss_sum.dtype == jnp.float32 and count.dtype == jnp.float32
        assert float(count) == mask.sum()
        np.testing.assert_allclose(float(loss_sum), (ref * mask).sum(), rtol=2e-5, atol=1e-5)


def test_temperature_applies_to_student_only():
    lt, s_logits, mask = make_inputs((2, 4, 6), seed=1)
    a, _ = losses.forward_kl(jnp.asarray(lt, jnp.float32), s_logits * 2.0, mask, temperature=2.0)
    b, _ = losses.forward_kl(jnp.asarray(lt, jnp.float32), s_logits, mask)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    t_logits = np.random.default_rng(0).normal(size=(2, 4, 6))
    tempered = losses.log_softmax_with_temperature(t_logits, 3.0)
    np.testing.assert_allclose(np.asarray(tempered), np_log_softmax(t_logits, 3.0), atol=1e-6)


@pytest.mark.parametrize("beta", [1e-6, 1 - 1e-6, 1e-3, 0.5, 0.999])
def test_jsd_normalised_matches_reference_near_limits(beta):
    lt, s_logits, mask = make_inputs((3, 4, 9), seed=7)
    ls = np_log_softmax(s_logits)
    got = losses.generalized_jsd_per_token(lt, ls, beta=beta)
    np.testing.assert_allclose(np.asarray(got), ref_per_token("jsd", lt, ls, beta=beta), rtol=1e-4)


def test_jsd_limits_are_forward_and_reverse_kl():
    # Mild logits: the O(beta) gap to the limit is then far below the tolerance at 1e-6.
    lt, s_logits, mask = make_inputs((2, 5, 7), seed=3, scale=1.0)
    ls = np_log_softmax(s_logits)
    fwd, rev = ref_per_token("forward_kl", lt, ls), ref_per_token("reverse_kl", lt, ls)
    for beta, ref in [(0.0, fwd), (1e-6, fwd), (1.0, rev), (1 - 1e-6, rev)]:
        got = np.asarray(losses.generalized_jsd_per_token(lt, ls, beta=beta))
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    # Unnormalised GKD value: 0 at the ends, plain JS at 0.5.
    for beta in (0.0, 1.0):
        assert np.all(np.asarray(losses.generalized_jsd_per_token(lt, ls, beta, False)) == 0)
    half = np.asarray(losses.generalized_jsd_per_token(lt, ls, 0.5, normalized=False))
    np.testing.assert_allclose(4 * half, losses.generalized_jsd_per_token(lt, ls, 0.5), rtol=1e-5)


def test_skew_limits():
    lt, s_logits, mask = make_inputs((2, 3, 6), seed=4)
    t, s = jnp.asarray(lt, jnp.float32), jnp.asarray(s_logits, jnp.float32)
    np.testing.assert_allclose(
        losses.skew_kl(t, s, mask, alpha=0.0)[0], losses.forward_kl(t, s, mask)[0], rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.skew_reverse_kl(t, s, mask, alpha=0.0)[0], losses.reverse_kl(t, s, mask)[0], 1e-6
    )
    assert float(losses.skew_kl(t, s, mask, alpha=1.0)[0]) == 0.0


def test_neg_inf_teacher_logprobs():
    shape = (2, 4, 8)
    lt_logits = np.random.default_rng(5).normal(size=shape)
    lt_logits[..., :3] = -np.inf  # e.g. a top-k teacher
    lt = np_log_softmax(np.where(np.isinf(lt_logits), -1e30, lt_logits))
    lt[..., :3] = -np.inf
    _, s_logits, mask = make_inputs(shape, seed=6)
    ls = np_log_softmax(s_logits)
    t, s = jnp.asarray(lt, jnp.float32), jnp.asarray(s_logits, jnp.float32)
    for name, kw in [
        ("forward_kl", {}),
        ("tv", {}),
        ("jsd", {"beta": 0.3}),
        ("skew_kl", {"alpha": 0.1}),
        ("skew_reverse_kl", {"alpha": 0.1}),
    ]:
        fn = losses.get_loss(name, **kw)
        value, grad = jax.jit(jax.value_and_grad(lambda x, fn=fn: fn(t, x, mask)[0]))(s)
        ref = (ref_per_token(name, lt, ls, **kw) * mask).sum()
        np.testing.assert_allclose(float(value), ref, rtol=1e-5, err_msg=name)
        assert np.all(np.isfinite(np.asarray(grad))), name
    # Reverse KL is genuinely infinite there: +inf, not NaN.
    assert float(losses.reverse_kl(t, s, mask)[0]) == np.inf


def test_pads_ignore_garbage_teacher_rows():
    lt, s_logits, mask = make_inputs((2, 5, 6), seed=8)
    mask[:, -2:] = 0
    garbage = lt.copy()
    garbage[:, -2:] = np.nan
    s = jnp.asarray(s_logits, jnp.float32)
    for name in losses.LOSSES:
        fn = losses.get_loss(name)
        value_and_grad = jax.jit(jax.value_and_grad(lambda t, x, fn=fn: fn(t, x, mask)[0], 1))
        clean, _ = value_and_grad(jnp.asarray(lt, jnp.float32), s)
        value, grad = value_and_grad(jnp.asarray(garbage, jnp.float32), s)
        np.testing.assert_allclose(float(value), float(clean), rtol=1e-6, err_msg=name)
        assert np.all(np.isfinite(np.asarray(grad))), name
        assert np.all(np.asarray(grad)[:, -2:] == 0), name


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_bf16_student_is_non_negative(name):
    # Teacher within rounding of the student: every divergence is ~0, and never below 0.
    key_s, key_t = jax.random.split(jax.random.PRNGKey(0))
    logits = (jax.random.normal(key_s, (4, 16, 64)) * 8).astype(jnp.bfloat16)
    noise = jax.random.normal(key_t, logits.shape) * 1e-4
    teacher = jax.nn.log_softmax(logits.astype(jnp.float32) + noise)
    mask = jnp.ones((4, 16))
    per_token = {
        "forward_kl": losses.forward_kl_per_token,
        "reverse_kl": losses.reverse_kl_per_token,
        "jsd": lambda a, b: losses.generalized_jsd_per_token(a, b, 0.5),
        "tv": losses.total_variation_per_token,
        "skew_kl": lambda a, b: losses.skew_kl_per_token(a, b, 0.1),
        "skew_reverse_kl": lambda a, b: losses.skew_reverse_kl_per_token(a, b, 0.1),
    }[name]
    student = losses.log_softmax_with_temperature(logits, 1.0)
    values = np.asarray(per_token(teacher, student))
    assert np.all(values >= 0) and values.max() < 1e-4
    loss_sum, _ = losses.get_loss(name)(teacher, logits, mask)
    assert 0.0 <= float(loss_sum) < 1e-3


def test_microbatch_gradient_accumulation_equals_full_batch():
    rng = np.random.default_rng(9)
    feats = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
    teacher = jnp.asarray(np_log_softmax(rng.normal(size=(4, 6, 7)) * 2), jnp.float32)
    mask = jnp.asarray([[1] * 6, [1] * 2 + [0] * 4, [1] * 5 + [0], [1] + [0] * 5])
    w = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)

    @jax.jit
    def grad_of_sum(w, teacher, feats, mask, denominator):
        return jax.grad(lambda w: losses.forward_kl(teacher, feats @ w, mask)[0] / denominator)(w)

    def full_mean(w):  # loss of one big batch: mean over its tokens
        total, count = losses.forward_kl(teacher, feats @ w, mask)
        return total / count

    expected = jax.grad(full_mean)(w)
    halves = [(teacher[i : i + 2], feats[i : i + 2], mask[i : i + 2]) for i in (0, 2)]
    global_count = mask.sum().astype(jnp.float32)
    accumulated = sum(grad_of_sum(w, *half, global_count) for half in halves)
    # atol: float32 sums in another order, a few ulps of the largest gradient (not 1e-7).
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(accumulated, expected, rtol=1e-5, atol=1e-6 * scale)
    # Averaging per-microbatch means (the wrong way) differs here: the test can fail.
    naive = sum(0.5 * grad_of_sum(w, *h, h[2].sum().astype(jnp.float32)) for h in halves)
    assert not np.allclose(naive, expected, rtol=1e-3)


def test_cross_entropy_matches_reference():
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(2, 5, 9)) * 2
    targets = rng.integers(0, 9, size=(2, 5))
    mask = (targets % 3 != 0).astype(np.int32)
    loss_sum, count = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets, mask)
    lp = np_log_softmax(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(np.float32)))
    ref = -(np.take_along_axis(lp, targets[..., None], -1)[..., 0] * mask).sum()
    np.testing.assert_allclose(float(loss_sum), ref, rtol=1e-5)
    assert float(count) == mask.sum() and loss_sum.dtype == jnp.float32


def test_jit_and_registry():
    lt, s_logits, mask = make_inputs((2, 3, 5), seed=11)
    fn = jax.jit(losses.get_loss("jsd", beta=0.1))
    eager = losses.generalized_jsd(jnp.asarray(lt, jnp.float32), s_logits, mask, beta=0.1)
    np.testing.assert_allclose(fn(jnp.asarray(lt, jnp.float32), s_logits, mask), eager, 1e-6)
    assert set(losses.LOSSES) == {
        "forward_kl",
        "reverse_kl",
        "jsd",
        "tv",
        "skew_kl",
        "skew_reverse_kl",
    }
    with pytest.raises(ValueError, match="valid names.*forward_kl"):
        losses.get_loss("kl")
    with pytest.raises(ValueError, match="no option"):
        losses.get_loss("jsd", alpha=0.1)
    with pytest.raises(ValueError, match="beta"):
        losses.get_loss("jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        losses.get_loss("tv", temperature=0.0)


def test_shape_errors():
    with pytest.raises(ValueError, match="student_logits shape"):
        losses.forward_kl(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 6)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="mask shape"):
        losses.forward_kl(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 5)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="targets"):
        losses.cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), int), jnp.ones((2, 4)))
