"""Tests of the synthetic prompt grammar (numpy only)."""

import re

import numpy as np
import pytest

from thack_jax.data import synthetic
from thack_jax.data.synthetic import (
    CATEGORIES,
    EOS_ID,
    FIRST_WORD_ID,
    SyntheticGrammar,
    prompt_stats,
    synthetic_prompts,
)

_CATEGORY_OF = {}
for _name, _words in CATEGORIES.items():
    for _w in _words:
        _CATEGORY_OF[_w] = _name
_WORDS = SyntheticGrammar().words
_NP = r"det( adj){0,2} noun"
_CMD = rf"verb {_NP}( prep {_NP})?( adv)?"
_SENTENCE = re.compile(rf"^{_CMD}( conj {_CMD})?$")


def _categories(row):
    ids = row[: list(row).index(EOS_ID)]
    return " ".join(_CATEGORY_OF[_WORDS[i - FIRST_WORD_ID]] for i in ids)


def test_shape_eos_and_padding():
    p = synthetic_prompts(300, seed=1, max_length=12)
    assert p.shape == (300, 12) and p.dtype == np.int32
    for row in p:
        assert (row == EOS_ID).sum() == 1
        end = list(row).index(EOS_ID)
        assert np.all(row[:end] >= FIRST_WORD_ID)
        assert np.all(row[end + 1 :] == 0)
    assert (p != 0).sum(axis=1).max() <= 12


def test_every_prompt_parses_under_the_grammar():
    for row in synthetic_prompts(500, seed=2, max_length=20):
        assert _SENTENCE.match(_categories(row)), _categories(row)


def test_deterministic_and_prefix_stable():
    big = synthetic_prompts(1000, seed=5)
    np.testing.assert_array_equal(big, synthetic_prompts(1000, seed=5))
    np.testing.assert_array_equal(big[:500], synthetic_prompts(500, seed=5))
    np.testing.assert_array_equal(big[:200], synthetic_prompts(200, seed=5))
    assert not np.array_equal(big[:50], synthetic_prompts(50, seed=6))


def test_unique_and_non_unique():
    p = synthetic_prompts(3000, seed=0)
    assert np.unique(p, axis=0).shape[0] == 3000
    q = synthetic_prompts(3000, seed=0, unique=False)
    # Short prompts are frequent, so the natural distribution has duplicates.
    assert np.unique(q, axis=0).shape[0] < 3000


def test_splits_are_disjoint_and_about_ten_percent():
    train = {tuple(r) for r in synthetic_prompts(3000, split="train", seed=0)}
    val = {tuple(r) for r in synthetic_prompts(500, split="validation", seed=0)}
    val_other_seed = {tuple(r) for r in synthetic_prompts(500, split="validation", seed=9)}
    assert not train & val and not train & val_other_seed
    # Assignment is by a hash of the tokens: fraction of validation among raw candidates.
    g = SyntheticGrammar()
    rng = np.random.default_rng(0)
    draws = rng.random((4000, 32)).tolist()
    frac = np.mean([synthetic._split_of(tuple(g.sample(u))) == "validation" for u in draws])
    assert 0.06 < frac < 0.14


def test_count_sentences_by_hand():
    g = SyntheticGrammar()
    n = {k: len(v) for k, v in CATEGORIES.items()}
    three = n["verb"] * n["det"] * n["noun"]
    four = n["verb"] * n["det"] * n["adj"] * n["noun"] + three * n["adv"]
    assert g.count_sentences(3) == three == 448
    assert g.count_sentences(4) == three + four
    assert g.count_sentences(15) >= 10**5


def test_short_max_length_and_exhaustion(monkeypatch):
    p = synthetic_prompts(40, max_length=4)
    assert all(_categories(r) == "verb det noun" for r in p)
    with pytest.raises(ValueError, match="unique prompts"):
        synthetic_prompts(449, max_length=4)
    monkeypatch.setattr(synthetic, "_MAX_MISSES", 5000)
    with pytest.raises(RuntimeError, match="exhausted"):
        synthetic_prompts(100, split="validation", max_length=4)  # only ~45 exist


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        synthetic_prompts(3, split="test")
    with pytest.raises(ValueError, match="max_length"):
        synthetic_prompts(3, max_length=3)


def test_grammar_seed_changes_distribution_not_words():
    g1 = SyntheticGrammar(1)
    assert g1.words == SyntheticGrammar(0).words and len(g1.words) == 49
    a = synthetic_prompts(100, seed=0)
    b = synthetic_prompts(100, seed=0, grammar=g1)
    assert not np.array_equal(a, b)


def test_word_dependencies_exist():
    # The object noun depends on the verb: its distribution differs across verbs.
    p = synthetic_prompts(4000, seed=0, max_length=16, unique=False)
    verb = p[:, 0]
    counts = np.zeros((len(CATEGORIES["verb"]), len(CATEGORIES["noun"])))
    first_noun = FIRST_WORD_ID + _WORDS.index(CATEGORIES["noun"][0])
    for row, v in zip(p, verb, strict=True):
        noun = next(t for t in row if first_noun <= t < first_noun + counts.shape[1])
        counts[v - FIRST_WORD_ID, noun - first_noun] += 1
    top = counts.argmax(axis=1)
    assert len(set(top.tolist())) >= 3


