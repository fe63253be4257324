"""The machine's limits for `benchmark.py table`: memory read bandwidth, the f32 matmul
peak, the decode step's memory roofline, and the machine / load lines printed around it."""

from __future__ import annotations

import os
import platform
import subprocess

import jax
import jax.numpy as jnp

from thack_jax.cli import bench_sampling, bench_train_step


def memory_bandwidth(mib: int, repeats: int) -> float:
    """Read bandwidth in bytes/s: best of `repeats` calls (after a warm-up) of a jitted
    `x.sum()` over `mib` MiB of float32, the pattern of a decode step (stream every byte
    once, little arithmetic)."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = bench_sampling.best_time(lambda: total(x), repeats)
    return x.size * 4 / seconds


def matmul_peak(size: int, repeats: int) -> float:
    """f32 FLOP/s of the train-step benchmark's [size, size] x [size, size] `jnp.dot`,
    best of `repeats` (after a warm-up)."""
    run, flops = bench_train_step.matmul_runner(size)
    return flops / bench_sampling.best_time(run, repeats)


def layer_kernel_shapes(config) -> list[tuple[int, int]]:
    """The [in, out] kernels a T5 decode step multiplies its rows by, decoder layer after
    layer: self-attention q, k, v, o, cross-attention q, o, then the MLP (wi_0, wi_1, wo for
    gated-gelu, else wi, wo). The cross-attention k, v run once, before the loop."""
    d, inner, f = config.d_model, config.inner_dim, config.d_ff
    mlp = [(d, f)] * (2 if config.feed_forward == "gated-gelu" else 1) + [(f, d)]
    layer = [(d, inner)] * 3 + [(inner, d), (d, inner), (inner, d)] + mlp
    return layer * config.num_decoder_layers


def gemv_chain_bandwidth(config, repeats: int) -> float:
    """Read bandwidth in bytes/s of the decode step's matmuls alone at batch 1: one jitted
    chain of `[1, in] x [in, out]` products over `layer_kernel_shapes` (float32; each
    product's input is the previous output, resized, so they run one after another as in
    the step), best of `repeats`. Against `memory_bandwidth` it shows what the backend
    reaches on the decoder's many small kernels: the ceiling of a batch-1 decode."""
    kernels = [jnp.full(s, 1e-3, jnp.float32) for s in layer_kernel_shapes(config)]

    def chain(x, kernels):
        for k in kernels:
            x = jnp.tanh(jnp.resize(x, (1, k.shape[0])) @ k)
        return x

    run = jax.jit(chain)
    x = jnp.ones((1, config.d_model), jnp.float32)
    seconds = bench_sampling.best_time(lambda: run(x, kernels), repeats)
    return sum(k.size * 4 for k in kernels) / seconds


def decode_step_bytes(config, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes a T5 decode step must read at least (the memory roofline's numerator):

        weights = L * (6 * D * I + n_mlp * D * F + 3 * D) + D + H * buckets + V * D
        cache   = L * 2 * B * I * (new_tokens + 1) / 2     (self-attention K and V)
        cross   = L * 2 * B * I * prompt_len               (cross-attention K and V)
        bytes   = weights * param bytes + (cache + cross) * activation bytes

    L decoder layers, D d_model, I = H * d_kv the attention width, F d_ff, n_mlp = 3 for
    gated-gelu (wi_0, wi_1, wo) else 2, V the vocabulary, B the batch. Per layer the step
    reads the self-attention q, k, v, o and the cross-attention q, o kernels (6 D x I; the
    cross-attention k, v kernels are applied once, before the loop), the MLP and three
    RMSNorm scales; then the final norm, the relative-position table and the output
    projection (tied or not, V x D). The self-attention cache is counted at its mean
    length over the `new_tokens` steps (step t attends to t + 1 keys); the token
    embedding rows (B x D) are left out.
    """
    d, inner, v = config.d_model, config.inner_dim, config.vocab_size
    layers = config.num_decoder_layers
    weights = sum(i * o for i, o in layer_kernel_shapes(config)) + layers * 3 * d
    weights += d + config.num_heads * config.relative_attention_num_buckets + v * d
    cache = layers * 2 * batch * inner * (new_tokens + 1) / 2
    cross = layers * 2 * batch * inner * prompt_len
    param_bytes = jnp.dtype(config.param_dtype).itemsize
    act_bytes = jnp.dtype(config.dtype).itemsize
    return float(weights * param_bytes + (cache + cross) * act_bytes)


def machine_lines() -> list[str]:
    """`lscpu` model name and core counts, and the jax / torch / transformers versions."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        keep = ("Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket")
        lines = [" ".join(x.split()) for x in out.splitlines() if x.startswith(keep)]
    except (OSError, subprocess.CalledProcessError):
        lines = [f"processor: {platform.processor() or platform.machine()}"]
    versions = [f"jax {jax.__version__} ({jax.devices()[0].platform} x{jax.device_count()})"]
    for name in ("torch", "transformers"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} not installed")
    return [*lines, f"os.cpu_count() {os.cpu_count()}; " + ", ".join(versions)]


def load_line(when: str, max_load: float, own_threads: int = 0) -> list[str]:
    """The load average line, and a WARNING when the 1-minute load exceeds `max_load` plus
    `own_threads`: at the end of a run the load includes the benchmark's own busy threads
    (about one per core), which say nothing about other jobs."""
    load = os.getloadavg()
    lines = [f"load average {when}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"]
    if own_threads:
        lines[0] += f" (includes this benchmark's own ~{own_threads} busy threads)"
    limit = max_load + own_threads
    if load[0] > limit:
        lines.append(
            f"WARNING: the 1-minute load {load[0]:.2f} exceeds {limit:g} (--max_load={max_load}"
            f" + {own_threads} own threads): the box is not quiet and these ratios are not "
            "publishable"
        )
    return lines
