"""Coverage and bias of the evaluator's estimators, against exact divergences by enumeration.

A model pair (p the reference, q the student) is a tiny random T5 with vocabulary V = 5 and
responses of at most L = 3 tokens, so every response can be enumerated (`enumerate_responses`,
85 of them) and the divergences computed exactly over a population of K prompts
(`exact_divergences`). A study (`simulate`) then draws many independent seeds, each as the
evaluator does one evaluation: P prompts, n samples per prompt from each model through the
real sampler (`sampling.sample`, positional mask), scored by the evaluator's own jitted batch
function (`batch_scoring.score_fn`), turned into the six estimates of `divergences.py` (plain
and Rao-Blackwellised x forward KL, reverse KL, JS). `summarize` gives, per estimator x
divergence, the coverage of each interval method and the bias z-score

  z = (mean over seeds of the value - exact) / (sd over seeds / sqrt(seeds)).

Prompts: each seed draws its P prompts from the K-prompt population uniformly *with
replacement*. The estimators' stderr is the one of a mean over i.i.d. prompts, so with i.i.d.
draws the target of the interval is exactly the population mean that `exact_divergences`
computes; repeated prompts are separate draws (the evaluator gives each row its own id).
(With fixed prompts the target would be the mean over those prompts, and the between-prompt
spread in the stderr would make the intervals conservative, not exact.)

Vectorised: seeds are stacked as rows of one sampler call per chunk of seeds (rows of
different seeds are independent draws, `first_row` keeps them distinct), so a setting of
1,000 seeds is a handful of jitted calls; the per-seed estimators are numpy.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from thack_jax import models
from thack_jax.decoding import sampling, scoring
from thack_jax.evaluation import batch_scoring
from thack_jax.evaluation import divergences as dv

V, L, LX, EOS = 5, 3, 3, 1
DIVERGENCES = ("forward_kl", "reverse_kl", "js")
ESTIMATORS = ("plain", "rao_blackwell")
POPULATION = 24


# ----------------------------------------------------------------------------- enumeration


def response_mask(targets) -> np.ndarray:
    """Scored positions: every token up to and including the first EOS. [S, L] -> bool."""
    eos = np.asarray(targets) == EOS
    return (np.cumsum(eos, axis=1) - eos) == 0


def enumerate_responses() -> tuple[np.ndarray, np.ndarray]:
    """Every response of at most L tokens: ends at its first EOS or is cut at L tokens.

    Any token (the pad id 0 included) may appear before EOS. Returns targets [S, L] with
    0 after EOS, and the mask [S, L].
    """
    rows = []
    for length in range(1, L + 1):
        for body in itertools.product([t for t in range(V) if t != EOS], repeat=length - 1):
            rows.append([*body, EOS] + [0] * (L - length))
            if length == L:  # cut at max length: the last token is anything
                rows.extend([*body, t] for t in range(V) if t != EOS)
    targets = np.array(rows, np.int32)
    return targets, response_mask(targets)


_logits = jax.jit(models.logits, static_argnums=0)
_score = jax.jit(scoring.score, static_argnums=0)


def random_params(config, seed: int) -> dict:
    """Random parameters drawn with numpy at T5-like scales (kernels N(0, 1/fan_in),
    embeddings N(0, 1), norm scales 1): avoids compiling flax's init, slow on small CPUs."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(shape.shape, np.float32)
        std = 1.0 if "embedding" in name else shape.shape[0] ** -0.5
        return (rng.standard_normal(shape.shape) * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, models.param_shapes(config))


@functools.lru_cache(maxsize=16)
def make_model(seed: int, sharpness: float = 2.0, pad_heavy: bool = False):
    """A tiny random T5 with vocab V whose output logits are scaled (not near-uniform).

    The outputs are relabelled so EOS is the most likely token on average (responses of
    every length have visible probability) and, with `pad_heavy`, the pad id 0 the second
    most likely: 0 then occurs often inside responses. A column swap only renames tokens.
    """
    config = models.get_config("tiny", vocab_size=V)
    params = random_params(config, seed)
    kernel = params["decoder"]["logits_dense"]["kernel"] * sharpness
    probe = _logits(config, params, jnp.full((4, LX), 2), jnp.full((4, L), 3))
    order = np.argsort(-np.asarray(probe.mean(axis=(0, 1))))
    perm = np.arange(V)
    wanted = [EOS, 0] if pad_heavy else [EOS]
    for rank, token in enumerate(wanted):
        src = int(np.flatnonzero(perm == order[rank])[0])
        perm[[token, src]] = perm[[src, token]]
    params["decoder"]["logits_dense"] = {"kernel": kernel[:, perm]}
    return config, params


