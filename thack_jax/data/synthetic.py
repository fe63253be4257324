"""The synthetic prompt task: structured prompts from a small stochastic grammar (numpy only).

Prompts are imperative sentences over a 49-word vocabulary, drawn from a fixed probabilistic
context-free grammar (PCFG):

    S   -> CMD                      (p = 0.75)
         | CMD CONJ CMD             (p = 0.25)
    CMD -> VERB NP [PP] [ADV]       (PP with p = 0.5, ADV with p = 0.3)
    PP  -> PREP NP
    NP  -> DET ADJ^k NOUN           (k = 0, 1, 2 with p = 0.45, 0.35, 0.20)

Word choices are Zipf-distributed inside each category and carry dependencies, so prompts
share structure a model can learn and generalise from: the object noun depends on the verb,
the noun after a preposition depends on the preposition, and adjectives depend on their noun
(each a fixed permutation of the Zipf weights, drawn from the grammar's seed). Every word of
a category stays possible in every slot, so the number of distinct prompts is very large
(`SyntheticGrammar.count_sentences`: about 4e14 within 15 words, i.e. max_length 16).

Token ids follow the T5 convention (pad 0, eos 1, unk 2) and word `i` of `grammar.words`
has id `FIRST_WORD_ID + i`; `thack_jax.data.vocab.SyntheticVocabulary` uses the same ids.
In the oracle study the oracle model generates the responses. `synthetic_references` gives
the task procedural "human" references instead (field mode: no oracle), a stochastic
paraphrase of each prompt in the same words, each command rewritten as

    CMD' -> NP' VERB [PREP NP'] [ADV']      (the object phrase first, then the verb)
    NP'  -> DET' ADJ'* NOUN                 DET' = the <-> a, every <-> some with p = 0.25;
                                            each adjective dropped with p = 0.3; two kept
                                            ones swapped with p = 0.5
    ADV' -> the prompt's adverb, kept with p = 0.85; without one, the verb's own adverb
            (adverb number verb % 5) with p = 0.25
    S'   -> CMD1' and CMD2' | CMD2' and CMD1' (p = 0.5 each); CMD1' then CMD2' (kept)

Entropy per prompt (1000 draws for each of 300 prompts, max_length 16; docs/data.md has
the table): `VERB DET NOUN` prompts 4 distinct references, 1.6 bits (exactly 2 H(0.25) =
1.62); 1.4 - 3.8 bits for 5-6 tokens, up to 4.6 - 8.5 bits (54 - 498 distinct) for 13-16.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re
from collections.abc import Iterator

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
FIRST_WORD_ID = 3

# Fraction of all possible prompts that belongs to the validation split (by a stable hash).
VALIDATION_FRACTION = 0.1
SPLITS = ("train", "validation")
MIN_PROMPT_LENGTH = 4  # VERB DET NOUN EOS

CATEGORIES: dict[str, tuple[str, ...]] = {
    "verb": ("move", "take", "find", "put", "show", "paint", "count", "lift"),
    "det": ("the", "a", "every", "some"),
    "adj": ("red", "blue", "green", "small", "big", "old", "new", "round", "soft", "dark"),
    "noun": (
        "box",
        "ball",
        "cup",
        "key",
        "book",
        "lamp",
        "door",
        "tree",
        "stone",
        "bird",
        "fish",
        "chair",
        "table",
        "coin",
    ),  # fmt: skip
    "prep": ("on", "in", "under", "near", "behind", "with"),
    "adv": ("quickly", "slowly", "twice", "carefully", "again"),
    "conj": ("and", "then"),
}

# Rule probabilities of the PCFG (see the module docstring).
P_CONJ = 0.25
P_PP = 0.5
P_ADV = 0.3
P_NUM_ADJ = (0.45, 0.35, 0.20)
ZIPF_EXPONENT = 1.0

# Uniform draws reserved per candidate prompt; a fixed budget keeps the random stream aligned
# (candidate i always uses rows i of the stream), which makes outputs prefix-stable.
_DRAWS_PER_CANDIDATE = 32
_BLOCK = 2048
_MAX_MISSES = 200_000  # module-level so tests can lower it


def _cumulative(weights: np.ndarray) -> list[float]:
    c = np.cumsum(np.asarray(weights, np.float64))
    return (c / c[-1]).tolist()


def _pick(cum: list[float], u: float) -> int:
    return min(bisect.bisect_right(cum, u), len(cum) - 1)


class SyntheticGrammar:
    """A fixed PCFG over `CATEGORIES`; `seed` only sets the word distributions.

    Attributes:
      words: tuple of all terminal words (category order); word i has token id 3 + i.
      categories: category name -> tuple of words.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.categories = dict(CATEGORIES)
        self.words: tuple[str, ...] = tuple(w for ws in CATEGORIES.values() for w in ws)
        if len(set(self.words)) != len(self.words):
            raise ValueError("synthetic grammar words must be unique across categories")
        self._offset = {}
        start = 0
        for name, ws in CATEGORIES.items():
            self._offset[name] = start
            start += len(ws)

        rng = np.random.default_rng([self.seed, 7919])
        sizes = {name: len(ws) for name, ws in CATEGORIES.items()}

        def zipf(n: int) -> np.ndarray:
            return 1.0 / np.arange(1, n + 1) ** ZIPF_EXPONENT

        def permuted(n: int) -> list[float]:
            return _cumulative(rng.permutation(zipf(n)))

        self._cum = {name: permuted(n) for name, n in sizes.items()}
        # Dependencies: object noun | verb, PP noun | preposition, adjective | noun.
        self._noun_given_verb = [permuted(sizes["noun"]) for _ in range(sizes["verb"])]
        self._noun_given_prep = [permuted(sizes["noun"]) for _ in range(sizes["prep"])]
        self._adj_given_noun = [permuted(sizes["adj"]) for _ in range(sizes["noun"])]
        self._cum_num_adj = _cumulative(np.array(P_NUM_ADJ))

    # -- sampling -------------------------------------------------------------------------
    def _word(self, category: str, index: int) -> int:
        return FIRST_WORD_ID + self._offset[category] + index

    def _noun_phrase(self, u: list[float], pos: int, noun_cum: list[float]) -> tuple[list, int]:
        """NP -> DET ADJ^k NOUN; consumes exactly 5 draws from u[pos:]."""
        noun = _pick(noun_cum, u[pos])
        k = _pick(self._cum_num_adj, u[pos + 1])
        det = _pick(self._cum["det"], u[pos + 2])
        adj_cum = self._adj_given_noun[noun]
        adjs = [self._word("adj", _pick(adj_cum, u[pos + 3 + j])) for j in range(k)]
        ids = [self._word("det", det), *adjs, self._word("noun", noun)]
        return ids, pos + 5

    def _command(self, u: list[float], pos: int) -> tuple[list, int]:
        """CMD -> VERB NP [PREP NP] [ADV]; consumes exactly 15 draws from u[pos:]."""
        verb = _pick(self._cum["verb"], u[pos])
        ids = [self._word("verb", verb)]
        np_ids, _ = self._noun_phrase(u, pos + 1, self._noun_given_verb[verb])
        ids += np_ids
        if u[pos + 6] < P_PP:
            prep = _pick(self._cum["prep"], u[pos + 7])
            pp_ids, _ = self._noun_phrase(u, pos + 8, self._noun_given_prep[prep])
            ids += [self._word("prep", prep), *pp_ids]
        if u[pos + 13] < P_ADV:
            ids.append(self._word("adv", _pick(self._cum["adv"], u[pos + 14])))
        return ids, pos + 15

    def sample(self, u: list[float]) -> list[int]:
        """One sentence (token ids, no EOS) from 32 uniform draws `u` in [0, 1)."""
        ids, pos = self._command(u, 1)
        if u[0] < P_CONJ:
            second, _ = self._command(u, pos + 1)
            ids = ids + [self._word("conj", _pick(self._cum["conj"], u[pos])), *second]
        return ids

    # -- counting -------------------------------------------------------------------------
    def count_sentences(self, max_words: int) -> int:
        """Exact number of distinct sentences with at most `max_words` words.

        The grammar is unambiguous (every category is a disjoint word set and each rule has
        one parse), so counting derivations counts distinct strings.
        """
        n = {name: len(ws) for name, ws in CATEGORIES.items()}

        def conv(a: dict, b: dict) -> dict:
            out: dict[int, int] = {}
            for la, ca in a.items():
                for lb, cb in b.items():
                    if la + lb <= max_words:
                        out[la + lb] = out.get(la + lb, 0) + ca * cb
            return out

        noun_phrase = {2 + k: n["det"] * n["adj"] ** k * n["noun"] for k in range(3)}
        pp_opt = {0: 1, **{1 + length: n["prep"] * c for length, c in noun_phrase.items()}}
        adv_opt = {0: 1, 1: n["adv"]}
        cmd = conv(conv(conv({1: n["verb"]}, noun_phrase), pp_opt), adv_opt)
        two = conv(conv(cmd, {1: n["conj"]}), cmd)
        return sum(cmd.values()) + sum(two.values())


