"""Every speed figure against its baseline or limit, in one table measured in one run.

    python launch/benchmark.py table [--size=small] [--repeats=3] [--decode_batch=1,32]
        [--batch=32] [--input_len=64] [--target_len=64] [--new_tokens=64]
        [--eval_prompts=32] [--skip_torch] [--skip_hf]

Rows (teacher and student of one T5 v1.1 size, random weights), each with its unit:
  * machine limits: memory read bandwidth (a jitted `x.sum()` over --bandwidth_mib MiB of
    float32) and the f32 matmul peak (the train-step benchmark's `jnp.dot`); then the
    bandwidth the decoder layers' kernels reach as one chain of batch-1 products
    (`bench_limits.gemv_chain_bandwidth`), the ceiling of a batch-1 decode on this backend;
  * sampler at each --decode_batch (--input_len prompt tokens, --new_tokens sampled):
    tokens/s of ours against HF `generate` (as `benchmark.py sampling` times them), and
    against the memory roofline: the measured bandwidth over the bytes a decode step reads
    (`bench_limits.decode_step_bytes`) times the batch; ours is the whole `sample` call,
    encoder included, so its fraction of the roofline is a lower bound;
  * train step (--batch x (--input_len + --target_len) tokens): ours against the PyTorch +
    transformers step at its best of 1 and 2 threads, and ours' model FLOP/s against the
    matmul peak (`benchmark.py train_step`'s step and FLOP count);
  * online steps: what `trainer.train` does per update (the source's `next_batch` with the
    current params, the batch put on the mesh, the jitted step, the metrics read one update
    late) for an online-teacher source (its sampler's log-probs replace the teacher
    forward) and an online-student source (sampler + teacher forward), against the same
    loop over fixed host arrays (the offline step);
  * the evaluator: seconds per checkpoint (`Evaluator.evaluate`, --eval_prompts x 2
    samples, inputs --input_len, outputs --new_tokens) against one offline step, split
    into drawing the student's samples and scoring (every model on every sample set; the
    oracle's and teacher's samples are drawn once, in the setup, also shown);
Times are the best of --repeats after a warm-up (compilation) run; the loop steps are timed
over 2 consecutive updates. The machine, versions and load average are printed before and
after; a 1-minute load above --max_load at the start (--max_load plus one per core at the
end, where the benchmark's own threads count) prints a WARNING (the ratios are then not
publishable). Progress goes to stderr.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from thack_jax import models
from thack_jax.cli import bench_evaluation, bench_limits, bench_sampling, bench_train_step, common

FLAGS = flags.FlagValues()  # its own, so that other benchmarks' flags never collide
_F = dict(flag_values=FLAGS)
flags.DEFINE_enum("size", "small", ["tiny", "small"], "T5 v1.1 size of teacher and student.", **_F)
flags.DEFINE_integer("repeats", 3, "Timed runs after the warm-up; the best is reported.", **_F)
flags.DEFINE_list("decode_batch", ["1", "32"], "Sampler batch sizes, two rows each.", **_F)
flags.DEFINE_integer("batch", 32, "Sequences per train step.", **_F)
flags.DEFINE_integer("input_len", 64, "Input (prompt) tokens per sequence.", **_F)
flags.DEFINE_integer("target_len", 64, "Target tokens per train-step sequence.", **_F)
flags.DEFINE_integer("new_tokens", 64, "Tokens sampled per row (sampler, evaluator).", **_F)
flags.DEFINE_integer("eval_prompts", 32, "Evaluator prompts (2 samples each).", **_F)
flags.DEFINE_integer("bandwidth_mib", 1024, "MiB of float32 summed for the bandwidth.", **_F)
flags.DEFINE_integer("matmul_size", 2048, "Side of the f32 jnp.dot timed as the peak.", **_F)
flags.DEFINE_float("max_load", 0.5, "1-minute load above which a WARNING is printed.", **_F)
flags.DEFINE_bool("skip_torch", False, "Skip the PyTorch train-step baseline.", **_F)
flags.DEFINE_bool("skip_hf", False, "Skip the HF generate() baseline.", **_F)

TORCH_THREADS = (1, 2)
LOOP_STEPS = 2  # consecutive updates per timing, so that the one-late metrics read overlaps
HEADER = ["| figure | ours | baseline / limit | ratio |", "|---|---:|---:|---:|"]


def parse_args(argv: list[str]) -> types.SimpleNamespace:
    """The flags of `argv` (argv[0] the program), with --decode_batch as ints.

    Raises:
      flags.Error: an unknown flag or a bad value.
    """
    common.parse_own_flags(FLAGS, argv)
    args = types.SimpleNamespace(**FLAGS.flag_values_dict())
    try:
        args.decode_batch = [int(b) for b in args.decode_batch]
    except ValueError:
        message = f"--decode_batch={','.join(args.decode_batch)}: expected integers"
        raise flags.IllegalFlagValueError(message) from None
    for name in ("repeats", "batch", "input_len", "target_len", "new_tokens", "eval_prompts"):
        if getattr(args, name) < 1:
            raise flags.IllegalFlagValueError(f"--{name}={getattr(args, name)}: must be >= 1")
    if not args.decode_batch or min(args.decode_batch) < 1:
        raise flags.IllegalFlagValueError("--decode_batch: expected integers >= 1")
    return args


def progress(message: str) -> None:
    print(f"{message} ...", file=sys.stderr, flush=True)


def row(figure: str, ours: float, reference: float | None, kind: str = "x") -> str:
    """One table line; the ratio is ours / reference, as 'x' (a speed-up or cost) or '%'
    (a fraction of a limit); reference None: not measured (skipped)."""
    if reference is None:
        return f"| {figure} | {ours:.4g} | skipped | - |"
    ratio = ours / reference
    shown = f"{ratio:.1%}" if kind == "%" else f"{ratio:.2f}x"
    return f"| {figure} | {ours:.4g} | {reference:.4g} | {shown} |"


def sampler_rows(args, config, bandwidth: float) -> list[str]:
    """Two rows per decode batch: ours vs HF generate, ours vs the memory roofline."""
    params = models.init_params(config, jax.random.key(0))
    rows = []
    for batch in args.decode_batch:
        progress(f"measuring sampler batch {batch}")
        rng = np.random.RandomState(batch)
        inputs = rng.randint(2, config.vocab_size, (batch, args.input_len)).astype(np.int32)
        seconds = bench_sampling.time_ours(
            config, params, jnp.asarray(inputs), args.new_tokens, args.repeats, "inverse_cdf"
        )
        ours = batch * args.new_tokens / seconds
        hf, label = None, "HF generate"
        if not args.skip_hf:
            progress(f"measuring HF generate batch {batch}")
            hf_s, threads = bench_sampling.time_hf(config, inputs, args.new_tokens, args.repeats)
            hf, label = batch * args.new_tokens / hf_s, f"HF generate (torch threads {threads})"
        step = bench_limits.decode_step_bytes(config, batch, args.input_len, args.new_tokens)
        limit = bandwidth / step * batch
        rows.append(row(f"sampler batch {batch}, tokens/s: ours vs {label}", ours, hf))
        rows.append(
            row(
                f"sampler batch {batch}, tokens/s: ours vs memory roofline "
                f"({step / 1e6:.2f} MB read per step)",
                ours,
                limit,
                "%",
            )
        )
    return rows


def train_rows(args, config, peak: float) -> list[str]:
    """The train-step benchmark's step: vs PyTorch (tokens/s), vs the matmul peak."""
    progress("measuring train step (ours)")
    run, _ = bench_train_step.jax_runner(config, args, False)
    ours_s = bench_sampling.best_time(run, args.repeats)
    del run
    tokens = args.batch * (args.input_len + args.target_len)
    torch_tps, label = None, "PyTorch + transformers"
    if not args.skip_torch:
        progress("measuring train step (PyTorch)")
        torch_run = bench_train_step.torch_runner(config, args)

        def step(threads: int) -> None:  # no torch tensor for best_time to wait on
            torch_run(threads)

        timed = [
            (bench_sampling.best_time(functools.partial(step, t), args.repeats), t)
            for t in TORCH_THREADS
        ]
        torch_s, threads = min(timed)
        torch_tps, label = tokens / torch_s, f"PyTorch + transformers (torch threads {threads})"
        del torch_run
    flops = 4 * bench_train_step.forward_flops(config, args.batch, args.input_len, args.target_len)
    return [
        row(f"train step, tokens/s: ours vs {label}", tokens / ours_s, torch_tps),
        row(
            "train step, model GFLOP/s: ours vs f32 matmul peak",
            flops / ours_s / 1e9,
            peak / 1e9,
            "%",
        ),
    ]


