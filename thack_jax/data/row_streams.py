"""Row sources over fixed rows: prompt batches and offline-store batches in seeded epoch
orders, resumable from their positions (numpy; jax only for the process helpers).

Epoch e of a stream visits its rows in the order `default_rng([seed, e, *salt])
.permutation(num_rows)`; a draw may straddle two epochs, so every row is used exactly once
per epoch whatever the draw sizes. A stream's state is only its position in these orders.
Also here: the host-side helpers every batch source uses (`process_share`,
`check_batch_size`). The sources that sample from a model are in `generation.py`, the
mixture and the regime factory in `regimes.py`.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from thack_jax.data.offline_store import OfflineStore

# Extra words of the permutation seeds, so a prompt pool and an offline store (or the mixing
# coin of `regimes.MixedSource`) built with the same seed never share a random stream.
POOL_SALT = 1
MIX_SALT = 2


class RowStream:
    """Row indices of `num_rows` rows, epoch after epoch; epoch e visits the rows in the order
    `default_rng([seed, e, *salt]).permutation(num_rows)`. Draws may straddle epochs, so every
    row is visited exactly once per epoch whatever the draw sizes. State: epoch, index (the
    next position within the epoch)."""

    def __init__(self, num_rows: int, seed: int, salt: tuple = (), num_epochs: int | None = None):
        if num_rows <= 0:
            raise ValueError(f"need at least one row, got {num_rows}")
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs}")
        self.num_rows, self.seed, self.salt = int(num_rows), int(seed), tuple(salt)
        self.num_epochs = num_epochs
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch, *self.salt])
            self._perm, self._perm_epoch = rng.permutation(self.num_rows), epoch
        return self._perm

    def remaining(self) -> float:
        if self.num_epochs is None:
            return math.inf
        return (self.num_epochs - self.epoch) * self.num_rows - self.index

    def take(self, n: int) -> np.ndarray:
        """The next n row indices [n]; StopIteration (state unchanged) if fewer remain."""
        if n > self.remaining():
            raise StopIteration(
                f"{n} rows asked, {self.remaining()} left of {self.num_epochs} epochs"
            )
        parts = []
        while n > 0:
            if self.index == self.num_rows:
                self.epoch, self.index = self.epoch + 1, 0
            got = min(n, self.num_rows - self.index)
            parts.append(self.permutation(self.epoch)[self.index : self.index + got])
            self.index, n = self.index + got, n - got
        return np.concatenate(parts) if parts else np.zeros((0,), np.int64)

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.num_rows:
            raise ValueError(f"stream state {state} out of range ({self.num_rows} rows per epoch)")
        self.epoch, self.index = epoch, index


# ----------------------------------------------------------------------------- host helpers


def gather_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows] as int32, reading a memmap in increasing row order."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), array.shape[1]), np.int32)
    out[order] = array[rows[order]]
    return out


def process_share(batch: dict) -> dict:
    """This process's contiguous share of the rows of a global host batch (the trainer reads
    numpy arrays as process-local rows); the whole batch in a single process."""
    count = jax.process_count()
    if count == 1:
        return batch
    rows = len(next(iter(batch.values())))
    if rows % count:
        raise ValueError(f"batch of {rows} rows is not divisible by the {count} processes")
    share, i = rows // count, jax.process_index()
    return {k: v[i * share : (i + 1) * share] for k, v in batch.items()}


def check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, int | np.integer) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


# ----------------------------------------------------------------------------- sources


class PromptPool:
    """Prompt batches [B, Lx] drawn epoch by epoch from prompts [N, Lx].

    Epoch e visits the prompts in the order `default_rng([seed, e, 1]).permutation(N)`; a
    batch may straddle two epochs (every prompt is used once per epoch, none dropped).
    `state_dict()` = {'epoch', 'index'} (index = next position within the epoch).
    """

    def __init__(self, prompts: np.ndarray, batch_size: int, seed: int):
        prompts = np.asarray(prompts)
        if (
            prompts.ndim != 2
            or prompts.shape[0] < 1
            or not np.issubdtype(prompts.dtype, np.integer)
        ):
            raise ValueError(
                f"prompts must be integer [N, Lx] with N >= 1, got {prompts.dtype} {prompts.shape}"
            )
        self.prompts = prompts.astype(np.int32)
        self.batch_size = check_batch_size(batch_size)
        self._stream = RowStream(len(prompts), seed, salt=(POOL_SALT,))

    def next_rows(self, n: int) -> np.ndarray:
        """The next n prompts [n, Lx] int32."""
        return self.prompts[self._stream.take(n)]

    def next_prompts(self) -> np.ndarray:
        return self.next_rows(self.batch_size)

    def state_dict(self) -> dict:
        return self._stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._stream.load_state_dict(state)


class OfflineSource:
    """Batches {'inputs' [B, Lx], 'targets' [B, Ly]} (numpy int32) of a complete store.

    The row order is `OfflineIterator`'s: epoch e visits the N*c rows in the order
    `default_rng([seed, e]).permutation(N*c)`, so with B dividing N*c the batches equal
    `OfflineIterator(store, B, seed)`'s. Unlike it, a batch that does not fit the rest of an
    epoch straddles into the next one instead of being dropped: every row is used exactly once
    per epoch, also under mixing, where the number of offline rows varies per step. After
    `num_epochs` epochs (None = endless) `next_batch` raises StopIteration.
    """

    def __init__(self, store: OfflineStore, batch_size: int, seed: int, num_epochs=None):
        if not store.is_complete:
            raise ValueError(f"offline store {store.directory} is not complete; fill it first")
        self.store, self.batch_size = store, check_batch_size(batch_size)
        self._stream = RowStream(len(store), seed, num_epochs=num_epochs)

    def next_rows(self, n: int) -> dict:
        rows = self._stream.take(n)
        return {
            "inputs": gather_rows(self.store.inputs, rows),
            "targets": gather_rows(self.store.targets, rows),
        }

    def next_batch(self, step: int, student_params=None) -> dict:
        del step, student_params  # the stored data depends on neither
        return process_share(self.next_rows(self.batch_size))

    def state_dict(self) -> dict:
        return self._stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._stream.load_state_dict(state)
