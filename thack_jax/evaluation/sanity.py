"""Sanity checks of the evaluator's estimates: a non-finite estimate, or exactly 0 +- 0
between models whose parameters differ, is a damaged checkpoint or a diverged model, not a
measurement (NaN log-probs of the sampler make every `token_kl` term 0: NaN > -inf is
False). Parameters are compared (on device, jitted) only when such a 0 occurs."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from thack_jax.evaluation import divergences
from thack_jax.parallel import partitioning


class DegenerateEvaluationError(ValueError):
    """A non-finite estimate, or exactly 0 +- 0 between models whose parameters differ (NaN
    log-probs of the sampler make every `token_kl` term 0: NaN > -inf is False)."""

    def __init__(self, metric: str, step: int | None, problem: str):
        self.metric, self.step = metric, step
        at = f" at step {step}" if step is not None else ""
        super().__init__(
            f"evaluation of {metric}{at}: {problem}; likely cause: non-finite or degenerate "
            "weights (a damaged checkpoint or a diverged model)"
        )


@functools.lru_cache(maxsize=16)
def _compare_fn(mesh):
    """Jitted (tree a, tree b of equal shapes) -> (every leaf equal, non-finite values of a,
    of b), replicated. Runs only when an estimate is exactly 0 +- 0."""

    def compare(a, b):
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        same = jnp.stack([jnp.array_equal(x, y) for x, y in zip(la, lb, strict=True)])
        bad = [sum(jnp.sum(~jnp.isfinite(x)) for x in leaves) for leaves in (la, lb)]
        return jnp.all(same), *bad

    out_sharding = None if mesh is None else partitioning.replicated(mesh)
    return partitioning.jit(compare, mesh, out_shardings=out_sharding)


class Checked(NamedTuple):
    """One estimate to check: its metric key, the Estimate, the reference role it compares
    the student with (None: a cross-entropy, checked for finiteness only) and the step."""

    key: str
    estimate: divergences.Estimate
    role: str | None
    step: int | None


def check_estimate(checked: Checked, ref_params, student_params, mesh) -> None:
    """Raises DegenerateEvaluationError for a non-finite estimate, or an exact 0 +- 0
    between the reference (`ref_params`) and a student whose parameters (tree, shapes,
    values) differ."""
    key, est, role, step = checked
    numbers = {"value": est.value, "per_token": est.per_token}
    if est.num_prompts >= 2:  # with one prompt the stderrs are nan by definition
        numbers |= {"stderr": est.stderr, "per_token_stderr": est.per_token_stderr}
    bad = {name: x for name, x in numbers.items() if not math.isfinite(x)}
    if bad:
        raise DegenerateEvaluationError(key, step, f"non-finite estimate {bad}")
    if role is None or est.value != 0.0 or est.stderr != 0.0:
        return
    found = ["different parameter shapes"]
    if jax.tree.map(np.shape, ref_params) == jax.tree.map(np.shape, student_params):
        same, *counts = (int(x) for x in _compare_fn(mesh)(ref_params, student_params))
        if same:
            return  # the same model against itself
        found = [
            f"the {n} has {c} non-finite parameters"
            for n, c in zip((role, "student"), counts, strict=True)
            if c
        ]
    why = "; ".join(found) or "all parameters are finite"
    problem = f"exactly 0.0 +- 0.0 between the student and the {role}, whose parameters"
    raise DegenerateEvaluationError(key, step, f"{problem} differ ({why})")
