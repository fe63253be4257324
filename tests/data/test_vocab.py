"""Tests of the vocabularies (synthetic word vocabulary; SentencePiece with T5 ids)."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

from thack_jax.data.synthetic import SyntheticGrammar, synthetic_prompts
from thack_jax.data.vocab import SyntheticVocabulary, padded_vocab_size, sentencepiece_vocabulary

_SENTENCES = [
    "summarize: the cat sat on the mat",
    "translate English to German: the house is small",
    "a short summary of a long document about the sea",
    "the quick brown fox jumps over the lazy dog",
]


def train_sentencepiece(directory) -> str:
    """Trains a tiny SentencePiece model with T5 special ids; returns its path."""
    import sentencepiece as spm

    prefix = os.path.join(directory, "tiny_sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 10),
        model_prefix=prefix,
        vocab_size=60,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return prefix + ".model"


def test_synthetic_vocabulary_ids_and_size():
    v = SyntheticVocabulary()
    assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
    assert v.vocab_size == 64 and v.vocab_size % 8 == 0
    assert v.words == SyntheticGrammar().words
    assert v.encode("move the red box") == [
        3 + v.words.index(w) for w in "move the red box".split()
    ]
    assert v.encode("move the zebra") == [3, 3 + v.words.index("the"), 2]
    with pytest.raises(ValueError, match="multiple of 8"):
        SyntheticVocabulary(size=60)
    with pytest.raises(ValueError, match=">= 52"):
        SyntheticVocabulary(size=48)


def test_synthetic_decode_round_trip():
    v = SyntheticVocabulary()
    for row in synthetic_prompts(50, seed=3):
        text = v.decode(row)
        ids = v.encode(text)
        np.testing.assert_array_equal(row[: len(ids)], ids)
        assert row[len(ids)] == v.eos_id
    # Stops at EOS, skips pads, spare ids decode to <unk>.
    assert v.decode([3, 0, 4, 1, 5, 6]) == f"{v.words[0]} {v.words[1]}"
    assert v.decode([2, 60]) == "<unk> <unk>"
    with pytest.raises(ValueError, match="token id 64"):
        v.decode([64])


def test_fingerprint():
    a, b = SyntheticVocabulary(), SyntheticVocabulary(SyntheticGrammar(seed=4))
    assert a.fingerprint() == b.fingerprint()  # grammar seed changes probabilities, not words
    assert a == b
    assert a.fingerprint() != SyntheticVocabulary(size=128).fingerprint()
    assert a.fingerprint().startswith("synthetic-")


def test_light_modules_do_not_import_tensorflow():
    # A fresh interpreter where tensorflow/seqio/tfds cannot be imported at all.
    code = (
        "import sys\n"
        "for m in ('tensorflow', 'seqio', 'tensorflow_datasets'): sys.modules[m] = None\n"
        "import thack_jax.data, thack_jax.data.vocab, thack_jax.data.synthetic\n"
        "import thack_jax.data.offline_store, thack_jax.data.tasks\n"
        "p = thack_jax.data.load_prompts('synthetic', split='train', num_prompts=4,\n"
        "                                max_input_length=16)\n"
        "assert p.shape == (4, 16)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_synthetic_as_seqio_matches_python():
    import tensorflow as tf

    v = SyntheticVocabulary()
    sv = v.as_seqio()
    assert (sv.pad_id, sv.eos_id, sv.unk_id, sv.vocab_size) == (0, 1, 2, 64)
    assert sv == SyntheticVocabulary().as_seqio()
    rows = synthetic_prompts(8, seed=1)
    for row in rows:
        text = v.decode(row)
        assert sv.encode_tf(tf.constant(text)).numpy().tolist() == v.encode(text)
        assert sv.decode(row.tolist()) == text
    decoded = sv.decode_tf(tf.constant(rows)).numpy()
    assert [d.decode() for d in decoded] == [v.decode(r) for r in rows]
    assert sv.encode_tf(tf.constant("move the zebra")).numpy().tolist() == v.encode(
        "move the zebra"
    )


def test_sentencepiece_vocabulary_t5_ids(tmp_path):
    path = train_sentencepiece(tmp_path)
    v = sentencepiece_vocabulary(path)
    assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
    ids = v.encode("the cat sat on the mat")
    assert ids and min(ids) >= 3
    assert v.decode(ids + [1, 5, 6]) == "the cat sat on the mat"
    assert padded_vocab_size(v) == 128
    assert sentencepiece_vocabulary(path, extra_ids=10).vocab_size == v.vocab_size + 10


def test_sentencepiece_missing_file(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        sentencepiece_vocabulary(missing)


def test_padded_vocab_size():
    assert padded_vocab_size(types.SimpleNamespace(vocab_size=32100)) == 32128
    assert padded_vocab_size(types.SimpleNamespace(vocab_size=32128)) == 32128
    assert padded_vocab_size(types.SimpleNamespace(vocab_size=50), multiple=8) == 56