def make_pair(mix: float = 0.2, seeds: tuple[int, int] = (0, 1), pad_heavy: bool = False):
    """Reference p and student q: q is p moved `mix` of the way towards another random model."""
    p, other = make_model(seeds[0], pad_heavy=pad_heavy), make_model(seeds[1], pad_heavy=pad_heavy)
    q_params = jax.tree.map(lambda a, b: (1 - mix) * a + mix * b, p[1], other[1])
    return p, (p[0], q_params)


PAIRS = {  # name -> make_pair kwargs
    "near": dict(mix=0.2, seeds=(0, 1)),
    "far": dict(mix=0.5, seeds=(2, 3)),
    "pad_heavy": dict(mix=0.3, seeds=(4, 5), pad_heavy=True),
}


def masked_scores(model, inputs, targets, mask):
    """(token log-probs [B, L] 0 at pads, full log-probs [B, L, V]) with an explicit mask."""
    config, params = model
    full = _score(config, params, jnp.asarray(inputs), jnp.asarray(targets)).full_logprobs
    tok = scoring.gather_logprobs(full, jnp.asarray(targets))
    return np.where(mask, np.asarray(tok, np.float64), 0.0), full


def sequence_logprobs(model, population) -> np.ndarray:
    """log p(y|x) of every enumerated response for every prompt: [K, Lx] -> [K, S]."""
    targets, mask = enumerate_responses()
    k, s = population.shape[0], targets.shape[0]
    inputs = np.repeat(population, s, axis=0)
    tok = masked_scores(model, inputs, np.tile(targets, (k, 1)), np.tile(mask, (k, 1)))[0]
    return tok.sum(1).reshape(k, s)


def exact_divergences(p, q, population) -> dict[str, float]:
    """Exact forward KL, reverse KL and JS averaged over the prompt population [K, Lx], by
    enumerating every response; also 'p_mass' / 'q_mass', the smallest total probability
    of the enumerated space over the prompts (1 when the space is complete)."""
    lp, lq = sequence_logprobs(p, population), sequence_logprobs(q, population)
    lm = np.logaddexp(lp, lq) - math.log(2)
    pp, pq = np.exp(lp), np.exp(lq)
    return {
        "forward_kl": float((pp * (lp - lq)).sum(1).mean()),
        "reverse_kl": float((pq * (lq - lp)).sum(1).mean()),
        "js": float((0.5 * pp * (lp - lm) + 0.5 * pq * (lq - lm)).sum(1).mean()),
        "p_mass": float(pp.sum(1).min()),
        "q_mass": float(pq.sum(1).min()),
    }


def make_population(seed: int = 0, size: int = POPULATION) -> np.ndarray:
    """The prompt population [size, LX]: ids in [2, V) (no pad, no EOS)."""
    return np.random.default_rng(seed).integers(2, V, size=(size, LX)).astype(np.int32)


# ------------------------------------------------------------------------- sampling + scoring


def _sample(model, inputs, key, num_samples):
    s = sampling.sample(*model, inputs, key, num_samples=num_samples, max_decode_len=L)
    return np.asarray(s.tokens), np.asarray(s.mask), np.asarray(s.token_logprobs)


def score_chunk(p, q, inputs, key, num_samples):
    """Samples n responses per prompt row of `inputs` [B, Lx] from p and from q and scores
    them with the evaluator's `batch_scoring.score_fn` (p in the oracle's role).

    Returns (p_side, q_side) `batch_scoring.Side`s [B*n, L] and the sampler's own token
    log-probs of each sample set [B*n, L] x2 (to compare with the scored ones).
    """
    key_p, key_q = jax.random.split(key)
    y_p, m_p, s_p = _sample(p, inputs, key_p, num_samples)
    y_q, m_q, s_q = _sample(q, inputs, key_q, num_samples)
    configs = (("oracle", p[0]), ("student", q[0]))
    fn = batch_scoring.score_fn(configs, num_samples, None)
    params = {"oracle": p[1], "student": q[1]}
    samples = {"oracle": (y_p, m_p), "student": (y_q, m_q)}
    sides, _ = fn(params, jnp.asarray(inputs), samples, None)
    p_arrays, q_arrays = sides["oracle"]
    p_side = batch_scoring.Side(*(np.asarray(a, np.float64) for a in p_arrays), m_p)
    q_side = batch_scoring.Side(*(np.asarray(a, np.float64) for a in q_arrays), m_q)
    return p_side, q_side, (s_p, s_q), (y_p, y_q)


