"""Sampling throughput: `python launch/benchmark.py sampling [--size small] [--batch 1,32]`.

`--family t5` (default; sizes small, tiny) or a decoder-only family, `--family llama`
(sizes llama-tiny, smollm2-135m (default), llama-3.2-1b) or `qwen2`; the decoder-only
specifics (prompts, HF model, bytes read per step) are in `bench_sampling_decoder.py`.
Measures, in the same process and for the same shape, tokens per second of
  * ours: `thack_jax.decoding.sampling.sample` (jitted, KV cache, one while_loop; the
    decoder-only prompt is prefilled once);
  * naive: a jitted decode that recomputes the whole (padded) prefix with `models.logits`
    (T5: encoder included; decoder-only: prompt + response buffer) at every step; every
    step costs the same, so only `--naive_steps` steps are timed and the time is scaled to
    `--new_tokens` steps;
  * hf: Hugging Face `transformers` `generate()` in PyTorch on CPU, random weights,
    do_sample=True, top_k=0, temperature=1 (T5ForConditionalGeneration; LlamaForCausalLM /
    Qwen2ForCausalLM on left-padded prompts); the faster of torch.set_num_threads(cpu
    count) and (1) (see `best_over_threads`).

Every row produces exactly `--new_tokens` tokens in all three: ours with `eos_id=-1` (an id
that never occurs, so no row stops; the distribution is not changed), HF with
min_new_tokens = max_new_tokens (EOS masked until then), naive has no EOS check.
Each timing is the best of `--repeats` runs after one warm-up (compilation) run.
"""

from __future__ import annotations

import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from thack_jax import models  # noqa: E402
from thack_jax.cli import bench_sampling_decoder as decoder
from thack_jax.cli import common
from thack_jax.decoding import sampling
from thack_jax.decoding.settings import SamplingConfig

T5_SIZES = ["small", "tiny"]


FLAGS = flags.FlagValues()  # its own, so that other benchmarks' flags never collide
_F = dict(flag_values=FLAGS)
flags.DEFINE_enum(
    "family", "t5", ["t5", *decoder.DEFAULT_SIZES], "Model family: t5 or decoder-only.", **_F
)
flags.DEFINE_string(
    "size",
    None,
    "Model size; default the family's first. t5: small, tiny; "
    + "; ".join(
        f"{family}: {default}, " + ", ".join(s for s in decoder.sizes(family) if s != default)
        for family, default in decoder.DEFAULT_SIZES.items()
    )
    + ".",
    **_F,
)
flags.DEFINE_list("batch", ["1", "32"], "Comma-separated batch sizes, one table row each.", **_F)
flags.DEFINE_integer("prompt_len", 64, "Prompt (T5: encoder input) tokens per row.", **_F)
flags.DEFINE_integer("new_tokens", 64, "Tokens sampled per row.", **_F)
flags.DEFINE_integer("repeats", 3, "Timed runs after the warm-up; the best is reported.", **_F)
flags.DEFINE_integer("naive_steps", 4, "Timed naive steps (scaled to --new_tokens).", **_F)
flags.DEFINE_bool("skip_hf", False, "Skip the Hugging Face generate() baseline.", **_F)
flags.DEFINE_bool("skip_naive", False, "Skip the naive (recompute the prefix) decode.", **_F)
flags.DEFINE_bool("breakdown", False, "Time encoder / prefill vs the decode loop.", **_F)
flags.DEFINE_bool("gumbel", False, "Also time ours with draw='gumbel' (categorical).", **_F)
flags.DEFINE_bool(
    "ragged",
    False,
    "Decoder-only: prompt lengths vary in [prompt_len // 2, prompt_len] (padded).",
    **_F,
)


def parse_args(argv: list[str]) -> types.SimpleNamespace:
    """The flags of `argv` (argv[0] the program), with --batch as ints and --size resolved.

    Raises:
      flags.Error: an unknown flag, a bad value, or a size of another family.
    """
    common.parse_own_flags(FLAGS, argv)
    args = types.SimpleNamespace(**FLAGS.flag_values_dict())
    try:
        args.batch = [int(b) for b in args.batch]
    except ValueError:
        message = f"--batch={','.join(args.batch)}: expected comma-separated integers"
        raise flags.IllegalFlagValueError(message) from None
    sizes = T5_SIZES if args.family == "t5" else decoder.sizes(args.family)
    if args.size is None:
        args.size = T5_SIZES[0] if args.family == "t5" else decoder.DEFAULT_SIZES[args.family]
    if args.size not in sizes:
        raise flags.IllegalFlagValueError(
            f"--size={args.size!r} is not a {args.family} size; choose from {sizes}"
        )
    if args.ragged and args.family == "t5":
        raise flags.IllegalFlagValueError(
            "--ragged is for the decoder-only families (--family llama / qwen2)"
        )
    return args


