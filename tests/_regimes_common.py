"""Shared setup of the batch-source tests (tests/data/test_row_streams.py, test_generation.py,
test_regimes.py): sizes, prompts, a tiny teacher and student, the offline store builder,
batch comparison and the exact-resume check."""

import functools
import json

import jax
import numpy as np

from thack_jax import models
from thack_jax.data import generation

N, C, LX, LY, B, V = 12, 2, 6, 5, 8, 32
SEED = 3


def make_prompts(n=N, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.integers(3, V, (n, LX)).astype(np.int32)
    p[:, -1] = 1  # EOS
    p[: n // 2, -2:] = [1, 0]  # some shorter prompts: EOS then pad
    return p


@functools.cache
def tiny_models():
    """(config, teacher params, student params) of a tiny T5 with vocabulary V."""
    config = models.get_config("tiny", vocab_size=V)
    init = jax.jit(models.init_params, static_argnums=0)  # eager init is slow on a busy CPU
    teacher, student = init(config, jax.random.key(0)), init(config, jax.random.key(1))
    return config, teacher, student


def build(directory, config, params, **kw):
    """The store of make_prompts() x C; `kw` overrides GenerationConfig fields or `progress`."""
    progress = kw.pop("progress", False)
    settings = dict(
        generating_model="teacher",
        completions_per_prompt=C,
        max_decode_len=LY,
        seed=SEED,
        vocab_fingerprint="test-vocab",
        chunk_size=5,
    )
    settings.update(kw)
    return generation.build_offline_store(
        str(directory),
        model=(config, params),
        prompts=make_prompts(),
        generation=generation.GenerationConfig(**settings),
        progress=progress,
    )


def build_store(tmp_path_factory):
    """The teacher's complete store of make_prompts() x C (for a module-scoped fixture)."""
    config, teacher, _ = tiny_models()
    return build(tmp_path_factory.mktemp("store") / "s", config, teacher)


def equal(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def resume_check(make, steps=4, cut=2, params=None):
    """Batch `cut` after load_state_dict equals the uninterrupted source's batch `cut`."""
    reference = make()
    want = [reference.next_batch(t, params) for t in range(steps)]
    first = make()
    for t in range(cut):
        first.next_batch(t, params)
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip
    second = make()
    second.load_state_dict(state)
    for t in range(cut, steps):
        equal(second.next_batch(t, params), want[t])
    return want
