"""Benchmark of one distillation train step: tokens/s and model FLOPs utilisation (MFU).

    python launch/benchmark.py train_step [--sizes=tiny,small] [--repeats=5] [--steps=3]
        [--batch=32] [--input_len=64] [--target_len=64] [--no_torch] [--profile]

One step = frozen teacher forward + student forward/backward of the token-level forward KL
+ AdamW update; teacher and student have the same size (T5 v1.1 `tiny` / `small` widths).
tokens/s counts input + target tokens (batch * (input_len + target_len)) per second.

MFU = model FLOPs per step / step time / matmul peak. The model FLOPs count the matmuls
only (teacher forward once, student forward + backward = 3x forward); the peak is the f32
FLOP/s of a large `jnp.dot` measured in the same run. Two MFUs are given: by wall clock,
and by CPU time of this process (FLOPs per CPU-second of the step over those of the
matmul), which stays meaningful when other processes share the cores.

The reference is the same step in PyTorch + HF `transformers` (teacher under no_grad,
AdamW) at each of `--torch_threads` intra-op thread counts; the fastest is the reference
(with 2 threads on a busy 2-core machine PyTorch's OpenMP barriers can cost 50x). The
matmul peak, the JAX step and the PyTorch steps are timed in interleaved rounds (`repeats`
of them, `steps` consecutive steps each) and each figure is its best round.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import time
import types

import numpy as np
from absl import flags

from thack_jax.cli import common

FLAGS = flags.FlagValues()  # its own, so that other benchmarks' flags never collide
_F = dict(flag_values=FLAGS)
flags.DEFINE_list("sizes", ["tiny", "small"], "T5 v1.1 sizes, teacher = student size.", **_F)
flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds; each figure is its best.", **_F)
flags.DEFINE_integer("steps", 3, "Consecutive steps per round.", **_F)
flags.DEFINE_integer("batch", 32, "Sequences per step.", **_F)
flags.DEFINE_integer("input_len", 64, "Input (encoder) tokens per sequence.", **_F)
flags.DEFINE_integer("target_len", 64, "Target (decoder) tokens per sequence.", **_F)
flags.DEFINE_integer("matmul_size", 2048, "Side of the f32 jnp.dot timed as the peak.", **_F)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Model dtype.", **_F)
flags.DEFINE_bool("no_torch", False, "Skip the PyTorch reference.", **_F)
flags.DEFINE_list(
    "torch_threads",
    ["1", "2"],
    "PyTorch intra-op thread counts to time; the best is the reference.",
    **_F,
)
flags.DEFINE_bool("profile", False, "Time the parts of the JAX step.", **_F)


def parse_args(argv: list[str]) -> types.SimpleNamespace:
    """The flags of `argv` (argv[0] the program; `--no-torch` reads as `--no_torch`), with
    --torch_threads as ints.

    Raises:
      flags.Error: an unknown flag or a bad value.
    """
    common.parse_own_flags(FLAGS, [argv[0], *(a.replace("--no-", "--no_") for a in argv[1:])])
    args = types.SimpleNamespace(**FLAGS.flag_values_dict())
    try:
        args.torch_threads = [int(t) for t in args.torch_threads]
    except ValueError:
        message = f"--torch_threads={','.join(args.torch_threads)}: expected integers"
        raise flags.IllegalFlagValueError(message) from None
    return args


def _best(fn, repeats: int, steps: int) -> float:
    """Best wall-clock seconds per call over `repeats` timings of `steps` consecutive calls."""
    return _timed(fn, repeats, steps)[0]


def _timed(fn, repeats: int, steps: int) -> tuple[float, float]:
    """(best wall-clock seconds, best process CPU seconds) per call over `repeats` timings
    of `steps` consecutive calls. CPU time counts every thread of this process, so on a
    shared machine it does not grow when other processes take the cores."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            fn()
        wall = min(wall, (time.perf_counter() - w0) / steps)
        cpu = min(cpu, (time.process_time() - c0) / steps)
    return wall, cpu


