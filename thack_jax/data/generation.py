"""Model completions for the data regimes: sampled per step by `OnlineSource` (the online
regimes) or once into an offline store by `build_offline_store` (numpy + jax, no TensorFlow).

Both call the jitted sampler the same way: on the mesh when given one (the sampler runs under
`partitioning.activate(mesh)`), with the rows padded by copies of the first prompt to a
multiple of the data-parallel size (a row's sampling key depends only on its index, so
padding never changes the kept rows), and with a key folded from the step (online) or the
chunk index (offline), so that resumed data equals uninterrupted data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import jax
import numpy as np

from thack_jax.core import checks
from thack_jax.data.offline_store import (
    OfflineSpec,
    OfflineStore,
    progress_callback,
    prompts_checksum,
)
from thack_jax.data.regime_names import check_sampler_role
from thack_jax.data.row_streams import PromptPool, check_batch_size
from thack_jax.decoding import sampling
from thack_jax.decoding.settings import SamplingConfig
from thack_jax.parallel import distributed, partitioning

# ----------------------------------------------------------------------------- sampler calls


def _pad_rows(prompts: np.ndarray, multiple: int, at_least: int = 0) -> np.ndarray:
    """Pads prompts [n, Lx] with copies of row 0 to at least `at_least` rows, rounded up to
    a multiple of `multiple`. The sampler's key of a row depends only on the row's index, so
    the first n rows' samples are the same with or without padding."""
    extra = max(at_least, len(prompts))
    extra = extra + (-extra % multiple) - len(prompts)
    return np.concatenate([prompts, np.repeat(prompts[:1], extra, axis=0)]) if extra else prompts


# ----------------------------------------------------------------------------- online