def _mesh(batch: int):
    """The trainer's data-parallel mesh over every device, or over the first one when the
    batch does not divide over them (e.g. a small test batch on 8 virtual devices)."""
    from thack_jax.parallel import partitioning

    devices = jax.devices() if batch % jax.device_count() == 0 else jax.devices()[:1]
    return partitioning.make_mesh(partitioning.data_parallel_mesh_shape(), devices=devices)


class TrainerLoop:
    """`trainer.train`'s per-update work on a mesh, without checkpoints, logs or evaluations:
    batch = place(source.next_batch(step, current params)); state = step(state, batch,
    teacher); the metrics of update t are read (to host floats) after update t + 1 is
    dispatched. The state and teacher are placed as the trainer places them."""

    def __init__(self, config, args):
        from thack_jax.training import optim, train_state, train_step, trainer

        self.mesh, self.trainer = _mesh(args.batch), trainer
        opt = optim.make_optimizer(optim.OptimizerConfig("adamw", 1e-4))
        step_config = train_step.StepConfig("distill", "forward_kl")
        self.step_fn = train_step.make_train_step(config, opt, step_config, config, self.mesh)
        init = jax.jit(models.init_params, static_argnums=0)
        self.teacher = (config, init(config, jax.random.key(1)))
        shardings = train_state.state_shardings(self.mesh, config, opt)
        self.state = jax.jit(
            lambda p: train_state.create_train_state(p, opt, jax.random.key(0)),
            out_shardings=shardings,
        )(init(config, jax.random.key(0)))
        # Private helpers of trainer.py: the very placement `trainer.train` does.
        self.placed_teacher = trainer.place_teacher(trainer.Teacher(*self.teacher), self.mesh)
        self.done = 0

    def _updates(self, source, n: int) -> None:
        pending = None
        for _ in range(n):
            host = source.next_batch(self.done, self.state.params)
            batch = self.trainer.place_batch(self.mesh, host)
            self.state, metrics = self.step_fn(self.state, batch, self.placed_teacher)
            self.done += 1
            if pending is not None:
                jax.device_get(pending)
            pending = metrics
        jax.device_get(pending)

    def seconds_per_update(self, source, repeats: int) -> float:
        """Best of `repeats` timings of LOOP_STEPS updates, after one (compiling) update."""
        self._updates(source, 1)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            self._updates(source, LOOP_STEPS)
            best = min(best, (time.perf_counter() - start) / LOOP_STEPS)
        return best


