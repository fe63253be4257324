"""The evaluation data besides the models: held-out prompts (no overlap with training, cut
into batches) and their reference responses (checks, positional mask, cross-entropy).

A reference set is one response per held-out prompt, int [N, Ly_ref]: tokens, EOS (id 1),
then pad (0); a row without EOS is a response cut at Ly_ref (all Ly_ref tokens scored, as
the sampler does at max_decode_len). In field mode these are the task's own responses (the
data distribution), in oracle mode oracle samples.

The metric (`Evaluator`, prefix `reference/`): the cross-entropy of a model q on them,
nats per response, E_x E_{y~data}[-log q(y|x)] = KL(data || q) + H(data | x). H does not
depend on q, so a change of the student's reference cross-entropy is the same change of the
golden forward KL (data || student), measured without an oracle. When the references are
oracle samples, reference/cross_entropy - reference/oracle_cross_entropy is a plain
(paired: the same responses) estimate of golden/forward_kl.

The mask is positional, up to and including the first EOS, never `tokens != 0`: a
response that holds the pad id 0 before its EOS (a sample of an untrained model) is scored
on every token. Host (numpy) code only; the log-probs come from `batch_scoring`.
"""

from __future__ import annotations

import numpy as np

from thack_jax.evaluation import divergences

PREFIX = "reference"
STUDENT_KEY = f"{PREFIX}/cross_entropy"


def level_key(role: str) -> str:
    """The metric of a reference model's cross-entropy, e.g. reference/teacher_cross_entropy."""
    return f"{PREFIX}/{role}_cross_entropy"


def lengths_of(tokens: np.ndarray, eos_id: int = 1) -> np.ndarray:
    """tokens [N, L] -> [N] int: the position of the first EOS + 1, or L without EOS."""
    tokens = np.asarray(tokens)
    is_eos = tokens == eos_id
    first = np.argmax(is_eos, axis=1)
    return np.where(is_eos.any(axis=1), first + 1, tokens.shape[1]).astype(np.int32)


def positional_mask(tokens: np.ndarray, eos_id: int = 1) -> np.ndarray:
    """tokens [N, L] -> bool [N, L]: positions up to and including the first EOS."""
    lengths = lengths_of(tokens, eos_id)
    return np.arange(np.shape(tokens)[1])[None, :] < lengths[:, None]


def check_references(
    references,
    num_prompts: int,
    max_lengths: dict[str, int],
    vocab_size: int,
    sampled: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Validates a reference set; returns (tokens int32 [N, Ly_ref], mask bool [N, Ly_ref]).

    The mask is positional, the sampler's own rule: every position up to and including the
    first EOS, the whole row without one. A pad id (0) inside a response is a token there.

    Args:
      references: int array [N, Ly_ref] aligned with the N evaluation prompts.
      num_prompts: N.
      max_lengths: role -> its config's max_target_length (Ly_ref may not exceed any).
      vocab_size: token ids must lie in [0, vocab_size).
      sampled: the references are model samples (an oracle's, oracle mode). A row of pad
        ids without EOS is then a full-length response the model gave (a random oracle can
        sample id 0 at every position), not a missing one; a task's (human) references
        are padded with 0, so there an all-pad row is refused as a missing response.
    Raises:
      ValueError naming the shape, dtype, length or row that is wrong.
    """
    refs = np.asarray(references)
    if not np.issubdtype(refs.dtype, np.integer):
        raise ValueError(
            f"references must be integer token ids [N, Ly_ref], got dtype {refs.dtype} "
            f"(shape {refs.shape})"
        )
    if refs.ndim != 2 or refs.shape[0] != num_prompts or refs.shape[1] < 1:
        raise ValueError(
            f"references must have shape [num_prompts={num_prompts}, Ly_ref >= 1] (one "
            f"response per prompt), got {refs.shape}"
        )
    for role, limit in max_lengths.items():
        if refs.shape[1] > limit:
            raise ValueError(
                f"references have length Ly_ref={refs.shape[1]} (shape {refs.shape}), more "
                f"than the {role}'s max_target_length={limit}"
            )
    bad = np.flatnonzero(((refs < 0) | (refs >= vocab_size)).any(axis=1))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"references row {row} holds token ids outside [0, {vocab_size}): "
            f"{refs[row].tolist()[:16]} ({bad.size} such rows)"
        )
    mask = positional_mask(refs)
    # A task's all-pad row (no EOS, no token) is a missing response, not a response of pads.
    empty = np.flatnonzero(~(refs != 0).any(axis=1))
    if empty.size and not sampled:
        raise ValueError(
            f"references row {int(empty[0])} has no token at all (only pad 0, no EOS; "
            f"{empty.size} such rows of {refs.shape[0]}); every prompt needs a response"
        )
    return refs.astype(np.int32), mask


def cross_entropy(token_logprobs: np.ndarray, mask: np.ndarray) -> divergences.Estimate:
    """The mean negative log-likelihood of the references, one per prompt.

    token_logprobs [N, Ly_ref]: the model's log-prob of each reference token (any value at
    masked-out positions); mask [N, Ly_ref]. Returns an `Estimate` in nats per response,
    with its stderr over prompts, per token (ratio of sums) and per_prompt [N] the NLL of
    each reference. Raises divergences.NonFiniteValuesError for a non-finite log-prob.
    """
    mask = np.asarray(mask, bool)
    lp = np.where(mask, np.asarray(token_logprobs, np.float64), 0.0)
    lengths = mask.sum(axis=1).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(lp).all(axis=1))
    if bad.size:
        raise divergences.NonFiniteValuesError(
            f"non-finite log-probs of the reference responses at rows {bad[:5].tolist()}"
        )
    # E[0 - log q(y)]: the plain KL estimator with log p = 0 is exactly the mean NLL with
    # the same prompt-level errors (one response per prompt, prompt ids 0..N-1).
    n = lp.shape[0]
    return divergences.plain_kl(np.zeros(n), lp.sum(axis=1), lengths, np.arange(n))


# ----------------------------------------------------------------------------- prompts


def _trimmed_rows(prompts: np.ndarray) -> dict[bytes, int]:
    """Row content without trailing pads -> first row index."""
    out = {}
    for i, row in enumerate(np.asarray(prompts, np.int64)):
        out.setdefault(np.trim_zeros(row, "b").tobytes(), i)
    return out


def check_no_overlap(prompts: np.ndarray, train_prompts: np.ndarray) -> None:
    """Raises ValueError if a row of `prompts` [N, Lx] (trailing pads ignored) is also a row
    of `train_prompts` [M, Lx']."""
    train = _trimmed_rows(train_prompts)
    shared = [(i, train[k]) for k, i in _trimmed_rows(prompts).items() if k in train]
    if shared:
        shared.sort()
        i, j = shared[0]
        raise ValueError(
            f"{len(shared)} evaluation prompt(s) also appear in train_prompts (first: eval row "
            f"{i} = train row {j}); evaluation prompts must be held out"
        )


def batches_of(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """rows [N, ...] -> ceil(N / batch_size) batches [batch_size, ...], the last padded with
    copies of row 0 (the caller drops their results): one shape, one compilation."""
    num_batches = -(-len(rows) // batch_size)
    padded = np.concatenate([rows, np.repeat(rows[:1], num_batches * batch_size - len(rows), 0)])
    return [padded[b * batch_size : (b + 1) * batch_size] for b in range(num_batches)]
