"""A task's own references (human responses) as an offline store (numpy; jax for the
process index and the interrupt agreement only).

Field mode (no oracle) trains the SFT models on the task's references instead of on oracle
completions. `build_reference_store` writes them into an `OfflineStore` with one completion
per prompt, so the SFT stages read it exactly like oracle data
(`OfflineStore.open(directory).inputs / .targets`, [N, Lx] / [N, Ly] int32). Its spec names
`generating_model='references:<source>'` (e.g. 'references:xsum'); a store of other
inputs, lengths, vocabulary, source or seed is refused (`StoreMismatchError`) as for
generated stores, and so is one whose stored references differ from the given ones (the
spec records only the inputs' checksum). The rows are copied in chunks of
`REFERENCE_CHUNK_ROWS` through `OfflineStore.fill`, so a killed build resumes at its first
unfinished chunk, SIGTERM / SIGINT stops it between chunks (`interrupt.Interrupted`), and a
gs:// directory works like a local one (offline_store.py: one object per chunk while
filling, process 0 the only writer).
"""

from __future__ import annotations

import jax
import numpy as np

from thack_jax.data.generation import wait_until_filled
from thack_jax.data.offline_store import (
    OfflineSpec,
    OfflineStore,
    StoreMismatchError,
    progress_callback,
    prompts_checksum,
)
from thack_jax.data.synthetic import EOS_ID
from thack_jax.parallel import distributed

REFERENCE_CHUNK_ROWS = 4096
GENERATING_MODEL_PREFIX = "references:"


def _check_arrays(inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 copies of inputs [N, Lx] and targets [N, Ly], or ValueError naming the problem."""
    out = []
    for name, array in (("inputs", inputs), ("targets", targets)):
        array = np.asarray(array)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer) or not array.size:
            raise ValueError(
                f"reference {name} must be a non-empty integer [N, length] array, got "
                f"{array.dtype} {array.shape}"
            )
        out.append(array.astype(np.int32))
    inputs, targets = out
    if len(inputs) != len(targets):
        raise ValueError(
            f"reference inputs and targets differ in rows: {inputs.shape} vs {targets.shape}"
        )
    no_eos = np.flatnonzero(~(targets == EOS_ID).any(axis=1))
    if no_eos.size:
        i = int(no_eos[0])
        raise ValueError(
            f"reference targets row {i} has no EOS ({EOS_ID}): {targets[i].tolist()} "
            f"({no_eos.size} such rows); each row is tokens, EOS, then pads"
        )
    return inputs, targets


def _check_stored_rows(store: OfflineStore, targets: np.ndarray) -> None:
    """StoreMismatchError when the rows already in `store` differ from `targets`."""
    chunk = store.manifest["chunk_size"] or 0
    filled = len(targets) if store.is_complete else min(store.chunks_done * chunk, len(targets))
    stored = np.asarray(store.targets[:filled])
    differ = np.flatnonzero((stored != targets[:filled]).any(axis=1))
    if differ.size:
        i = int(differ[0])
        raise StoreMismatchError(
            f"reference store {store.directory} holds other references than the given "
            f"targets ({differ.size} of its {filled} rows differ, first row {i}: stored "
            f"{stored[i].tolist()} vs given {targets[i].tolist()}); delete it to rebuild, "
            "or use another directory"
        )


def build_reference_store(
    directory: str,
    *,
    inputs: np.ndarray,
    targets: np.ndarray,
    vocab_fingerprint: str,
    source: str,
    seed: int,
    chunk_size: int = REFERENCE_CHUNK_ROWS,
    progress=False,
) -> OfflineStore:
    """Writes (or resumes, or reopens) the store of the references `targets` of `inputs`.

    Args:
      directory: local or gs:// directory of the store.
      inputs: int32 [N, Lx] prompts; targets: int32 [N, Ly] their references (row i answers
        row i; tokens, EOS, pads).
      vocab_fingerprint: the vocabulary's fingerprint in the spec.
      source: where the references come from (the task name): generating_model
        'references:<source>'.
      seed: the seed the examples were drawn with, recorded in the spec.
      chunk_size: rows per chunk (a resume must use the same one).
      progress: False is silent, True prints chunks/s and ETA at most every 10 s, or a
        callable receiving {'chunk', 'num_chunks', 'chunks_per_s', 'eta_s'}.

    Returns:
      The complete store: inputs [N, Lx], targets [N, Ly], read-only.

    Raises:
      StoreMismatchError: the directory holds a store of another spec or other references.
      interrupt.Interrupted: SIGTERM / SIGINT between two chunks (the finished ones kept).
    """
    inputs, targets = _check_arrays(inputs, targets)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    chunk_size = min(chunk_size, len(inputs))
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string (the task name), got {source!r}")
    spec = OfflineSpec(
        num_prompts=len(inputs),
        completions_per_prompt=1,
        max_input_length=inputs.shape[1],
        max_target_length=targets.shape[1],
        vocab_fingerprint=vocab_fingerprint,
        generating_model=GENERATING_MODEL_PREFIX + source,
        seed=int(seed),
        prompts_checksum=prompts_checksum(inputs),
    )
    store = OfflineStore.create_or_open(directory, spec, inputs, writer=jax.process_index() == 0)
    _check_stored_rows(store, targets)
    if store.is_complete:
        return wait_until_filled(store)

    def copy(chunk_inputs: np.ndarray, chunk_index: int) -> np.ndarray:
        # SIGTERM / SIGINT: stop before the next chunk; the finished ones are saved. Agreed
        # by every process, as in generation.build_offline_store.
        distributed.stop_if_signalled(
            f"while filling the reference store {directory} at chunk {chunk_index} "
            "(finished chunks saved)"
        )
        start = chunk_index * chunk_size
        return targets[start : start + len(chunk_inputs)]

    store.fill(copy, chunk_size, progress=progress_callback(progress))
    return wait_until_filled(store)