def loop_seconds(args, config) -> dict[str, float]:
    """Seconds per trainer update of the offline, online-teacher and online-student
    sources (batch --batch, inputs --input_len, targets --target_len)."""
    from thack_jax.data import regimes
    from thack_jax.decoding.settings import SamplingConfig
    from thack_jax.training import trainer

    loop = TrainerLoop(config, args)
    inputs, targets = bench_train_step.random_batch(
        config, args.batch, args.input_len, args.target_len
    )
    source_config = regimes.SourceConfig(batch_size=args.batch, seed=0)
    online = dict(
        prompts=inputs,
        teacher=loop.teacher,
        student_config=config,
        sampling=SamplingConfig(max_decode_len=args.target_len),
        mesh=loop.mesh,
    )
    sources = {
        "offline": trainer.ArraySource(inputs, targets, args.batch),
        "online_teacher": regimes.make_source("online_teacher", source_config, **online),
        "online_student": regimes.make_source("online_student", source_config, **online),
    }
    seconds = {}
    for name, source in sources.items():
        progress(f"measuring the {name} trainer step")
        seconds[name] = loop.seconds_per_update(source, args.repeats)
    return seconds


def evaluator_seconds(argv0: str, args, config, cache_mib: int = 2048) -> dict:
    """`bench_evaluation.measure` of one `Evaluator` (oracle, teacher and student all of
    `config`, `EvalSettings.reference_cache_mib=cache_mib`): steady seconds per
    `evaluate`, its sampling / scoring split, the setup."""
    progress(
        f"measuring the evaluator ({args.eval_prompts} prompts x 2 samples, reference "
        f"cache {cache_mib} MiB)"
    )
    bench_evaluation.parse_args([argv0, f"--repeats={args.repeats}"])
    spec = dict(
        ref=config,
        student=config,
        prompts=args.eval_prompts,
        samples=2,
        lx=args.input_len,
        ly=args.new_tokens,
        reference_cache_mib=cache_mib,
    )
    return bench_evaluation.measure("table", spec)


