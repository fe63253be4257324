"""Shuffled, resumable batches of a complete offline store (numpy only)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from thack_jax.data.offline_format import ARRAYS


class OfflineIterator:
    """Shuffled batches {'inputs' [B, Lx], 'targets' [B, Ly]} (int32 numpy) of a complete store.

    Epoch e visits the rows in the order `np.random.default_rng([seed, e]).permutation(M)`
    (M = N * c), in batches of `batch_size`; the last partial batch of an epoch is dropped
    so shapes stay static. After `num_epochs` epochs iteration stops (StopIteration);
    `num_epochs=None` repeats forever. `state_dict()` / `load_state_dict()` resume exactly.

    `store` is a complete `offline_store.OfflineStore` (not imported here, which would be an
    import cycle: `offline_store` re-exports this class).
    """

    def __init__(self, store, batch_size: int, seed: int, num_epochs=None):
        if not store.is_complete:
            raise ValueError(f"offline store {store.directory} is not complete; fill it first")
        if batch_size <= 0 or batch_size > len(store):
            raise ValueError(
                f"batch_size must be in [1, {len(store)}] (store rows), got {batch_size}"
            )
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs}")
        self.store, self.batch_size, self.seed = store, int(batch_size), int(seed)
        self.num_epochs = num_epochs
        self.batches_per_epoch = len(store) // self.batch_size
        self.epoch, self.index = 0, 0  # index: next batch within the epoch
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.store)), epoch
        return self._perm

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        b = self.batch_size
        rows = self._permutation(self.epoch)[self.index * b : (self.index + 1) * b]
        order = np.argsort(rows)  # read the memmap in increasing row order
        batch = {}
        for name in ARRAYS:
            data = np.empty((b, getattr(self.store, name).shape[1]), np.int32)
            data[order] = getattr(self.store, name)[rows[order]]
            batch[name] = data
        self.index += 1
        return batch

    @property
    def exhausted(self) -> bool:
        return self.num_epochs is not None and (
            self.epoch >= self.num_epochs
            or (self.epoch == self.num_epochs - 1 and self.index >= self.batches_per_epoch)
        )

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(
                f"iterator state {state} out of range (batches_per_epoch {self.batches_per_epoch})"
            )
        self.epoch, self.index = epoch, index
