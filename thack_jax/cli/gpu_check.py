"""One prepared GPU check: correctness against the CPU, then speed. Prints markdown tables.

    python launch/gpu_check.py                       # on a GPU machine (jax[cuda])
    python launch/gpu_check.py --smoke --platform=cpu  # tiny sizes on CPU (tests/test_gpu_check.py)

Needs only jax, flax, optax, orbax-checkpoint and numpy: it imports thack_jax.models,
sampling, train_step, optim and memory, never thack_jax.data, gin, seqio or TensorFlow.

(a) Correctness (float32, matmul precision 'highest', T5 v1.1-small widths; `tiny` with
    --smoke): the same parameters and the same key on the CPU and on the accelerator.
    * greedy tokens of `sampling.sample` must be equal on every row;
    * temperature-1 samples (same key) are reported as the fraction of equal rows (a CDF
      boundary may flip a token; not a failure);
    * one distillation train step (`train_step.make_train_step`, forward KL, frozen teacher,
      plain SGD with learning rate 1 so the parameter change IS the gradient): the losses
      must agree to a relative 1e-5 and the parameters to max|diff| <= 1e-4 * max|update|.
(b) Speed (bfloat16 activations, float32 parameters, batch 32, 64 input + 64 target tokens):
    * the distillation step (teacher forward + student forward/backward + AdamW) at T5
      v1.1-small and base widths (teacher = student size) and small student + large
      teacher (the paper's pairing): tokens/s (input + target tokens) and MFU = model
      FLOPs (`memory.forward_flops`: 3x the student's forward + 1x the teacher's) / step
      time / peak, the peak being the best bf16 FLOP/s of a large square `jnp.dot`
      measured in the same run;
    * `sampling.sample` (32 prompts of 64 tokens, 64 new tokens, every row decoded to the
      end): generated tokens/s.
Exit status 1 when a correctness check fails. `--json_out=PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse(argv):
    p = argparse.ArgumentParser(prog="gpu_check.py")
    p.add_argument("--platform", default="gpu", choices=("gpu", "cpu"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU test)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json_out", default=None)
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None and ARGS.platform == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from thack_jax import models  # noqa: E402
from thack_jax.decoding import sampling  # noqa: E402
from thack_jax.decoding.settings import SamplingConfig  # noqa: E402
from thack_jax.training import memory, optim, train_step  # noqa: E402
from thack_jax.training.train_state import create_train_state  # noqa: E402

LOSS_RTOL = 1e-5
PARAM_TOL = 1e-4  # max |param diff| / max |update|


def _best_seconds(fn, repeats: int) -> float:
    """Best wall time of `fn()` (which must block until its results are ready)."""
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _toy_batch(config, batch: int, lx: int, ly: int, seed: int = 0) -> dict[str, np.ndarray]:
    """inputs [batch, lx], targets [batch, ly] int32: random tokens, EOS, pads."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, config.vocab_size, (batch, lx)).astype(np.int32)
    targets = rng.integers(3, config.vocab_size, (batch, ly)).astype(np.int32)
    lengths = rng.integers(ly // 2, ly + 1, batch)
    for i, n in enumerate(lengths):
        targets[i, n - 1] = config.eos_id
        targets[i, n:] = config.pad_id
    return {"inputs": inputs, "targets": targets}


def _max_abs_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def _on(device, tree):
    return jax.device_put(tree, device)


def correctness(size: str, accel, cpu, batch: int, lx: int, ly: int) -> dict:
    """(a): the same computations on `cpu` and `accel`; returns the figures and pass flags."""
    config = models.get_config(size, dtype="float32", param_dtype="float32")
    with jax.default_matmul_precision("highest"):
        student = jax.device_get(models.init_params(config, jax.random.key(0)))
        teacher = jax.device_get(models.init_params(config, jax.random.key(1)))
        data = _toy_batch(config, batch, lx, ly)
        out = {}
        for name, temperature in (("greedy", 0.0), ("t1", 1.0)):
            tokens = []
            for dev in (cpu, accel):
                with jax.default_device(dev):
                    s = sampling.sample(
                        config,
                        _on(dev, student),
                        _on(dev, data["inputs"]),
                        jax.random.key(7),
                        SamplingConfig(max_decode_len=ly, temperature=temperature),
                    )
                    tokens.append(np.asarray(s.tokens))
            out[f"{name}_rows_equal"] = float(np.mean(np.all(tokens[0] == tokens[1], axis=1)))
        opt = optax.sgd(1.0)
        step_config = train_step.StepConfig("distill", "forward_kl")
        step = train_step.make_train_step(config, opt, step_config, config)
        results = []
        for dev in (cpu, accel):
            with jax.default_device(dev):
                state = create_train_state(_on(dev, student), opt, 7)
                new, metrics = step(state, _on(dev, data), _on(dev, teacher))
                results.append((float(metrics["train/loss"]), jax.device_get(new.params)))
    (loss_cpu, p_cpu), (loss_acc, p_acc) = results
    diff, update = _max_abs_diff(p_cpu, p_acc), _max_abs_diff(p_cpu, student)
    out.update(
        size=size,
        loss_cpu=loss_cpu,
        loss_accel=loss_acc,
        loss_rel_diff=abs(loss_cpu - loss_acc) / abs(loss_cpu),
        param_max_diff=diff,
        max_update=update,
    )
    out["pass_greedy"] = out["greedy_rows_equal"] == 1.0
    out["pass_loss"] = out["loss_rel_diff"] <= LOSS_RTOL
    out["pass_params"] = diff <= PARAM_TOL * update
    return out


def matmul_peak(n: int, repeats: int) -> float:
    """Best bf16 FLOP/s of an [n, n] x [n, n] `jnp.dot` on the default device."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.bfloat16)
    dot = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    return 2 * n**3 / _best_seconds(lambda: dot(a).block_until_ready(), repeats)


def train_speed(student_size, teacher_size, batch, lx, ly, repeats, peak) -> dict:
    """(b): tokens/s and MFU of the bf16 distillation step on the default device."""
    student = models.get_config(student_size, dtype="bfloat16")
    teacher = models.get_config(teacher_size, dtype="bfloat16")
    opt = optim.make_optimizer(optim.OptimizerConfig("adamw", 3e-4, clip_norm=1.0))
    step = train_step.make_train_step(student, opt, train_step.StepConfig("distill"), teacher)
    state = create_train_state(models.init_params(student, jax.random.key(0)), opt, 0)
    t_params = models.init_params(teacher, jax.random.key(1))
    data = {k: jnp.asarray(v) for k, v in _toy_batch(student, batch, lx, ly).items()}
    box = [state]

    def run():
        box[0], metrics = step(box[0], data, t_params)
        metrics["train/loss"].block_until_ready()

    seconds = _best_seconds(run, repeats)
    flops = batch * (
        3 * memory.forward_flops(student, lx, ly) + memory.forward_flops(teacher, lx, ly)
    )
    return {
        "student": student_size,
        "teacher": teacher_size,
        "step_ms": 1e3 * seconds,
        "tokens_per_s": batch * (lx + ly) / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / peak,
    }


def sample_speed(size, prompts, lx, ly, repeats) -> dict:
    config = models.get_config(size, dtype="bfloat16")
    params = models.init_params(config, jax.random.key(0))
    inputs = jnp.asarray(_toy_batch(config, prompts, lx, 1)["inputs"])

    def run():
        settings = SamplingConfig(max_decode_len=ly)
        out = sampling.sample(config, params, inputs, jax.random.key(3), settings, eos_id=-1)
        out.tokens.block_until_ready()

    seconds = _best_seconds(run, repeats)
    return {"model": size, "ms": 1e3 * seconds, "tokens_per_s": prompts * ly / seconds}


def main(args) -> int:
    accel = jax.devices()[0]
    if args.platform == "gpu" and accel.platform != "gpu":
        print(f"no GPU: the default device is {accel} (use --platform=cpu)", file=sys.stderr)
        return 2
    cpu = jax.devices("cpu")[0]
    smoke = args.smoke
    repeats = 1 if smoke else args.repeats
    kind = getattr(accel, "device_kind", str(accel))
    print(f"# GPU check on {kind} (jax {jax.__version__}, {'smoke' if smoke else 'full'})\n")

    c = correctness("tiny" if smoke else "small", accel, cpu, 4 if smoke else 8, 8, 8)
    ok = c["pass_greedy"] and c["pass_loss"] and c["pass_params"]
    print("## (a) accelerator vs CPU (float32, precision highest)\n")
    print("| check | value | tolerance | pass |\n|---|---|---|---|")
    print(f"| greedy sample rows equal | {c['greedy_rows_equal']:.3f} | 1.0 | {c['pass_greedy']} |")
    print(f"| T=1 sample rows equal (same key) | {c['t1_rows_equal']:.3f} | report | - |")
    print(
        f"| train-step loss rel. diff | {c['loss_rel_diff']:.2e} "
        f"(cpu {c['loss_cpu']:.6f}) | {LOSS_RTOL:g} | {c['pass_loss']} |"
    )
    print(
        f"| params max diff / max update | {c['param_max_diff']:.2e} / {c['max_update']:.2e} |"
        f" {PARAM_TOL:g} | {c['pass_params']} |\n"
    )

    batch, lx, ly = (4, 8, 8) if smoke else (32, 64, 64)
    peak = matmul_peak(256 if smoke else 8192, repeats)
    pairs = (
        [("tiny", "tiny")] if smoke else [("small", "small"), ("base", "base"), ("small", "large")]
    )
    train = [train_speed(s, t, batch, lx, ly, repeats, peak) for s, t in pairs]
    samples = [
        sample_speed(size, batch, lx, ly, repeats)
        for size in (["tiny"] if smoke else ["small", "base", "large"])
    ]
    print(f"## (b) speed, bf16 activations (batch {batch}, {lx}+{ly} tokens)\n")
    print(f"measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s\n")
    print("| student | teacher | step ms | tokens/s | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for r in train:
        print(
            f"| {r['student']} | {r['teacher']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f}"
            f" | {r['tflops_per_s']:.1f} | {100 * r['mfu']:.1f}% |"
        )
    print(f"\n| sampler model | {batch} prompts x {ly} tokens, ms | generated tokens/s |")
    print("|---|---|---|")
    for r in samples:
        print(f"| {r['model']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} |")
    print(f"\ncorrectness: {'PASS' if ok else 'FAIL'}")
    if args.json_out:
        figures = {"device": kind, "peak_flops": peak, "correctness": c, "train": train}
        figures["sampling"] = samples
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=1, default=float)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
