r"""Coverage of the evaluator's 95% intervals and bias of its estimates, against exact
divergences by enumeration (`thack_jax/evaluation/coverage.py`).

  python launch/coverage.py [--pairs=near,far,pad_heavy] [--prompts=40,200] \
      [--samples=4] [--seeds=1000] [--out=coverage.json]

For every pair x prompt count: --seeds independent evaluations (prompts drawn with
replacement from a 24-prompt population, --samples responses per prompt from each model,
the real sampler and the evaluator's scoring), six estimates each (plain and
Rao-Blackwellised x forward KL, reverse KL, JS). Prints the markdown table (coverage of the
normal and the Student-t intervals, bias in % and as a z-score over seeds) and, with --out,
writes {"settings": [...], "exact": {...}, "rows": [...]} as JSON.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from thack_jax.cli import common

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(common)  # --help lists --verbose
flags.DEFINE_list("pairs", ["near", "far", "pad_heavy"], "Model pairs (coverage.PAIRS).")
flags.DEFINE_list("prompts", ["40", "200"], "Prompts per evaluation (one setting each).")
flags.DEFINE_integer("samples", 4, "Responses per prompt from each model.")
flags.DEFINE_integer("seeds", 1000, "Independent evaluations per setting.")
flags.DEFINE_integer("chunk", 100, "Evaluations per sampler call (memory vs calls).")
flags.DEFINE_integer("seed", 0, "Seed of the prompt draws and sample keys.")
flags.DEFINE_integer(
    "frequency_samples", 10000, "Samples per prompt of the sampler's chi-square check (0: none)."
)
flags.DEFINE_string("out", None, "Write the table as JSON here.")


def _settings(coverage):
    unknown = sorted(set(FLAGS.pairs) - set(coverage.PAIRS))
    if unknown:
        raise ValueError(f"unknown --pairs {unknown}; valid: {sorted(coverage.PAIRS)}")
    try:
        prompts = [int(p) for p in FLAGS.prompts]
    except ValueError as e:
        raise ValueError(f"--prompts must be integers; got {FLAGS.prompts}") from e
    if min(prompts) < 2 or FLAGS.samples < 1 or FLAGS.seeds < 2 or FLAGS.chunk < 1:
        raise ValueError("need --prompts >= 2, --samples >= 1, --seeds >= 2, --chunk >= 1")
    return [
        coverage.Setting(pair, p, FLAGS.samples, FLAGS.seeds, FLAGS.chunk, FLAGS.seed)
        for pair in FLAGS.pairs
        for p in prompts
    ]


def _frequency_check(coverage, pair: str) -> list[float]:
    """Chi-square p-values (p's samples, q's samples) of the sampler against the scorer."""
    import jax

    models = coverage.make_pair(**coverage.PAIRS[pair])
    population, key = coverage.make_population(), jax.random.key(FLAGS.seed + 1000)
    pvalues = [
        coverage.sampler_frequencies(m, population, FLAGS.frequency_samples, key) for m in models
    ]
    print(
        f"coverage: {pair}: sampled response frequencies vs exp(score), {FLAGS.frequency_samples}"
        f" per prompt: chi-square p = {pvalues[0]:.3f} (p), {pvalues[1]:.3f} (q)",
        flush=True,
    )
    return pvalues


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from thack_jax.evaluation import coverage  # jax: after the flags are checked

    settings = _settings(coverage)
    rows, exact, checks = [], {}, {}
    for setting in settings:
        start = time.time()
        values, draws, summary = coverage.run_setting(setting)
        exact[setting.pair] = values
        checks[f"{setting.pair}/{setting.num_prompts}"] = dict(
            max_abs_logprob_gap=draws.max_abs_logprob_gap, pad_fraction=draws.pad_fraction
        )
        rows += summary
        print(
            f"coverage: {setting.pair} P={setting.num_prompts} n={setting.num_samples} "
            f"seeds={setting.num_seeds}: {time.time() - start:.0f} s, pad share of response "
            f"tokens p/q {draws.pad_fraction[0]:.2f}/{draws.pad_fraction[1]:.2f}, "
            f"sampler-vs-scored log-prob gap {draws.max_abs_logprob_gap:.1e}",
            flush=True,
        )
    for pair in FLAGS.pairs if FLAGS.frequency_samples else ():
        checks[f"{pair}/sampler_chi2_p"] = _frequency_check(coverage, pair)
    print(coverage.markdown_table(rows))
    if FLAGS.out:
        payload = dict(
            settings=[s._asdict() for s in settings], exact=exact, checks=checks, rows=rows
        )
        with open(FLAGS.out, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"coverage: wrote {FLAGS.out}")


def run() -> None:
    """`python launch/coverage.py`."""
    common.run(main, "coverage.py")


if __name__ == "__main__":
    run()