def estimates_of(p: batch_scoring.Side, q: batch_scoring.Side, ids) -> dict[str, dv.Estimate]:
    """'<estimator>/<div>' -> Estimate, exactly as `Evaluator._estimators` computes them."""
    p_len, q_len = p.mask.sum(1), q.mask.sum(1)
    p_a, p_b, q_a, q_b = (x.sum(1) for x in (p.a_tok, p.b_tok, q.a_tok, q.b_tok))
    return {
        "plain/forward_kl": dv.plain_kl(p_a, p_b, p_len, ids),
        "plain/reverse_kl": dv.plain_kl(q_a, q_b, q_len, ids),
        "plain/js": dv.plain_js(p_a, p_b, p_len, ids, q_b, q_a, q_len, ids),
        "rao_blackwell/forward_kl": dv.rao_blackwell_kl(p.kl, p.mask, ids),
        "rao_blackwell/reverse_kl": dv.rao_blackwell_kl(q.kl, q.mask, ids),
        "rao_blackwell/js": dv.rao_blackwell_js(p.mix, p.mask, ids, q.mix, q.mask, ids),
    }


def sampler_frequencies(model, population, num_samples: int, key, scored_by=None) -> float:
    """The sampler against the scorer: p-value of a chi-square test of the sampled responses'
    frequencies (`num_samples` per prompt of `population` [K, Lx]) against exp(score) of every
    enumerated response, summed over the prompts (cells of expected count < 5 pooled).
    scored_by: the model whose scores give the expected counts (default `model`; another
    one shows the test's power)."""
    from scipy import stats

    targets, _ = enumerate_responses()
    code = (np.asarray(targets) * V ** np.arange(L)).sum(1)
    index = np.full(V**L, -1)
    index[code] = np.arange(targets.shape[0])
    tokens = _sample(model, population, key, num_samples)[0]
    drawn = index[(tokens * V ** np.arange(L)).sum(1)].reshape(population.shape[0], num_samples)
    scorer = model if scored_by is None else scored_by
    expected = np.exp(sequence_logprobs(scorer, population)) * num_samples
    stat, dof = 0.0, 0
    for counts, want in zip(drawn, expected, strict=True):
        counts = np.bincount(counts, minlength=targets.shape[0])
        big = want >= 5
        c = np.append(counts[big], counts[~big].sum())
        e = np.append(want[big], want[~big].sum())
        stat += float(((c - e) ** 2 / np.maximum(e, 1e-12)).sum())
        dof += c.shape[0] - 1
    return float(stats.chi2.sf(stat, dof))


class Draws(NamedTuple):
    """Per-seed results of one setting: name -> [seeds] values / stderrs, [seeds, P]
    per-prompt values; max_abs_logprob_gap: the largest |sampler log-prob - scored log-prob|
    of any sampled token (the sampler and the scorer must agree); pad_fraction: the share
    of response tokens (EOS excluded) that are the pad id 0, per model."""

    values: dict[str, np.ndarray]
    stderrs: dict[str, np.ndarray]
    per_prompt: dict[str, np.ndarray]
    max_abs_logprob_gap: float
    pad_fraction: tuple[float, float]


def _side_rows(side: batch_scoring.Side, rows: slice) -> batch_scoring.Side:
    return batch_scoring.Side(*(x[rows] for x in side))


def _pad_share(tokens, mask) -> float:
    body = mask & (tokens != EOS)
    return float((body & (tokens == 0)).sum() / max(body.sum(), 1))


def simulate(pair, population, settings) -> Draws:
    """Runs `settings` (a `Setting`) for the pair (p, q) over the population [K, Lx]."""
    n, num_p = settings.num_samples, settings.num_prompts
    rng = np.random.default_rng(settings.seed)
    rows = rng.integers(0, population.shape[0], size=(settings.num_seeds, num_p))
    ids = np.repeat(np.arange(num_p), n)
    per_seed = num_p * n
    out: dict[str, list] = {}
    gap, pads = 0.0, np.zeros(2)
    base = jax.random.key(settings.seed)
    for c, start in enumerate(range(0, settings.num_seeds, settings.chunk)):
        seeds = range(start, min(start + settings.chunk, settings.num_seeds))
        inputs = population[rows[seeds.start : seeds.stop].reshape(-1)]
        p_side, q_side, sampler_lp, tokens = score_chunk(
            *pair, inputs, jax.random.fold_in(base, c), n
        )
        for own, side in zip(sampler_lp, (p_side, q_side), strict=True):
            gap = max(gap, float(np.abs(np.where(side.mask, own - side.a_tok, 0.0)).max()))
        pads += [_pad_share(t, s.mask) for t, s in zip(tokens, (p_side, q_side), strict=True)]
        for i in range(len(seeds)):
            r = slice(i * per_seed, (i + 1) * per_seed)
            for name, est in estimates_of(
                _side_rows(p_side, r), _side_rows(q_side, r), ids
            ).items():
                out.setdefault(name, []).append(est)
    chunks = math.ceil(settings.num_seeds / settings.chunk)
    return Draws(
        values={k: np.array([e.value for e in v]) for k, v in out.items()},
        stderrs={k: np.array([e.stderr for e in v]) for k, v in out.items()},
        per_prompt={k: np.stack([e.per_prompt for e in v]) for k, v in out.items()},
        max_abs_logprob_gap=gap,
        pad_fraction=tuple(float(x) for x in pads / chunks),
    )


