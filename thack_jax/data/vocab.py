"""Vocabularies: the download-free synthetic word vocabulary and SentencePiece (T5) ones.

Importing this module does not import TensorFlow or seqio; `SyntheticVocabulary.as_seqio`
and `sentencepiece_vocabulary` import them when called.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np

from thack_jax.data import synthetic

UNK_TOKEN = "<unk>"


class SyntheticVocabulary:
    """Word-level vocabulary of the synthetic task: ids 0 pad, 1 eos, 2 unk, then the words.

    Word `i` of `grammar.words` has id 3 + i (as produced by `synthetic.synthetic_prompts`).
    Ids from 3 + len(words) up to `vocab_size` - 1 are padding of the embedding table and
    decode to "<unk>".
    """

    pad_id = synthetic.PAD_ID
    eos_id = synthetic.EOS_ID
    unk_id = synthetic.UNK_ID
    name = "synthetic"

    def __init__(self, grammar: synthetic.SyntheticGrammar | None = None, size: int = 64):
        """Args: grammar (its word list; default grammar), size: vocab_size, a multiple of 8."""
        self.words: tuple[str, ...] = (grammar or synthetic.SyntheticGrammar()).words
        needed = synthetic.FIRST_WORD_ID + len(self.words)
        if size < needed or size % 8:
            raise ValueError(
                f"size must be a multiple of 8 and >= {needed} (3 special ids + "
                f"{len(self.words)} words), got {size}"
            )
        self._size = int(size)
        self._ids = {w: synthetic.FIRST_WORD_ID + i for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode(self, text: str) -> list[int]:
        """Whitespace-split words to ids (unknown words -> unk); no EOS is added."""
        return [self._ids.get(w, self.unk_id) for w in text.split()]

    def _token(self, i: int) -> str:
        if not 0 <= i < self._size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self._size})")
        j = i - synthetic.FIRST_WORD_ID
        return self.words[j] if 0 <= j < len(self.words) else UNK_TOKEN

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text: stops at the first EOS, skips pads; unk and spare ids -> '<unk>'."""
        out = []
        for i in np.asarray(list(ids), dtype=np.int64).tolist():
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(self._token(i))
        return " ".join(out)

    def fingerprint(self) -> str:
        """Hash of the word list, special ids and size (recorded in offline-store manifests)."""
        payload = json.dumps(
            {"name": self.name, "size": self._size, "special": [0, 1, 2], "words": self.words}
        )
        return f"{self.name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"

    def __eq__(self, other) -> bool:
        return isinstance(other, SyntheticVocabulary) and self.fingerprint() == other.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return f"SyntheticVocabulary(words={len(self.words)}, vocab_size={self._size})"

    def as_seqio(self):
        """This vocabulary as a `seqio.Vocabulary` (imports TensorFlow and seqio)."""
        return _seqio_vocabulary_class()(self)


@functools.cache
def _seqio_vocabulary_class():
    """Builds the seqio.Vocabulary subclass once, importing TF only when it is needed."""
    import seqio
    import tensorflow as tf

    class SeqioSyntheticVocabulary(seqio.Vocabulary):
        """seqio wrapper of `SyntheticVocabulary` (python and TF encode/decode agree)."""

        def __init__(self, vocab: SyntheticVocabulary):
            self.vocab = vocab
            super().__init__(extra_ids=0)
            spare = vocab.vocab_size - synthetic.FIRST_WORD_ID - len(vocab.words)
            # Decoding table indexed by id: pad and eos decode to "" and are dropped below.
            self._id_to_word = ["", "", UNK_TOKEN, *vocab.words] + [UNK_TOKEN] * spare

        @property
        def eos_id(self):
            return self.vocab.eos_id

        @property
        def unk_id(self):
            return self.vocab.unk_id

        @property
        def _base_vocab_size(self):
            return self.vocab.vocab_size

        def _encode(self, s):
            return self.vocab.encode(s)

        def _decode(self, ids):
            return self.vocab.decode(ids)

        def _encode_tf(self, s):
            # Exact string match against the small word list: no lookup-table resources,
            # so this is safe inside tf.data map functions.
            tokens = tf.strings.split(s)
            words = tf.constant(list(self.vocab.words))
            match = tf.equal(tf.expand_dims(tokens, -1), words)
            ids = tf.cast(tf.argmax(tf.cast(match, tf.int32), axis=-1), tf.int32)
            ids = ids + synthetic.FIRST_WORD_ID
            return tf.where(tf.reduce_any(match, axis=-1), ids, self.vocab.unk_id)

        def _decode_tf(self, ids):
            table = tf.constant(self._id_to_word)
            ids = tf.clip_by_value(tf.cast(ids, tf.int32), 0, self.vocab.vocab_size - 1)
            joined = tf.strings.reduce_join(tf.gather(table, ids), axis=-1, separator=" ")
            return tf.strings.strip(tf.strings.regex_replace(joined, " +", " "))

        def __eq__(self, other):
            return isinstance(other, SeqioSyntheticVocabulary) and self.vocab == other.vocab

        def __hash__(self):
            return hash(self.vocab)

    return SeqioSyntheticVocabulary


def sentencepiece_vocabulary(model_path: str, extra_ids: int = 0):
    """A `seqio.SentencePieceVocabulary` for a SentencePiece model file (e.g. T5's).

    Raises:
      FileNotFoundError: naming the path when a local model file does not exist.
    """
    path = os.fspath(model_path)
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(
            f"SentencePiece model file not found: {path!r} (T5 uses "
            "'cc_all.32000/sentencepiece.model'; copy it locally and pass its path)"
        )
    import seqio

    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def padded_vocab_size(vocab, multiple: int = 128) -> int:
    """`vocab.vocab_size` rounded up to a multiple of `multiple` (T5: 32100 -> 32128)."""
    size = int(vocab.vocab_size)
    return -(-size // multiple) * multiple