def best_time(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls of fn() after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def time_ours(config, params, inputs, new_tokens: int, repeats: int, draw: str) -> float:
    keys = iter(range(10_000))

    def run():
        rng = jax.random.key(next(keys))
        settings = SamplingConfig(max_decode_len=new_tokens, draw=draw)
        return sampling.sample(config, params, inputs, rng, settings, eos_id=-1).tokens

    return best_time(run, repeats)


def time_breakdown(config, params, inputs, new_tokens: int, repeats: int) -> dict[str, float]:
    """Where the time of one `sample` call goes.

    prefill_s: a 1-token sample (T5: encoder + cross-attention K/V + one step; decoder-only:
    the prompt's prefill, whose last logits give the token); step_s: the mean in-loop decode
    step, (full - prefill) / (new_tokens - 1); draw_s: per step, what T=1 sampling costs over
    greedy (softmax, CDF, random numbers); step_gflops: the decoder's and output
    projection's matmul FLOPs per step over step_s.
    """
    one = time_ours(config, params, inputs, 1, repeats, "inverse_cdf")
    full = time_ours(config, params, inputs, new_tokens, repeats, "inverse_cdf")
    keys = iter(range(10_000))

    def greedy():
        rng = jax.random.key(next(keys))
        settings = SamplingConfig(max_decode_len=new_tokens, temperature=0.0)
        return sampling.sample(config, params, inputs, rng, settings, eos_id=-1).tokens

    argmax = best_time(greedy, repeats)
    if models.is_decoder_only(config):
        matmul_params = decoder.matmul_params(config)
    else:
        t5_decoder = models.param_shapes(config)["decoder"]
        matmul_params = sum(
            int(np.prod(x.shape)) for x in jax.tree.leaves(t5_decoder) if len(x.shape) == 2
        )
        if config.tie_word_embeddings:
            matmul_params += config.vocab_size * config.d_model
    step = (full - one) / max(new_tokens - 1, 1)
    return {
        "prefill_s": one,
        "step_s": step,
        "draw_s": (full - argmax) / new_tokens,
        "total_s": full,
        "step_gflops": 2 * inputs.shape[0] * matmul_params / step / 1e9,
    }


def time_naive(config, params, inputs, new_tokens: int, steps: int, repeats: int) -> float:
    """Seconds for new_tokens steps of full-prefix recomputation (steps timed, scaled)."""

    @jax.jit
    def run(params, inputs, rng):
        targets = jnp.zeros((inputs.shape[0], new_tokens), jnp.int32)

        def body(step, targets):
            logits = models.logits(config, params, inputs, targets)[:, step]
            token = jax.random.categorical(jax.random.fold_in(rng, step), logits)
            return targets.at[:, step].set(token.astype(jnp.int32))

        return jax.lax.fori_loop(0, steps, body, targets)

    seconds = best_time(lambda: run(params, inputs, jax.random.key(0)), repeats)
    return seconds * new_tokens / steps


def hf_config(config):
    import transformers

    return transformers.T5Config(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        feed_forward_proj="gated-gelu" if config.feed_forward == "gated-gelu" else "relu",
        tie_word_embeddings=config.tie_word_embeddings,
        dropout_rate=0.0,
        layer_norm_epsilon=config.layer_norm_epsilon,
        pad_token_id=config.pad_id,
        eos_token_id=config.eos_id,
        decoder_start_token_id=config.pad_id,
    )


def best_over_threads(run, repeats: int) -> tuple[float, int]:
    """Best seconds of run() (HF generate) over torch thread counts {cpu count, 1}, and
    that count.

    torch.set_num_threads(cpu count) is the fair setting on an idle machine; on a shared one
    its OpenMP barriers stall when a thread is descheduled (20x slower seen here), so the
    single-thread time is measured too and the faster one counts.
    """
    import torch

    results = []
    for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
        torch.set_num_threads(threads)
        results.append((best_time(run, repeats), threads))
    return min(results)


def time_hf(config, inputs: np.ndarray, new_tokens: int, repeats: int) -> tuple[float, int]:
    """Best seconds of HF generate (`best_over_threads`) on `inputs` [B, Lx] and that
    thread count; T5ForConditionalGeneration, or the decoder-only `decoder.hf_generate`."""
    if models.is_decoder_only(config):
        return best_over_threads(decoder.hf_generate(config, inputs, new_tokens), repeats)
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf_config(config)).eval()
    input_ids = torch.from_numpy(np.asarray(inputs, np.int64))
    kwargs = dict(attention_mask=torch.ones_like(input_ids), **decoder.generate_kwargs(new_tokens))

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids, **kwargs)
        assert out.shape[1] == new_tokens + 1, out.shape  # decoder start + new tokens
        return None

    return best_over_threads(run, repeats)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    config = models.get_config(args.size)
    params = models.init_params(config, jax.random.key(0))
    if models.is_decoder_only(config):
        shape = decoder.describe(config, args.size) + (", ragged prompts" if args.ragged else "")
    else:
        shape = (
            f"size={args.size} (d_model={config.d_model}, "
            f"layers={config.num_encoder_layers}+{config.num_decoder_layers}, "
            f"vocab={config.vocab_size})"
        )
    print(
        f"sampling benchmark: {shape}, prompt_len={args.prompt_len}, "
        f"new_tokens={args.new_tokens}, best of {args.repeats}, jax {jax.__version__} "
        f"on {jax.devices()[0].platform} x{jax.device_count()}, cpus={os.cpu_count()}"
    )
    header = (
        "| batch | ours tok/s | ours, gumbel draw tok/s | naive tok/s | HF generate tok/s "
        "| ours/naive | ours/HF |"
    )
    rows = [header, "|---:|---:|---:|---:|---:|---:|---:|"]
    for batch in args.batch:
        if models.is_decoder_only(config):
            inputs = decoder.prompts(config, batch, args.prompt_len, args.ragged)
        else:
            rng = np.random.RandomState(batch)
            inputs = rng.randint(2, config.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        tokens = batch * args.new_tokens
        x = jnp.asarray(inputs)
        ours_s = time_ours(config, params, x, args.new_tokens, args.repeats, "inverse_cdf")
        ours = tokens / ours_s
        naive = hf = gumbel = float("nan")
        if args.gumbel:
            gumbel = tokens / time_ours(config, params, x, args.new_tokens, args.repeats, "gumbel")
        if not args.skip_naive:
            seconds = time_naive(config, params, x, args.new_tokens, args.naive_steps, 1)
            naive = tokens / seconds
        if not args.skip_hf:
            seconds, threads = time_hf(config, inputs, args.new_tokens, args.repeats)
            hf = tokens / seconds
            print(f"  batch {batch}: HF best with torch.set_num_threads({threads})", flush=True)
        rows.append(
            f"| {batch} | {ours:.1f} | {gumbel:.1f} | {naive:.1f} | {hf:.1f} "
            f"| {ours / naive:.1f}x | {ours / hf:.2f}x |"
        )
        print(rows[-1], flush=True)
        step_read = None
        if models.is_decoder_only(config):
            weights, kv = decoder.step_bytes(config, batch, args.prompt_len, args.new_tokens)
            step_read = weights + kv
            # The call's mean rate: prefill included, so a lower bound of the loop step's.
            rate = step_read * max(args.new_tokens - 1, 1) / ours_s / 1e9
            print(
                f"  batch {batch}: a decode step reads {weights / 1e6:.1f} MB of weights + "
                f"{kv / 1e6:.1f} MB of K/V cache buffer; ours over the whole call "
                f"{rate:.1f} GB/s (prefill included)",
                flush=True,
            )
        if args.breakdown:
            parts = time_breakdown(config, params, x, args.new_tokens, args.repeats)
            first = "prefill" if step_read is not None else "encoder + cross K/V + 1 step"
            loop_rate = (
                "" if step_read is None else f", {step_read / parts['step_s'] / 1e9:.1f} GB/s"
            )
            print(
                f"  batch {batch}: 1-token sample ({first}) "
                f"{parts['prefill_s'] * 1e3:.1f} ms; mean decode step in the loop "
                f"{parts['step_s'] * 1e3:.2f} ms ({parts['step_gflops']:.1f} GFLOP/s of "
                f"matmuls{loop_rate}), of which the T=1 draw {parts['draw_s'] * 1e3:.2f} ms; "
                f"{args.new_tokens}-token sample {parts['total_s']:.3f} s",
                flush=True,
            )
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    from thack_jax.cli import benchmark

    sys.exit(benchmark.main([sys.argv[0], "sampling", *sys.argv[1:]]))