def test_prompt_stats():
    p = np.array([[5, 6, 1, 0], [5, 1, 0, 0], [5, 6, 1, 0]], np.int32)
    s = prompt_stats(p)
    assert s == {
        "num_prompts": 3,
        "unique_prompts": 2,
        "mean_tokens": pytest.approx(8 / 3),
        "min_tokens": 2,
        "max_tokens": 3,
        "distinct_words": 2,
    }
    with pytest.raises(ValueError, match="shape"):
        prompt_stats(np.zeros(3))


# -- references ------------------------------------------------------------------------------
_NP_REF = r"det( adj){0,2} noun"
_CMD_REF = rf"{_NP_REF} verb( prep {_NP_REF})?( adv)?"
_REFERENCE = re.compile(rf"^{_CMD_REF}( conj {_CMD_REF})?$")


def _words(row, category):
    ids = row[: list(row).index(EOS_ID)]
    return sorted(int(i) for i in ids if _CATEGORY_OF[_WORDS[i - FIRST_WORD_ID]] == category)


def _draws(prompt, n=1000, seed=0):
    """The distinct references of one prompt over n draws and their entropy in bits."""
    refs = synthetic.synthetic_references(np.repeat(prompt[None], n, 0), seed=seed, max_length=32)
    _, counts = np.unique(refs, axis=0, return_counts=True)
    q = counts / n
    return len(counts), float(-(q * np.log2(q)).sum())


def test_references_paraphrase_their_prompts():
    p = synthetic_prompts(500, seed=2, max_length=16)
    r = synthetic.synthetic_references(p, seed=0, max_length=32)
    assert r.shape == (500, 32) and r.dtype == np.int32
    for prompt, ref in zip(p, r, strict=True):
        assert (ref == EOS_ID).sum() == 1 and np.all(ref[list(ref).index(EOS_ID) + 1 :] == 0)
        assert _REFERENCE.match(_categories(ref)), _categories(ref)
        # The object phrase moves before the verb; verbs, nouns, prepositions are kept.
        for category in ("verb", "noun", "prep", "conj"):
            assert _words(ref, category) == _words(prompt, category), category
        assert set(_words(ref, "adj")) <= set(_words(prompt, "adj"))
    assert r.max() <= FIRST_WORD_ID + len(_WORDS) - 1 and r[r > EOS_ID].min() >= FIRST_WORD_ID


def test_references_per_row_generators_and_cut():
    p = synthetic_prompts(300, seed=1, max_length=16)
    big = synthetic.synthetic_references(p, seed=4, max_length=12)
    np.testing.assert_array_equal(
        big[:40], synthetic.synthetic_references(p[:40], seed=4, max_length=12)
    )
    other = p.copy()
    other[7] = p[8]  # row i depends on prompt i only
    changed = synthetic.synthetic_references(other, seed=4, max_length=12)
    assert np.array_equal(np.delete(changed, 7, 0), np.delete(big, 7, 0))
    assert not np.array_equal(big, synthetic.synthetic_references(p, seed=5, max_length=12))
    long = synthetic.synthetic_references(p, seed=4, max_length=32)
    for cut, full in zip(big, long, strict=True):  # cut to 11 words + EOS
        n = list(full).index(EOS_ID)
        expected = list(full[: min(n, 11)]) + [EOS_ID]
        assert list(cut[: len(expected)]) == expected and not cut[len(expected) :].any()
    assert (synthetic.synthetic_references(p, seed=4, max_length=1) == EOS_ID).all()


def test_references_have_the_documented_entropy():
    p = synthetic_prompts(400, seed=0, max_length=16)
    lengths = (p != 0).sum(axis=1)
    short = p[lengths == 4][0]  # VERB DET NOUN EOS: det swap x adverb added
    distinct, bits = _draws(short)
    assert distinct == 4 and 1.5 < bits < 1.7  # 2 H(0.25) = 1.62
    longest = p[np.argmax(lengths)]
    distinct, bits = _draws(longest)
    assert distinct > 50 and bits > 4.5, (distinct, bits)


def test_references_refuse_rows_outside_the_grammar():
    p = synthetic_prompts(3, seed=0)
    bad = p.copy()
    bad[2, 0] = bad[2, 1]  # starts with a determiner
    with pytest.raises(ValueError, match="prompt row 2 .* not a sentence"):
        synthetic.synthetic_references(bad, seed=0, max_length=8)
    with pytest.raises(ValueError, match="seed"):
        synthetic.synthetic_references(p, seed=-1, max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        synthetic.synthetic_references(p, seed=0, max_length=0)
    with pytest.raises(ValueError, match="integer"):
        synthetic.synthetic_references(p[0], seed=0, max_length=8)