class OnlineSource:
    """Fresh samples every step: {'inputs' [B, Lx] numpy, 'targets' [B, Ly] jax int32,
    and with `targets_temperature` set 'teacher_logprobs' [B, Ly, V] jax float32}.

    role='teacher' samples from `params` (the teacher's); role='student' needs params=None
    and samples with the `student_params` given to `next_batch` (the student's current
    params; the trainer calls `next_batch` before the step, with that step's params).
    settings: the sampler's `SamplingConfig` (one response per prompt: num_samples must be
    1; its max_decode_len is Ly). Step t samples with key `fold_in(key(seed), t)`; the only
    state is the prompt pool's.
    targets_temperature: the train step's distillation temperature T (StepConfig.temperature)
    when the batch should carry the sampler's full log-probs as the teacher's targets
    (None: it does not). Allowed only for role 'teacher' and when they equal the step's
    tempered teacher, log_softmax(logits / T): `settings.gives_distillation_targets(T)`.
    They equal `scoring.score` of the samples (tempered) on the response positions (after
    EOS they are 0; the trainer masks pads).
    With a mesh, the sampler runs on it and the rows are padded to a multiple of the
    data-parallel size.
    """

    def __init__(
        self,
        role,
        prompts: PromptPool,
        config,
        params,
        settings: SamplingConfig,
        seed: int,
        *,
        targets_temperature: float | None = None,
        mesh=None,
    ):
        check_sampler_role(role, "role")
        if role == "teacher" and params is None:
            raise ValueError("role='teacher' needs the teacher's params")
        if role == "student" and params is not None:
            raise ValueError(
                "role='student' takes params=None: it samples with the "
                "student_params passed to next_batch (the current ones)"
            )
        if not isinstance(settings, SamplingConfig) or settings.num_samples != 1:
            raise ValueError(
                f"settings must be a SamplingConfig with num_samples=1 (one response per "
                f"prompt), got {settings!r}"
            )
        if targets_temperature is not None and (
            role != "teacher" or not settings.gives_distillation_targets(targets_temperature)
        ):
            raise ValueError(
                "targets_temperature needs role='teacher' and sampling at that temperature "
                "without top-k / top-p (the sampler's log-probs are then the step's tempered "
                f"teacher); got role={role!r}, targets_temperature={targets_temperature!r}, "
                f"settings={settings}"
            )
        sampling.validate_sample_args(
            config, (prompts.batch_size, prompts.prompts.shape[1]), settings
        )
        self.role, self.prompts, self.config, self.params = role, prompts, config, params
        self.settings, self.seed = settings, int(seed)
        self.targets_temperature, self.mesh = targets_temperature, mesh
        if mesh is None and jax.process_count() > 1:
            raise ValueError("online sampling with several processes needs a mesh")
        self._multiple = 1 if mesh is None else partitioning.data_parallel_size(mesh)

    @property
    def provide_teacher_logprobs(self) -> bool:
        """Whether batches carry 'teacher_logprobs'."""
        return self.targets_temperature is not None

    @property
    def max_decode_len(self) -> int:
        return self.settings.max_decode_len

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
        out = sampling.sample(
            self.config,
            params,
            self._global(_pad_rows(prompts, self._multiple, pad_to)),
            rng,
            self.settings,
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


# ----------------------------------------------------------------------------- offline data


def params_fingerprint(params) -> str:
    """sha256 (hex) over the parameter leaves in tree order: path, shape, dtype and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.ascontiguousarray(partitioning.to_host(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.shape}|{arr.dtype.name}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """What `build_offline_store` generates (everything but the model and the prompts).

    generating_model: the model's name in the store's spec (e.g. 'teacher').
    completions_per_prompt: c >= 1 samples per prompt. max_decode_len: Ly >= 1.
    seed: chunk k is sampled with key fold_in(key(seed), k).
    vocab_fingerprint: the vocabulary's fingerprint in the store's spec.
    chunk_size: prompts per sampler call (>= 1; a resume must use the same one).
    temperature: the sampling temperature (0 = greedy); no top-k / top-p, since the spec
      records only the temperature.
    """

    generating_model: str
    completions_per_prompt: int
    max_decode_len: int
    seed: int
    vocab_fingerprint: str
    chunk_size: int = 256
    temperature: float = 1.0

    def __post_init__(self):
        checks.text(self, "generating_model")
        checks.text(self, "vocab_fingerprint")
        for name in ("completions_per_prompt", "max_decode_len", "chunk_size"):
            checks.integer(self, name, 1)
        checks.integer(self, "seed")
        checks.number(self, "temperature", 0)

    def sampling(self) -> SamplingConfig:
        """The sampler's settings: c samples per prompt at `temperature`, untruncated."""
        return SamplingConfig(
            max_decode_len=self.max_decode_len,
            num_samples=self.completions_per_prompt,
            temperature=self.temperature,
        )


def build_offline_store(
    directory: str,
    *,
    model: tuple,
    prompts: np.ndarray,
    generation: GenerationConfig,
    progress=True,
    mesh=None,
) -> OfflineStore:
    """Generates (or resumes, or reopens) the offline dataset of `prompts` [N, Lx].

    model: (config, params) of the generating model. generation: a `GenerationConfig`.
    Completions: c = completions_per_prompt samples per prompt, prompt-major, targets
    [N*c, max_decode_len]. Chunk k (chunk_size prompts) is sampled with key
    `fold_in(key(seed), k)`, so a resumed generation gives the same arrays as an
    uninterrupted one (with the same chunk_size; another one is refused).
    The spec's `generating_model` is '<generating_model>|params=<params_fingerprint>|T=<t>',
    so a store made by other parameters or at another temperature is refused
    (`StoreMismatchError`) instead of being reused.
    progress: True prints chunks/s and ETA at most every 10 s, False is silent, or a
    callable receiving {'chunk', 'num_chunks', 'chunks_per_s', 'eta_s'}.
    In a multi-process run every process calls it (the sampler runs on the mesh); a remote
    (gs://) store is then written by process 0 only, a local one by each process.
    """
    if not isinstance(generation, GenerationConfig):
        raise ValueError(f"generation must be a GenerationConfig, got {type(generation).__name__}")
    if not isinstance(model, tuple | list) or len(model) != 2:
        raise ValueError(f"model must be a (config, params) pair, got {type(model).__name__}")
    config, params = model
    g = generation
    completions_per_prompt, seed = g.completions_per_prompt, g.seed
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts must be integer [N, Lx], got {prompts.dtype} {prompts.shape}")
    prompts = prompts.astype(np.int32)
    chunk = min(check_batch_size(g.chunk_size), len(prompts))
    settings = g.sampling()
    sampling.validate_sample_args(config, (chunk, prompts.shape[1]), settings)
    spec = OfflineSpec(
        num_prompts=len(prompts),
        completions_per_prompt=completions_per_prompt,
        max_input_length=prompts.shape[1],
        max_target_length=g.max_decode_len,
        vocab_fingerprint=g.vocab_fingerprint,
        generating_model=(
            f"{g.generating_model}|params={params_fingerprint(params)}|T={g.temperature:g}"
        ),
        seed=int(seed),
        prompts_checksum=prompts_checksum(prompts),
    )
    store = OfflineStore.create_or_open(directory, spec, prompts, writer=jax.process_index() == 0)
    if store.is_complete:
        return wait_until_filled(store)
    multiple = math.lcm(chunk, 1 if mesh is None else partitioning.data_parallel_size(mesh))

    def generate(chunk_prompts: np.ndarray, chunk_index: int) -> np.ndarray:
        # SIGTERM / SIGINT: stop before the next chunk; the finished ones are saved. Agreed
        # by every process (the sampler is a collective on a multi-process mesh).
        distributed.stop_if_signalled(
            f"while filling the offline store {directory} at chunk {chunk_index} "
            "(finished chunks saved)"
        )
        # The short last chunk is padded to the full chunk shape: one compiled sampler.
        rng = jax.random.fold_in(jax.random.key(int(seed)), chunk_index)
        out = sampling.sample(
            config, params, _pad_rows(chunk_prompts, multiple), rng, settings, mesh=mesh
        )
        return partitioning.to_host(out.tokens)[: len(chunk_prompts) * completions_per_prompt]

    store.fill(generate, chunk, progress=progress_callback(progress))
    return wait_until_filled(store)


def wait_until_filled(store: OfflineStore) -> OfflineStore:
    """`store` once every process has it complete. A remote store's one writer (process 0)
    finishes it after the last chunk (whole arrays, complete manifest, chunk objects
    deleted): no process may go on before, or a later stage opening the store mid-cleanup
    looks for chunk objects already deleted. Every process passes here, whether it found
    the store complete or filled it (a process arriving after the fill finds it complete)."""
    distributed.barrier("offline_store_filled")
    return store