def matmul_runner(size: int):
    """A function running one [size, size] x [size, size] f32 jnp.dot; and its FLOPs."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return (lambda: dot(a, b).block_until_ready()), 2.0 * size**3


def forward_flops(cfg, batch: int, lx: int, ly: int) -> float:
    """Matmul FLOPs of one teacher-forced forward pass (this package's T5 network: the
    cross-attention keys/values are projected in every decoder layer)."""
    d, inner, f, v = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.vocab_size
    n_in = 3 if cfg.feed_forward == "gated-gelu" else 2  # wi_0, wi_1 (or wi) and wo
    mlp = 2 * d * f * n_in
    enc = cfg.num_encoder_layers * lx * (4 * 2 * d * inner + 2 * 2 * lx * inner + mlp)
    dec_self = 4 * 2 * d * inner + 2 * 2 * ly * inner
    dec_cross = ly * (2 * 2 * d * inner + 2 * 2 * lx * inner) + lx * 2 * 2 * d * inner
    dec = cfg.num_decoder_layers * (ly * (dec_self + mlp) + dec_cross)
    return float(batch * (enc + dec + ly * 2 * d * v))


def random_batch(cfg, batch, lx, ly, seed=0):
    """Random (inputs [batch, lx], targets [batch, ly]) int32 token ids, targets ending in EOS."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, cfg.vocab_size, (batch, lx)).astype(np.int32)
    targets = rng.integers(3, cfg.vocab_size, (batch, ly)).astype(np.int32)
    targets[:, -1] = cfg.eos_id
    return inputs, targets


def jax_runner(cfg, args, profile: bool):
    """(run one JAX train step, info dict with compile time, XLA FLOPs, profile parts)."""
    import jax
    import jax.numpy as jnp

    from thack_jax import models
    from thack_jax.training import losses, optim, train_state, train_step

    student = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(0))
    teacher = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(1))
    opt = optim.make_optimizer(optim.OptimizerConfig("adamw", 1e-4))
    state = jax.jit(lambda p: train_state.create_train_state(p, opt, jax.random.key(0)))(student)
    inputs, targets = random_batch(cfg, args.batch, args.input_len, args.target_len)
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
    step = train_step.make_train_step(cfg, opt, train_step.StepConfig("distill", "forward_kl"), cfg)
    start = time.perf_counter()
    compiled = step.lower(state, batch, teacher).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, teacher)
        metrics["train/loss"].block_until_ready()

    run()
    result = {"compile_s": compile_s}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result["xla_flops"] = float(cost.get("flops", float("nan"))) if cost else float("nan")
    if profile:
        params = holder["state"].params
        mask = batch["targets"] != 0
        fwd = jax.jit(lambda p, x, y: models.logits(cfg, p, x, y))
        t_logits = fwd(teacher, batch["inputs"], batch["targets"])

        def student_loss(p, x, y, t, m):
            s, n = losses.forward_kl(jax.nn.log_softmax(t), models.logits(cfg, p, x, y), m)
            return s / n

        loss_only = jax.jit(lambda t, s, m: losses.forward_kl(jax.nn.log_softmax(t), s, m))
        grad = jax.jit(jax.grad(student_loss))
        xy = (batch["inputs"], batch["targets"])
        grads = grad(params, *xy, t_logits, mask)
        update = jax.jit(lambda g, s, p: opt.update(g, s, p))
        parts = {
            "teacher forward": lambda: fwd(teacher, *xy).block_until_ready(),
            "KL loss alone (fwd)": lambda: loss_only(t_logits, t_logits, mask)[
                0
            ].block_until_ready(),
            "student forward+backward+KL": lambda: jax.block_until_ready(
                grad(params, *xy, t_logits, mask)
            ),
            "AdamW update": lambda: jax.block_until_ready(
                update(grads, holder["state"].opt_state, params)
            ),
        }
        for fn in parts.values():
            fn()
        result["profile"] = {k: _best(fn, args.repeats, 1) for k, fn in parts.items()}
    return run, result