def _split_of(ids: tuple[int, ...]) -> str:
    """Stable split assignment from the token ids (independent of seeds and lengths)."""
    digest = hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).digest()
    bucket = int.from_bytes(digest[:8], "little") % 10_000
    return "validation" if bucket < int(VALIDATION_FRACTION * 10_000) else "train"


def _check_args(split: str, max_length: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if max_length < MIN_PROMPT_LENGTH:
        raise ValueError(
            f"max_length must be >= {MIN_PROMPT_LENGTH} (VERB DET NOUN EOS), got {max_length}"
        )


def iter_prompts(
    *,
    split: str = "train",
    seed: int = 0,
    max_length: int = 16,
    unique: bool = True,
    grammar: SyntheticGrammar | None = None,
) -> Iterator[tuple[int, ...]]:
    """Endless stream of prompts (token ids without EOS, at most `max_length - 1` words).

    Candidates are drawn from one random stream fixed by `seed`; those longer than
    `max_length - 1` words, of the other split, or (if `unique`) already seen are skipped.
    """
    _check_args(split, max_length)
    grammar = grammar or SyntheticGrammar()
    rng = np.random.default_rng([int(seed), 104729])
    seen: set[tuple[int, ...]] = set()
    misses = 0  # candidates since the last yield; bounds the search when prompts run out
    while True:
        block = rng.random((_BLOCK, _DRAWS_PER_CANDIDATE)).tolist()
        for u in block:
            ids = tuple(grammar.sample(u))
            if len(ids) > max_length - 1 or _split_of(ids) != split or (unique and ids in seen):
                misses += 1
                if misses > _MAX_MISSES:
                    raise RuntimeError(
                        f"no new {split!r} prompt of at most {max_length - 1} words in "
                        f"{_MAX_MISSES} candidates after {len(seen)} unique prompts: the "
                        "grammar is exhausted for this max_length; raise max_length"
                    )
                continue
            misses = 0
            if unique:
                seen.add(ids)
            yield ids


def synthetic_prompts(
    num_prompts: int,
    *,
    split: str = "train",
    seed: int = 0,
    max_length: int = 16,
    unique: bool = True,
    grammar: SyntheticGrammar | None = None,
) -> np.ndarray:
    """Deterministic synthetic prompts.

    Args:
      num_prompts: number of rows N.
      split: 'train' or 'validation' (disjoint by a hash of the token ids; ~10% validation).
      seed: stream seed. The first k rows of a request equal a request for k rows.
      max_length: row length L including EOS.
      unique: if True all rows are distinct.
      grammar: the grammar (default `SyntheticGrammar(0)`).

    Returns:
      int32 array [N, L]: word ids, then EOS (1), then pad (0).
    """
    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    _check_args(split, max_length)
    out = np.zeros((num_prompts, max_length), np.int32)
    stream = iter_prompts(
        split=split, seed=seed, max_length=max_length, unique=unique, grammar=grammar
    )
    grammar = grammar or SyntheticGrammar()
    capacity = grammar.count_sentences(max_length - 1)
    if unique and num_prompts > capacity:
        raise ValueError(
            f"asked for {num_prompts} unique prompts but the grammar has only {capacity} "
            f"sentences of at most {max_length - 1} words (both splits together)"
        )
    for i, ids in enumerate(itertools.islice(stream, num_prompts)):
        out[i, : len(ids)] = ids
        out[i, len(ids)] = EOS_ID
    return out


def prompt_stats(prompts: np.ndarray) -> dict:
    """Summary of prompts [N, L] int32: unique rows, tokens per prompt (incl. EOS), words used."""
    prompts = np.asarray(prompts)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [num_prompts, length], got shape {prompts.shape}")
    lengths = (prompts != PAD_ID).sum(axis=1)
    words = np.unique(prompts[prompts >= FIRST_WORD_ID])
    return {
        "num_prompts": int(prompts.shape[0]),
        "unique_prompts": int(np.unique(prompts, axis=0).shape[0]) if prompts.size else 0,
        "mean_tokens": float(lengths.mean()) if prompts.size else 0.0,
        "min_tokens": int(lengths.min()) if prompts.size else 0,
        "max_tokens": int(lengths.max()) if prompts.size else 0,
        "distinct_words": int(words.size),
    }


# -- references (see the module docstring) --------------------------------------------------
P_DET_SWAP = 0.25
P_ADJ_DROP = 0.3
P_ADJ_SWAP = 0.5
P_ADV_KEEP = 0.85
P_ADV_ADD = 0.25
P_CONJ_SWAP = 0.5  # 'and' only: 'then' keeps the order
_DET_PARTNER = (1, 0, 3, 2)  # the <-> a, every <-> some
_DRAWS_PER_REFERENCE = 19  # 9 per command, 1 for the order: a fixed budget per row


_LETTER = {"verb": "v", "det": "d", "adj": "a", "noun": "n", "prep": "p", "adv": "r", "conj": "c"}
_COMMAND = r"vda{0,2}n(?:pda{0,2}n)?r?"
_SENTENCE = re.compile(rf"({_COMMAND})(?:c({_COMMAND}))?")
_FIRST_ID: dict[str, int] = {}
_CATEGORY_OF_ID: dict[int, tuple[str, int]] = {}  # token id -> (category, index in it)
for _name, _ws in CATEGORIES.items():
    _FIRST_ID[_name] = FIRST_WORD_ID + len(_CATEGORY_OF_ID)
    _CATEGORY_OF_ID.update({_FIRST_ID[_name] + j: (_name, j) for j in range(len(_ws))})


def _parse_command(items: list[int], letters: str) -> dict:
    """{'verb', 'obj': (det, adjs, noun), 'pp': (prep, NP) | None, 'adv'} of one command's
    category indices `items` and category letters (already matched by _COMMAND)."""

    def noun_phrase(p: int) -> tuple[tuple, int]:
        q = letters.index("n", p)
        return (items[p], items[p + 1 : q], items[q]), q + 1

    obj, pos = noun_phrase(1)
    cmd = {"verb": items[0], "obj": obj, "pp": None, "adv": None}
    if pos < len(letters) and letters[pos] == "p":
        inner, end = noun_phrase(pos + 1)
        cmd["pp"], pos = (items[pos], inner), end
    if pos < len(letters):  # the adverb
        cmd["adv"] = items[pos]
    return cmd


def _parse(row_index: int, ids: list[int]) -> tuple[list[dict], int | None]:
    """(commands, conjunction index or None) of one prompt's word ids; ValueError if the
    ids are no sentence of the grammar."""
    cats = [_CATEGORY_OF_ID.get(i, ("?", 0)) for i in ids]
    letters = "".join(_LETTER.get(c, "?") for c, _ in cats)
    match = _SENTENCE.fullmatch(letters)
    if match is None:
        raise ValueError(
            f"prompt row {row_index} ({ids}) is not a sentence of the synthetic grammar: "
            "synthetic_references paraphrases synthetic_prompts rows only"
        )
    items = [j for _, j in cats]
    commands = [_parse_command(items[: match.end(1)], match.group(1))]
    if match.group(2) is None:
        return commands, None
    commands.append(_parse_command(items[match.start(2) :], match.group(2)))
    return commands, items[match.end(1)]


def _noun_phrase_ref(phrase: tuple, u: np.ndarray) -> list[int]:
    """NP' of (det, adjectives, noun) with 4 draws u."""
    det, adjs, noun = phrase
    det = _DET_PARTNER[det] if u[0] < P_DET_SWAP else det
    kept = [a for a, d in zip(adjs, u[1:3], strict=False) if d >= P_ADJ_DROP]
    if len(kept) == 2 and u[3] < P_ADJ_SWAP:
        kept = kept[::-1]
    adj_ids = [_FIRST_ID["adj"] + a for a in kept]
    return [_FIRST_ID["det"] + det, *adj_ids, _FIRST_ID["noun"] + noun]


def _command_ref(cmd: dict, u: np.ndarray) -> list[int]:
    """CMD' of a parsed command with 9 draws u."""
    out = [*_noun_phrase_ref(cmd["obj"], u[0:4]), _FIRST_ID["verb"] + cmd["verb"]]
    if cmd["pp"] is not None:
        prep, inner = cmd["pp"]
        out += [_FIRST_ID["prep"] + prep, *_noun_phrase_ref(inner, u[4:8])]
    if cmd["adv"] is not None and u[8] < P_ADV_KEEP:
        out.append(_FIRST_ID["adv"] + cmd["adv"])
    elif cmd["adv"] is None and u[8] < P_ADV_ADD:
        out.append(_FIRST_ID["adv"] + cmd["verb"] % len(CATEGORIES["adv"]))
    return out


def synthetic_references(prompts: np.ndarray, *, seed: int, max_length: int) -> np.ndarray:
    """Procedural "human" references of synthetic prompts (the rule: the module docstring).

    Args:
      prompts: int32 [N, Lx] rows of `synthetic_prompts` (words, EOS, pads).
      seed: row i draws from `default_rng([seed, i])` only, so the first k rows of a larger
        call equal a call for k rows, and repeating one prompt N times gives N draws.
      max_length: Ly >= 1, the row length including EOS.

    Returns:
      int32 [N, max_length]: word ids (3..51), EOS (1), pads (0); a reference longer than
      max_length - 1 words is cut and still ends with EOS.
    """
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts must be integer [N, Lx], got {prompts.dtype} {prompts.shape}")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(max_length, int | np.integer) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    out = np.zeros((len(prompts), max_length), np.int32)
    out[:, 0] = EOS_ID
    if max_length == 1:
        return out  # every reference cut to its EOS: no draws needed
    for i, row in enumerate(prompts.tolist()):
        ids = row[: row.index(EOS_ID)] if EOS_ID in row else [t for t in row if t != PAD_ID]
        commands, conj = _parse(i, ids)
        u = np.random.default_rng([int(seed), i]).random(_DRAWS_PER_REFERENCE)
        refs = [_command_ref(cmd, u[9 * k : 9 * k + 9]) for k, cmd in enumerate(commands)]
        words = refs[0]
        if conj is not None:
            swap = CATEGORIES["conj"][conj] == "and" and u[18] < P_CONJ_SWAP
            first, second = (refs[1], refs[0]) if swap else (refs[0], refs[1])
            words = [*first, _FIRST_ID["conj"] + conj, *second]
        words = words[: max_length - 1] + [EOS_ID]
        out[i, : len(words)] = words
    return out
