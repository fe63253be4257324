"""The decoder-only (Llama / Qwen2) specifics of the sampling benchmark (`bench_sampling.py
--family llama`): the sizes, the prompts, the Hugging Face baseline and the bytes a decode
step reads.

Prompts: ours takes right-padded prompts [B, Lx] (pad 0); HF's batch `generate` for a
decoder-only model needs them left-padded, so `left_pad` moves each row's tokens to the
right end: both see the same tokens per row and the same width Lx. Without `--ragged` every
row is Lx tokens long and the two layouts are the same array.

The memory roofline: a decode step of B rows reads every weight once (the embedding table
only for B rows unless it is tied to the output projection, which reads all of it) and the
whole K/V cache buffer [B, K, Lx + N, Dh] per layer (attention masks, but does not skip, the
unwritten slots). `step_bytes` gives both, so a step time reads as GB/s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from thack_jax import models
from thack_jax.models import decoder_config, hf_decoder_config

DEFAULT_SIZES = {"llama": "smollm2-135m", "qwen2": "qwen2.5-0.5b"}


def sizes(family: str) -> list[str]:
    """The DECODER_CONFIGS names of `family` ('llama' or 'qwen2'), sorted."""
    return sorted(
        name
        for name, fields in decoder_config.DECODER_CONFIGS.items()
        if fields.get("family", "llama") == family
    )


def describe(config, size: str) -> str:
    """The shape part of the benchmark's first line, e.g. `size=smollm2-135m (d_model=576,
    layers=30, heads=9/3 kv, vocab=49152, 134.5M params = 538.1 MB float32)`."""
    total = models.count_params(config)
    return (
        f"size={size} (d_model={config.d_model}, layers={config.num_layers}, "
        f"heads={config.num_heads}/{config.num_kv_heads} kv, vocab={config.vocab_size}, "
        f"{total / 1e6:.1f}M params = {param_bytes(config) / 1e6:.1f} MB {config.param_dtype})"
    )


def prompts(config, batch: int, prompt_len: int, ragged: bool) -> np.ndarray:
    """Random right-padded prompts [batch, prompt_len] int32 (tokens in [2, vocab)).

    ragged: row lengths uniform in [max(1, prompt_len // 2), prompt_len], row 0 full (so
    the width is used); else every row is full, as the T5 benchmark's prompts.
    """
    rng = np.random.RandomState(batch)
    inputs = rng.randint(2, config.vocab_size, (batch, prompt_len)).astype(np.int32)
    if ragged:
        lengths = rng.randint(max(1, prompt_len // 2), prompt_len + 1, batch)
        lengths[0] = prompt_len
        inputs[np.arange(prompt_len)[None, :] >= lengths[:, None]] = 0
    return inputs


def left_pad(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompts [B, L] (pad 0) -> (left-padded ids [B, L], attention mask
    [B, L]), each row's tokens in the same order. A prompt token is never 0 (`prompts`)."""
    mask = inputs != 0
    lengths = mask.sum(axis=1)
    width = inputs.shape[1]
    # Row b's token j (j < len_b) goes to column width - len_b + j.
    columns = np.arange(width)[None, :] - (width - lengths[:, None])
    gathered = np.take_along_axis(inputs, np.clip(columns, 0, width - 1), axis=1)
    keep = columns >= 0
    return np.where(keep, gathered, 0), keep.astype(np.int64)


def param_bytes(config) -> int:
    """Bytes of all parameters as stored (param_dtype)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(models.param_shapes(config))))


def step_bytes(config, batch: int, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """(weight bytes, K/V cache buffer bytes) one decode step of `batch` rows reads, for a
    cache of prompt_len + new_tokens slots (shapes only: nothing is allocated or run)."""
    shapes = models.param_shapes(config)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    if not config.tie_word_embeddings:  # An untied table is only looked up, B rows a step.
        table = shapes["embed"]["embedding"]
        weights -= (table.shape[0] - batch) * table.shape[1] * table.dtype.itemsize
    inputs = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)

    def cache(params, inputs):
        encoded = models.encode(config, params, inputs)
        return models.init_cache(config, params, encoded, inputs, new_tokens)

    out = jax.eval_shape(cache, shapes, inputs)
    kv = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((out["k"], out["v"])))
    return int(weights), int(kv)


def matmul_params(config) -> int:
    """Parameters a decode step multiplies by (every kernel, plus the embedding table when
    it is tied to the output projection; an untied table is a lookup)."""
    shapes = models.param_shapes(config)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes) if len(x.shape) >= 2)
    if not config.tie_word_embeddings:
        total -= int(np.prod(shapes["embed"]["embedding"].shape))
    return total


def generate_kwargs(new_tokens: int) -> dict:
    """transformers' `generate` arguments of every baseline: plain sampling at T=1 (no
    top-k / top-p), exactly `new_tokens` tokens per row (EOS masked until then)."""
    return dict(
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        min_new_tokens=new_tokens,
        max_new_tokens=new_tokens,
    )


def hf_generate(config, inputs: np.ndarray, new_tokens: int):
    """A no-argument function running transformers' `generate` once on `inputs` (right-padded
    [B, Lx], sent left-padded), sampling at T=1 without truncation, exactly `new_tokens` new
    tokens per row, float32 random weights of `config`'s shape (LlamaForCausalLM or
    Qwen2ForCausalLM from `hf_decoder_config.config_to_hf`)."""
    import torch
    import transformers

    hf = hf_decoder_config.config_to_hf(config, dtype="float32")
    cls = getattr(transformers, hf["architectures"][0])
    torch.manual_seed(0)
    model = cls(cls.config_class(**hf)).eval()
    ids, mask = left_pad(inputs)
    input_ids = torch.from_numpy(ids.astype(np.int64))
    kwargs = dict(attention_mask=torch.from_numpy(mask), **generate_kwargs(new_tokens))

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids, **kwargs)
        assert out.shape == (inputs.shape[0], inputs.shape[1] + new_tokens), out.shape
        return None

    return run
