"""Distillation data regimes: batch sources for the trainer (numpy + jax, no TensorFlow).

Every source follows the trainer's `BatchSource` protocol:
  next_batch(step, student_params) -> {'inputs' [B, Lx] int32, 'targets' [B, Ly] int32,
                                       optionally 'teacher_logprobs' [B, Ly, V] float32}
  state_dict() -> dict (JSON-serialisable); load_state_dict(state).

Regimes (`REGIMES`):
  offline         rows of an `OfflineStore` (completions generated once), reshuffled per epoch.
  online_teacher  fresh teacher samples for each batch of prompts; with temperature 1 the
                  sampler's full log-probs come along as 'teacher_logprobs', so the trainer
                  skips its teacher forward.
  online_student  fresh samples of the student under the params passed to `next_batch`. The
                  trainer calls `next_batch(step, params)` BEFORE the train step of `step`,
                  with the params that step starts from: the samples are on-policy for the
                  very parameters the gradient is taken at.
  mixed           each batch has k online rows and B - k offline rows (see `MixedSource`).

Randomness and resume: row orders come from `np.random.default_rng([seed, epoch, ...])`
permutations and the sampling key of step t is `fold_in(key(seed), t)`. A source's state is
only its positions in these orders, so a source restored with `load_state_dict` gives the
same batch at step t as an uninterrupted one, independent of how it got there.
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import flax.linen as nn
import jax
import numpy as np

from thack_jax import partitioning, sampling
from thack_jax.data.offline_store import OfflineSpec, OfflineStore, prompts_checksum

REGIMES = ("offline", "online_teacher", "online_student", "mixed")
ROLES = ("teacher", "student")

# Extra words of the permutation seeds, so a prompt pool and an offline store (or the mixing
# coin) built with the same seed never share a random stream.
_POOL_SALT = 1
_MIX_SALT = 2


# ----------------------------------------------------------------------------- row streams


class _RowStream:
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


def _gather(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows] as int32, reading a memmap in increasing row order."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), array.shape[1]), np.int32)
    out[order] = array[rows[order]]
    return out


def _process_share(batch: dict) -> dict:
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


def _to_host(x) -> np.ndarray:
    """A jax array -> numpy on every process (gathered when it spans several processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _check_batch_size(batch_size) -> int:
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
        self.batch_size = _check_batch_size(batch_size)
        self._stream = _RowStream(len(prompts), seed, salt=(_POOL_SALT,))

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
        self.store, self.batch_size = store, _check_batch_size(batch_size)
        self._stream = _RowStream(len(store), seed, num_epochs=num_epochs)

    def next_rows(self, n: int) -> dict:
        rows = self._stream.take(n)
        return {
            "inputs": _gather(self.store.inputs, rows),
            "targets": _gather(self.store.targets, rows),
        }

    def next_batch(self, step: int, student_params=None) -> dict:
        del step, student_params  # the stored data depends on neither
        return _process_share(self.next_rows(self.batch_size))

    def state_dict(self) -> dict:
        return self._stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._stream.load_state_dict(state)


def _sampling_context(mesh):
    if mesh is None:
        return contextlib.nullcontext()
    return nn.logical_axis_rules(partitioning.flax_axis_rules(mesh))


def _pad_rows(prompts: np.ndarray, multiple: int, at_least: int = 0) -> np.ndarray:
    """Pads prompts [n, Lx] with copies of row 0 to at least `at_least` rows, rounded up to
    a multiple of `multiple`. The sampler's key of a row depends only on the row's index, so
    the first n rows' samples are the same with or without padding."""
    extra = max(at_least, len(prompts))
    extra = extra + (-extra % multiple) - len(prompts)
    return np.concatenate([prompts, np.repeat(prompts[:1], extra, axis=0)]) if extra else prompts


class OnlineSource:
    """Fresh samples every step: {'inputs' [B, Lx] numpy, 'targets' [B, Ly] jax int32,
    and with `provide_teacher_logprobs` 'teacher_logprobs' [B, Ly, V] jax float32}.

    role='teacher' samples from `params` (the teacher's); role='student' needs params=None
    and samples with the `student_params` given to `next_batch` (the student's current
    params; the trainer calls `next_batch` before the step, with that step's params).
    Step t samples with key `fold_in(key(seed), t)`; the only state is the prompt pool's.
    `provide_teacher_logprobs` (teacher role, temperature 1 only) returns the sampler's
    log_softmax over the vocabulary, which equals `scoring.score` of the samples on the
    response positions (after EOS they are 0; the trainer masks pads).
    With a mesh, the logical axis rules of `partitioning` are activated around the sampler
    and the rows are padded to a multiple of the data-parallel size.
    """

    def __init__(
        self,
        role,
        prompts: PromptPool,
        config,
        params,
        max_decode_len: int,
        seed: int,
        temperature: float = 1.0,
        provide_teacher_logprobs: bool = False,
        mesh=None,
    ):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if role == "teacher" and params is None:
            raise ValueError("role='teacher' needs the teacher's params")
        if role == "student" and params is not None:
            raise ValueError(
                "role='student' takes params=None: it samples with the "
                "student_params passed to next_batch (the current ones)"
            )
        if provide_teacher_logprobs and (role != "teacher" or temperature != 1):
            raise ValueError(
                "provide_teacher_logprobs needs role='teacher' and temperature 1 (the sampler's "
                f"log-probs are then the teacher's own); got role={role!r}, "
                f"temperature={temperature!r}"
            )
        sampling.validate_sample_args(
            config,
            (prompts.batch_size, prompts.prompts.shape[1]),
            num_samples=1,
            max_decode_len=max_decode_len,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
        )
        self.role, self.prompts, self.config, self.params = role, prompts, config, params
        self.max_decode_len, self.seed, self.temperature = (
            int(max_decode_len),
            int(seed),
            temperature,
        )
        self.provide_teacher_logprobs, self.mesh = bool(provide_teacher_logprobs), mesh
        if mesh is None and jax.process_count() > 1:
            raise ValueError("online sampling with several processes needs a mesh")
        self._multiple = 1 if mesh is None else partitioning.data_parallel_size(mesh)

    def _global(self, rows: np.ndarray):
        """Host rows [n, ...] (the same on every process) -> a batch-sharded global array."""
        if self.mesh is None:
            return rows
        sharding = partitioning.batch_sharding(self.mesh, rows.ndim)
        return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])

    @property
    def batch_size(self) -> int:
        return self.prompts.batch_size

    def sample_rows(self, step: int, student_params, num_rows: int, pad_to: int = 0) -> dict:
        """Samples one response for each of the next `num_rows` prompts, with step's key.

        pad_to: sample at least this many rows (extra ones discarded), so that varying
        num_rows <= pad_to reuse one compiled sampler.
        Returns {'inputs' [n, Lx] numpy (the same on every process), 'targets' [n, Ly] and
        maybe 'teacher_logprobs' [n, Ly, V] as (global) jax arrays}.
        """
        params = self.params if self.role == "teacher" else student_params
        if params is None:
            raise ValueError(
                "the online student source samples with the student's current "
                "params: pass them as next_batch(step, student_params)"
            )
        prompts = self.prompts.next_rows(num_rows)
        rng = jax.random.fold_in(jax.random.key(self.seed), int(step))
        with _sampling_context(self.mesh):
            out = sampling.sample(
                self.config,
                params,
                self._global(_pad_rows(prompts, self._multiple, pad_to)),
                rng,
                num_samples=1,
                max_decode_len=self.max_decode_len,
                temperature=self.temperature,
                return_full_logprobs=self.provide_teacher_logprobs,
                mesh=self.mesh,
            )
        cut = (lambda x: x) if len(out.tokens) == num_rows else (lambda x: x[:num_rows])
        batch = {"inputs": prompts, "targets": cut(out.tokens)}
        if self.provide_teacher_logprobs:
            batch["teacher_logprobs"] = cut(out.full_logprobs)
        return batch

    def next_batch(self, step: int, student_params=None) -> dict:
        """Under a mesh all arrays are global jax arrays (rows over the data axes)."""
        batch = self.sample_rows(step, student_params, self.batch_size)
        return {**batch, "inputs": self._global(batch["inputs"])}

    def state_dict(self) -> dict:
        return {"prompts": self.prompts.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])