def measure_rows(argv0: str, args) -> list[str]:
    """Every row of the table, in order (the machine limits first)."""
    config = models.get_config(args.size)
    progress(f"measuring memory bandwidth ({args.bandwidth_mib} MiB)")
    bandwidth = bench_limits.memory_bandwidth(args.bandwidth_mib, args.repeats)
    progress(f"measuring f32 matmul peak ({args.matmul_size}^3)")
    peak = bench_limits.matmul_peak(args.matmul_size, args.repeats)
    progress("measuring the decoder's matmul chain at batch 1")
    chain = bench_limits.gemv_chain_bandwidth(config, args.repeats)
    chain_mb = sum(4 * i * o for i, o in bench_limits.layer_kernel_shapes(config)) / 1e6
    rows = [
        f"| memory read bandwidth, GB/s | {bandwidth / 1e9:.4g} | - | - |",
        f"| f32 matmul peak, GFLOP/s | {peak / 1e9:.4g} | - | - |",
        row(
            f"decoder layers' matmuls at batch 1 ({chain_mb:.1f} MB, one chain), GB/s: vs "
            "memory read bandwidth",
            chain / 1e9,
            bandwidth / 1e9,
            "%",
        ),
    ]
    rows += sampler_rows(args, config, bandwidth)
    rows += train_rows(args, config, peak)
    steps = loop_seconds(args, config)
    offline = steps["offline"]
    for name in ("online_teacher", "online_student"):
        figure = f"{name.replace('_', '-')} step, s: vs offline step (s)"
        rows.append(row(figure, steps[name], offline))
    ev = evaluator_seconds(argv0, args, config)
    uncached = evaluator_seconds(argv0, args, config, cache_mib=0)
    shape = f"{args.eval_prompts} x 2, in {args.input_len}, out {args.new_tokens}"
    rows += [
        row(f"evaluator, s per checkpoint ({shape}): vs offline step (s)", ev["steady"], offline),
        row(
            "evaluator, s per checkpoint: vs the same without the reference cache "
            "(reference_cache_mib=0, 7 decoder passes), s",
            ev["steady"],
            uncached["steady"],
        ),
        row(
            "evaluator: drawing the student's samples, s: share of a checkpoint",
            ev["sample_s"],
            ev["steady"],
            "%",
        ),
        row(
            "evaluator: scoring (each model on each sample set), s: share of a checkpoint",
            ev["score_s"],
            ev["steady"],
            "%",
        ),
        row(
            "evaluator setup (reference samples, once per run), s: vs a checkpoint (s)",
            ev["setup"],
            ev["steady"],
        ),
    ]
    return rows


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    config = models.get_config(args.size)
    print(f"command: python launch/benchmark.py table {' '.join(argv[1:])}")
    print(
        f"size={args.size} (d_model={config.d_model}, layers={config.num_encoder_layers}+"
        f"{config.num_decoder_layers}, vocab={config.vocab_size}); best of {args.repeats}"
    )
    print(
        "\n".join(bench_limits.machine_lines() + bench_limits.load_line("at start", args.max_load))
    )
    rows = measure_rows(argv[0], args)
    print("\n".join(bench_limits.load_line("at end", args.max_load, os.cpu_count() or 1)))
    print("\n".join(bench_limits.machine_lines()))
    print("\n".join(HEADER + rows))
    return 0


if __name__ == "__main__":
    from thack_jax.cli import benchmark

    sys.exit(benchmark.main([sys.argv[0], "table", *sys.argv[1:]]))