def _hf_config(cfg):
    from transformers import T5Config as HFConfig

    return HFConfig(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_encoder_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        feed_forward_proj=cfg.feed_forward,
        tie_word_embeddings=cfg.tie_word_embeddings,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def torch_runner(cfg, args):
    """A function running one PyTorch train step with a given number of intra-op threads."""
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    student = T5ForConditionalGeneration(_hf_config(cfg)).train()
    teacher = T5ForConditionalGeneration(_hf_config(cfg)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
    inputs, targets = random_batch(cfg, args.batch, args.input_len, args.target_len)
    inputs, labels = torch.from_numpy(inputs).long(), torch.from_numpy(targets).long()
    mask = (labels != 0).float()
    attention = (inputs != 0).long()
    # Decoder inputs, not labels: with labels HF would also compute a cross-entropy loss.
    decoder_inputs = student._shift_right(labels)

    def run(threads: int):
        torch.set_num_threads(threads)
        with torch.no_grad():
            t_logits = teacher(
                input_ids=inputs, attention_mask=attention, decoder_input_ids=decoder_inputs
            ).logits
            t_logprobs = torch.log_softmax(t_logits.float(), dim=-1)
        s_logits = student(
            input_ids=inputs, attention_mask=attention, decoder_input_ids=decoder_inputs
        ).logits
        s_logprobs = torch.log_softmax(s_logits.float(), dim=-1)
        kl = (t_logprobs.exp() * (t_logprobs - s_logprobs)).sum(-1)
        loss = (kl * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    run(1)
    return run


def _lscpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        keep = ("Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket", "Flags")
        lines = [x for x in out.splitlines() if x.startswith(keep)]
        return "\n".join(x if not x.startswith("Flags") else x[:60] + " ..." for x in lines)
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import jax

    from thack_jax import models

    print(f"machine: {platform.platform()}; jax {jax.__version__} on {jax.devices()[0]}")
    print(_lscpu())
    print(f"load average before: {os.getloadavg()}")
    peak_run, peak_flops = matmul_runner(args.matmul_size)
    tokens = args.batch * (args.input_len + args.target_len)
    header = (
        "| size | framework | step (s) | tokens/s | model GFLOP/step | MFU (wall) "
        "| MFU (CPU time) | speed-up vs best PyTorch (wall / CPU time) |"
    )
    rows = [header, "|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        cfg = models.get_config(size, dtype=args.dtype)
        flops = 4 * forward_flops(cfg, args.batch, args.input_len, args.target_len)
        jax_run, info = jax_runner(cfg, args, args.profile)
        torch_run = None if args.no_torch else torch_runner(cfg, args)
        runners = {"peak": None, "jax": jax_run}
        if torch_run is not None:
            for t in args.torch_threads:
                runners[f"PyTorch {t} thread(s)"] = functools.partial(torch_run, t)
        # Rounds interleave the matmul peak, the JAX step and the PyTorch steps, and each
        # figure is its best round. Wall clock: the peak is timed over as many dots as fit
        # in one JAX step, so that both see the same share of a busy machine. CPU time:
        # FLOPs per CPU-second of this process, which sharing the cores does not change.
        wall = dict.fromkeys(runners, float("inf"))
        cpu = dict(wall)
        dots = 1
        for _ in range(args.repeats):
            for name, fn in runners.items():
                w, c = _timed(peak_run, 1, dots) if name == "peak" else _timed(fn, 1, args.steps)
                wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
            dots = max(1, min(200, round(wall["jax"] * args.steps / wall["peak"])))
        peak, peak_cpu = peak_flops / wall["peak"], peak_flops / cpu["peak"]
        torch_names = [k for k in runners if k.startswith("PyTorch")]
        # The reference is PyTorch at its best thread count (by each clock separately).
        ref_wall = min((wall[k] for k in torch_names), default=None)
        ref_cpu = min((cpu[k] for k in torch_names), default=None)
        for name in ["jax", *torch_names]:
            label = "JAX (thack_jax)" if name == "jax" else name
            speedup = "-"
            if ref_wall is not None:
                speedup = f"{ref_wall / wall[name]:.2f}x / {ref_cpu / cpu[name]:.2f}x"
            rows.append(
                f"| {size} | {label} | {wall[name]:.4f} | {tokens / wall[name]:,.0f} "
                f"| {flops / 1e9:.1f} | {flops / wall[name] / peak:.1%} "
                f"| {flops / cpu[name] / peak_cpu:.1%} | {speedup} |"
            )
        print(
            f"{size}: compile {info['compile_s']:.1f} s; XLA-counted FLOPs/step "
            f"{info['xla_flops'] / 1e9:.1f} G (model count {flops / 1e9:.1f} G); matmul peak "
            f"(f32 {args.matmul_size}^3 jnp.dot, best round of {dots}) {peak / 1e9:.1f} "
            f"GFLOP/s wall, {peak_cpu / 1e9:.1f} GFLOP per CPU-second"
        )
        for part, seconds in info.get("profile", {}).items():
            print(f"  {size} {part}: {seconds:.4f} s")
        del jax_run, torch_run, runners
    print(f"load average after: {os.getloadavg()}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    from thack_jax.cli import benchmark

    sys.exit(benchmark.main([sys.argv[0], "train_step", *sys.argv[1:]]))