class MixedSource:
    """Per-batch mixing: batch t has k(t) online rows (first) and B - k(t) offline rows.

    k(t) = floor(f*B) + [u_t < f*B - floor(f*B)] with u_t ~ U[0, 1) from
    `default_rng([seed, t, 2])`: deterministic per step, k(t) in {floor, ceil} and
    E[k] = f*B exactly, so every step's gradient has the same expected composition
    ("f of the data is online") rather than alternating whole online / offline steps.
    Offline rows keep their epoch accounting (each row once per epoch). 'teacher_logprobs'
    is never returned: the trainer's teacher forward serves all rows. `last_num_online`
    holds k of the latest batch (for logging). State: both children's states.
    """

    def __init__(
        self,
        offline: OfflineSource,
        online: OnlineSource,
        online_fraction: float,
        batch_size: int,
        seed: int = 0,
    ):
        try:
            f = float(online_fraction)
        except (TypeError, ValueError):
            f = math.nan
        if not 0 <= f <= 1:  # also refuses NaN
            raise ValueError(f"online_fraction must be a number in [0, 1], got {online_fraction!r}")
        self.batch_size, self.seed = _check_batch_size(batch_size), int(seed)
        if online.provide_teacher_logprobs:
            raise ValueError(
                "MixedSource needs an online source without provide_teacher_logprobs"
                " (the trainer's teacher forward serves all rows)"
            )
        lx, ly = offline.store.inputs.shape[1], offline.store.targets.shape[1]
        if online.prompts.prompts.shape[1] != lx or online.max_decode_len != ly:
            raise ValueError(
                f"online rows [., {online.prompts.prompts.shape[1]}] -> [., "
                f"{online.max_decode_len}] do not match the offline store's inputs [., {lx}] "
                f"and targets [., {ly}]"
            )
        self.offline, self.online, self.online_fraction = offline, online, f
        self.last_num_online = None

    def num_online(self, step: int) -> int:
        x = self.online_fraction * self.batch_size
        lo = math.floor(x + 1e-9)
        frac = x - lo
        if frac <= 1e-9:
            return min(lo, self.batch_size)
        u = np.random.default_rng([self.seed, int(step), _MIX_SALT]).random()
        return lo + int(u < frac)

    def next_batch(self, step: int, student_params=None) -> dict:
        k = self.num_online(step)
        # Offline first: if the store is exhausted nothing is consumed from the prompt pool.
        parts = [self.offline.next_rows(self.batch_size - k)] if k < self.batch_size else []
        if k:
            pad_to = math.ceil(self.online_fraction * self.batch_size - 1e-9)
            online = self.online.sample_rows(step, student_params, k, pad_to=pad_to)
            parts.insert(0, {"inputs": online["inputs"], "targets": _to_host(online["targets"])})
        self.last_num_online = k
        keys = ("inputs", "targets")
        return _process_share(
            {n: np.concatenate([p[n] for p in parts]).astype(np.int32) for n in keys}
        )

    def state_dict(self) -> dict:
        return {"offline": self.offline.state_dict(), "online": self.online.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.offline.load_state_dict(state["offline"])
        self.online.load_state_dict(state["online"])


# ----------------------------------------------------------------------------- offline data


def params_fingerprint(params) -> str:
    """sha256 (hex) over the parameter leaves in tree order: path, shape, dtype and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.ascontiguousarray(_to_host(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.shape}|{arr.dtype.name}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def build_offline_store(
    directory: str,
    *,
    generating_model: str,
    config,
    params,
    prompts: np.ndarray,
    completions_per_prompt: int,
    max_decode_len: int,
    seed: int,
    vocab_fingerprint: str,
    chunk_size: int = 256,
    temperature: float = 1.0,
    progress=True,
    mesh=None,
) -> OfflineStore:
    """Generates (or resumes, or reopens) the offline dataset of `prompts` [N, Lx].

    Completions: c = completions_per_prompt samples per prompt, prompt-major, targets
    [N*c, max_decode_len]. Chunk k (chunk_size prompts) is sampled with key
    `fold_in(key(seed), k)`, so a resumed generation gives the same arrays as an
    uninterrupted one (with the same chunk_size; another one is refused).
    The spec's `generating_model` is '<generating_model>|params=<params_fingerprint>|T=<t>',
    so a store made by other parameters or at another temperature is refused
    (`StoreMismatchError`) instead of being reused.
    progress: True prints chunks/s and ETA at most every 10 s, False is silent, or a
    callable receiving {'chunk', 'num_chunks', 'chunks_per_s', 'eta_s'}.
    Run it in one process: the store's files have a single writer.
    """
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts must be integer [N, Lx], got {prompts.dtype} {prompts.shape}")
    prompts = prompts.astype(np.int32)
    chunk = min(_check_batch_size(chunk_size), len(prompts))
    sampling.validate_sample_args(
        config,
        (chunk, prompts.shape[1]),
        num_samples=completions_per_prompt,
        max_decode_len=max_decode_len,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
    )
    spec = OfflineSpec(
        num_prompts=len(prompts),
        completions_per_prompt=completions_per_prompt,
        max_input_length=prompts.shape[1],
        max_target_length=max_decode_len,
        vocab_fingerprint=vocab_fingerprint,
        generating_model=f"{generating_model}|params={params_fingerprint(params)}|T={temperature:g}",
        seed=int(seed),
        prompts_checksum=prompts_checksum(prompts),
    )
    store = OfflineStore.create_or_open(directory, spec, prompts)
    if store.is_complete:
        return store
    multiple = math.lcm(chunk, 1 if mesh is None else partitioning.data_parallel_size(mesh))

    def generate(chunk_prompts: np.ndarray, chunk_index: int) -> np.ndarray:
        # The short last chunk is padded to the full chunk shape: one compiled sampler.
        rng = jax.random.fold_in(jax.random.key(int(seed)), chunk_index)
        with _sampling_context(mesh):
            out = sampling.sample(
                config,
                params,
                _pad_rows(chunk_prompts, multiple),
                rng,
                num_samples=completions_per_prompt,
                max_decode_len=max_decode_len,
                temperature=temperature,
                mesh=mesh,
            )
        return _to_host(out.tokens)[: len(chunk_prompts) * completions_per_prompt]

    if progress is True:
        callback = None  # the store's default: a line with chunks/s and ETA every 10 s
    elif progress is False or progress is None:
        callback = lambda _: None
    else:
        callback = progress
    store.fill(generate, chunk, progress=callback)
    return store


# ----------------------------------------------------------------------------- factory


def make_source(
    regime: str,
    *,
    batch_size: int,
    seed: int,
    offline_store: OfflineStore | None = None,
    prompts: np.ndarray | None = None,
    teacher: tuple | None = None,
    student_config=None,
    max_decode_len: int | None = None,
    online_fraction: float | None = None,
    online_role: str = "student",
    num_epochs: int | None = None,
    provide_teacher_logprobs: bool = True,
    mesh=None,
):
    """Builds the batch source of `regime` (one of `REGIMES`).

    Args:
      offline_store: a complete store; needed by 'offline' and 'mixed'. It also supplies
        defaults: its unique prompts for the online prompt pool and its target length for
        max_decode_len.
      prompts: [N, Lx] prompts of the online regimes (default: the store's).
      teacher: (config, params) of the teacher; needed to sample from it.
      student_config: the student's T5Config; needed to sample from the student (its params
        arrive with each `next_batch` call).
      online_fraction: 'mixed' only, in [0, 1]. online_role: who samples the online rows of
        'mixed' ('student' or 'teacher').
      num_epochs: offline epochs before StopIteration (None = endless).
      provide_teacher_logprobs: 'online_teacher' returns the sampler's log-probs.
    Raises:
      ValueError: unknown regime (lists the valid ones) or a missing / stray argument.
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; valid regimes: {', '.join(REGIMES)}")
    if online_fraction is not None and regime != "mixed":
        raise ValueError(
            f"online_fraction={online_fraction!r} only applies to regime 'mixed', not {regime!r}"
        )
    if regime in ("offline", "mixed") and offline_store is None:
        raise ValueError(f"regime {regime!r} needs offline_store")
    if regime == "offline":
        return OfflineSource(offline_store, batch_size, seed, num_epochs)

    role = {"online_teacher": "teacher", "online_student": "student"}.get(regime, online_role)
    if role not in ROLES:
        raise ValueError(f"online_role must be one of {ROLES}, got {role!r}")
    if prompts is None:
        if offline_store is None:
            raise ValueError(
                f"regime {regime!r} needs prompts (or an offline_store to take them from)"
            )
        prompts = offline_store.prompts
    if max_decode_len is None:
        if offline_store is None:
            raise ValueError(f"regime {regime!r} needs max_decode_len")
        max_decode_len = offline_store.spec.max_target_length
    if role == "teacher":
        if teacher is None:
            raise ValueError(
                f"regime {regime!r} samples from the teacher: pass teacher=(config, params)"
            )
        config, params = teacher
    else:
        if student_config is None:
            raise ValueError(f"regime {regime!r} samples from the student: pass student_config")
        config, params = student_config, None
    pool = PromptPool(prompts, batch_size, seed)
    provide = provide_teacher_logprobs and regime == "online_teacher"
    online = OnlineSource(
        role,
        pool,
        config,
        params,
        max_decode_len,
        seed,
        provide_teacher_logprobs=provide,
        mesh=mesh,
    )
    if regime != "mixed":
        return online
    if online_fraction is None:
        raise ValueError("regime 'mixed' needs online_fraction in [0, 1]")
    offline = OfflineSource(offline_store, batch_size, seed, num_epochs)
    return MixedSource(offline, online, online_fraction, batch_size, seed=seed)
