"""The process that the kill-anywhere soak (tests/_kill_soak.py) kills and reruns.

Runs a CI-sized experiment (every stage; an offline and an online-teacher distillation run)
into a workdir, as `launch/train.py` would, in its own process so that it can be SIGKILLed or
SIGTERMed at any moment:

    python tests/_experiment_worker.py --workdir DIR [--cache_dir DIR]

The configuration (`soak_config`) is sized so that a kill at a random time lands in every
kind of phase: the oracle-data and offline stores fill in 3 chunks each (600 prompts, 256 a
chunk), and the 24-step distillation runs evaluate every 3 steps and checkpoint every 4.

It prints one `EVENT <unix time> <what>` line (flushed) when a stage, a store chunk, an
evaluation, a metrics line or a checkpoint save starts or ends, so that the soak can tell
which phase a kill landed in (`read_events`, `phase_at`: the one place that knows the
format). These wrappers only print; they change nothing the package computes. It exits 0
after printing `RESULT {...}`; when SIGTERM/SIGINT stopped it through
`thack_jax.core.interrupt.Interrupted`, with that exception's exit status.

`--cache_dir`: a JAX persistent compilation cache shared by every attempt of a soak. It
loads the executables an earlier attempt compiled (the same programs, so results are
bitwise the same; the soak checks that), which cuts each attempt's compile time.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax is imported: the same 8 devices as the tests
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _experiment_common

import argparse
import functools
import json
import re
import time

from _experiment_common import tiny_config

from thack_jax.experiment.config import EvalConfig, ExperimentConfig, RunConfig, TrainConfig

# Stores: 600 prompts in chunks of 256 (GenerationConfig's default): 3 chunks each.
STORE_PROMPTS = 600
DISTILL_STEPS = 24


def soak_config() -> ExperimentConfig:
    """The soak's experiment: tiny models, 3-chunk stores, 24 distillation steps of 2 runs
    (offline, online_teacher), evaluated every 3 steps, checkpointed every 4."""
    return tiny_config(
        name="soak",
        oracle_data_prompts=STORE_PROMPTS,
        distill=TrainConfig(
            num_steps=DISTILL_STEPS,
            batch_size=8,
            learning_rate=3e-3,
            warmup_steps=2,
            checkpoint_every=4,
        ),
        runs=(
            RunConfig(name="offline", regime="offline", num_prompts=STORE_PROMPTS),
            RunConfig(name="online_teacher", regime="online_teacher"),
        ),
        evaluation=EvalConfig(num_prompts=8, num_samples=2, every=3, batch_size=8),
    )


def event(what: str) -> None:
    """One `EVENT <unix time> <what>` line on stdout, flushed (the soak reads it)."""
    print(f"EVENT {time.time():.4f} {what}", flush=True)


def _wrap(owner, name: str, label) -> None:
    """Replaces `owner.name` by a function that prints begin/end events around it;
    `label(*args, **kwargs)` names the call. A missing attribute is left alone (the
    package may have moved it; the soak then only loses detail)."""
    original = getattr(owner, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        try:
            what = label(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a changed signature costs detail, not the run
            what = name
        event(f"begin {what}")
        result = original(*args, **kwargs)
        event(f"end {what}")
        return result

    setattr(owner, name, wrapped)


def instrument(workdir: str) -> None:
    """Events around the stages, store chunks, evaluations, metric lines, checkpoint saves
    and the report."""
    from thack_jax.data.offline_store import OfflineStore
    from thack_jax.evaluation.evaluator import Evaluator
    from thack_jax.experiment import runner
    from thack_jax.reporting import report
    from thack_jax.training.checkpoints import Checkpointer
    from thack_jax.training.metrics_io import MetricsWriter

    def rel(path: str) -> str:
        return os.path.relpath(str(path), workdir)

    exp = runner.Experiment
    _wrap(exp, "stage_oracle", lambda *a, **k: "stage oracle")
    _wrap(exp, "stage_oracle_data", lambda *a, **k: "stage oracle_data")
    _wrap(
        exp,
        "stage_sft",
        lambda self, role, *a, **k: f"stage {'student_init' if role == 'student' else role}",
    )
    _wrap(exp, "stage_distill", lambda self, run, *a, **k: f"stage distill/{run.name}")
    _wrap(report, "write_report", lambda *a, **k: "stage report")
    _wrap(Evaluator, "estimates", lambda *a, **k: "eval")
    _wrap(MetricsWriter, "write", lambda self, step, *a, **k: f"log {rel(self.path)} {step}")
    _wrap(Checkpointer, "save", lambda self, step, *a, **k: f"ckpt {rel(self.directory)} {step}")

    fill = OfflineStore.fill

    @functools.wraps(fill)
    def logged_fill(self, generate_fn, *args, **kwargs):
        where = rel(self.directory)

        def generate(prompts, chunk_index):
            event(f"begin chunk {where} {chunk_index}")
            out = generate_fn(prompts, chunk_index)
            event(f"end chunk {where} {chunk_index}")
            return out

        return fill(self, generate, *args, **kwargs)

    OfflineStore.fill = logged_fill


def read_events(log: str) -> list[tuple[float, str]]:
    """The `EVENT <unix time> <what>` lines of a worker's output as (time, what)."""
    events = []
    with open(log, errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split(" ", 2)
            if len(parts) == 3 and parts[0] == "EVENT":
                try:
                    events.append((float(parts[1]), parts[2]))
                except ValueError:
                    pass  # a line cut short by a kill
    return events


def _short(label: str) -> str:
    """An event label without its path: 'ckpt runs/x/train/checkpoints 12' -> 'checkpoint
    save 12', 'chunk <store> 1' -> 'store chunk 1', 'log <file> 3' -> 'metrics line 3'."""
    label = re.sub(r"^ckpt \S+ (\d+)$", r"checkpoint save \1", label)
    label = re.sub(r"^chunk \S+ (\d+)$", r"store chunk \1", label)
    return re.sub(r"^log \S+ (\d+)$", r"metrics line \1", label)


def phase_at(events: list[tuple[float, str]], at: float) -> str:
    """Where the worker was at unix time `at`: its stage and the innermost open span (a
    store chunk, evaluation, checkpoint save or metrics write), else what ended last
    before `at` (e.g. 'distill/offline: after metrics line 13', i.e. training steps)."""
    spans, last = [], "nothing"
    for t, what in events:
        if t > at:
            break
        kind, _, label = what.partition(" ")
        if kind == "begin":
            spans.append(label)
        elif kind == "end" and label in spans:
            spans.remove(label)
        last = what
    if last in ("nothing", "start"):
        return "startup (imports)"
    if last == "done":
        return "exit (after the report)"
    stages = [s[len("stage ") :] for s in spans if s.startswith("stage ")]
    inner = [s for s in spans if not s.startswith("stage ")]
    kind, _, label = last.partition(" ")
    if not stages:
        return f"between stages (after {_short(label or last)})"
    if inner:
        return f"{stages[-1]}: {_short(inner[-1])}"
    if kind == "begin":
        return f"{stages[-1]}: before its first event"
    return f"{stages[-1]}: after {_short(label)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--cache_dir", default="", help="JAX persistent compilation cache")
    args = parser.parse_args(argv)
    event("start")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    from thack_jax.experiment import runner

    instrument(args.workdir)
    event("imported")
    try:
        runner.Experiment(soak_config(), args.workdir, progress=False).run()
    except Exception as e:
        from thack_jax.core import interrupt

        if isinstance(e, interrupt.Interrupted):
            event("interrupted")
            print(f"INTERRUPTED {e}", flush=True)
            return e.exit_code
        raise
    event("done")
    print("RESULT " + json.dumps({"workdir": args.workdir}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