class Setting(NamedTuple):
    """One study setting: a pair name (`PAIRS`), P prompts, n samples, seeds, seeds per
    sampler call, and the seed of the prompt draws and sample keys."""

    pair: str
    num_prompts: int
    num_samples: int = 4
    num_seeds: int = 1000
    chunk: int = 100
    seed: int = 0


# ------------------------------------------------------------------------------- summaries


def bias_z(values, exact: float) -> float:
    """(mean - exact) / (sd / sqrt(seeds)) of per-seed values [S]: ~N(0, 1) when unbiased."""
    values = np.asarray(values, np.float64)
    sd = values.std(ddof=1)
    return float((values.mean() - exact) / (sd / math.sqrt(values.shape[0])))


def coverage(values, stderrs, num_prompts: int, exact: float, method: str) -> float:
    """Share of seeds whose 95% interval (`divergences.half_width`) holds `exact`."""
    half = dv.half_width(np.asarray(stderrs), num_prompts, method=method)
    return float(np.mean(np.abs(np.asarray(values) - exact) <= half))


def _skewness(per_prompt: np.ndarray) -> float:
    """Mean over seeds of the sample skewness of the per-prompt values [S, P]."""
    c = per_prompt - per_prompt.mean(axis=1, keepdims=True)
    m2, m3 = (c**2).mean(axis=1), (c**3).mean(axis=1)
    return float(np.mean(m3 / np.maximum(m2, 1e-300) ** 1.5))


def summarize(setting: Setting, exact: dict, draws: Draws) -> list[dict]:
    """One row per estimator x divergence: the exact value, mean, bias (relative and z),
    sd over seeds vs mean stderr, coverage of each interval method, skewness of the
    per-prompt values."""
    rows = []
    for name, values in draws.values.items():
        target = exact[name.split("/")[1]]
        stderrs = draws.stderrs[name]
        row = dict(
            pair=setting.pair,
            prompts=setting.num_prompts,
            samples=setting.num_samples,
            seeds=setting.num_seeds,
            estimate=name,
            exact=target,
            mean=float(values.mean()),
            bias_pct=float(100 * (values.mean() - target) / target),
            bias_z=bias_z(values, target),
            sd_over_seeds=float(values.std(ddof=1)),
            mean_stderr=float(stderrs.mean()),
            skewness=_skewness(draws.per_prompt[name]),
        )
        for method in dv.INTERVAL_METHODS:
            row[f"coverage_{method}"] = coverage(
                values, stderrs, setting.num_prompts, target, method
            )
        rows.append(row)
    return rows


def run_setting(setting: Setting, population=None) -> tuple[dict, Draws, list[dict]]:
    """Exact values, draws and summary rows of one setting (population: `make_population()`)."""
    population = make_population() if population is None else population
    pair = make_pair(**PAIRS[setting.pair])
    exact = exact_divergences(*pair, population)
    draws = simulate(pair, population, setting)
    return exact, draws, summarize(setting, exact, draws)


COLUMNS = (
    ("pair", "{}"),
    ("prompts", "{}"),
    ("estimate", "{}"),
    ("exact", "{:.4f}"),
    ("bias_pct", "{:+.2f}%"),
    ("bias_z", "{:+.2f}"),
    ("sd_over_seeds", "{:.4f}"),
    ("mean_stderr", "{:.4f}"),
    ("skewness", "{:+.2f}"),
)


def markdown_table(rows: list[dict]) -> str:
    """The coverage table: one line per row of `summarize`, coverage of every method."""
    cols = list(COLUMNS) + [(f"coverage_{m}", "{:.1%}") for m in dv.INTERVAL_METHODS]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(f.format(row[c]) for c, f in cols) + " |")
    return "\n".join(lines)


def failures(rows: list[dict], z_max: float, min_coverage: float, method: str = "t") -> list:
    """The rows that fail the study's criteria: |bias z| >= z_max (biased) or coverage of
    `method`'s interval below min_coverage. Returns [(pair, prompts, estimate, reason)]."""
    bad = []
    for row in rows:
        where = (row["pair"], row["prompts"], row["estimate"])
        if not abs(row["bias_z"]) < z_max:
            bad.append((*where, f"bias z {row['bias_z']:+.2f}"))
        if not row[f"coverage_{method}"] >= min_coverage:
            bad.append((*where, f"coverage {row[f'coverage_{method}']:.3f}"))
    return bad
