"""Prints the estimated accelerator memory per device of an experiment's stages, or of one model.

    python launch/memory.py --gin_file=experiments/paper_xsum_small.gin --num_devices=8
    python launch/memory.py --gin_file=experiments/paper_xsum_small.gin --mesh=data=4,model=2
    python launch/memory.py --size=xl --batch_size=32 --input_length=1024 --target_length=128 \
        --mode=train --optimizer=adafactor --mesh=data=16

The estimates come from `thack_jax.training.memory` (parameters and optimizer state exact from their
shapes and the partitioning rules, activations from a documented formula). Every figure is
an estimate, not a measurement. Which devices fit: the total within 90% of the nominal
memory (`memory.DEVICES`).

Stages of an experiment (as `thack_jax.experiment.runner` runs them):
  * oracle data / offline data: `generation.build_offline_store` samples chunks of 256 prompts
    split over the mesh's data axis (`stages.py` passes the mesh); these rows use
    `--sampling_mesh` (default data=1, the worst case: one device holds the whole chunk).
  * teacher / student SFT: train steps on the mesh.
  * distill/<regime>: the student's train step with the frozen teacher, the sampler for
    online regimes, plus the evaluator's oracle and teacher parameters, which stay placed
    on the mesh for the whole run.
  * evaluation: the evaluator scores `batch_size * num_samples` sampled rows with the
    oracle, the teacher and the student (three params trees, the oracle's forward, and two
    more [rows, Ly, V] float32 log-prob arrays).
"""

from __future__ import annotations

from absl import app, flags

from thack_jax import models
from thack_jax.cli import common
from thack_jax.training import memory  # noqa: E402

FLAGS = flags.FLAGS
common.define_gin_flags()
flags.adopt_module_key_flags(common)  # --help lists the gin flags and --verbose
flags.DEFINE_integer(
    "num_devices",
    None,
    "Devices the training mesh spans: replaces its -1 (default 1); a mesh without -1 "
    "(--mesh=data=16) spans its product.",
)
flags.DEFINE_string("mesh", None, "Training mesh, e.g. 'data=8' or 'data=4,model=2'.")
flags.DEFINE_string("sampling_mesh", "data=1", "Mesh of the offline-data sampling stages.")
flags.DEFINE_integer("sampling_chunk", 256, "Prompts per sampler call (build_offline_store).")
flags.DEFINE_string("size", None, "Without --gin_file: a models.get_config size, e.g. xl.")
flags.DEFINE_integer("batch_size", 32, "Global batch (prompts in sample mode).")
flags.DEFINE_integer("input_length", 1024, "Input tokens.")
flags.DEFINE_integer("target_length", 128, "Target tokens.")
flags.DEFINE_enum("mode", "train", memory.MODES, "What the model does.")
flags.DEFINE_enum("optimizer", "adamw", ["adamw", "adafactor"], "Optimizer (train mode).")
flags.DEFINE_string("param_dtype", None, "Parameter dtype (default: the config's).")
flags.DEFINE_string("activation_dtype", "bfloat16", "Activation dtype.")
flags.DEFINE_integer("num_microbatches", 1, "Gradient-accumulation microbatches.")
flags.DEFINE_integer("num_samples", 1, "Samples per prompt (sample mode).")


def parse_mesh(text: str) -> dict[str, int]:
    """'data=4,model=2' -> {'data': 4, 'model': 2}; errors name the bad part."""
    mesh = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh part {part!r} of {text!r} is not 'axis=size'")
        mesh[name.strip()] = int(value)
    if not mesh:
        raise ValueError(f"empty mesh {text!r}")
    return mesh


def resolve_mesh(mesh_shape: dict, num_devices: int | None) -> dict[str, int]:
    """Replaces a -1 size with what is left of `num_devices` (None: 1 device for a -1, the
    mesh's own product otherwise)."""
    known = 1
    for size in mesh_shape.values():
        known *= size if size != -1 else 1
    if num_devices is None:
        num_devices = known
    if num_devices % known:
        raise ValueError(f"mesh {mesh_shape} does not divide {num_devices} devices")
    return {k: (num_devices // known if v == -1 else v) for k, v in mesh_shape.items()}


def experiment_rows(cfg, mesh_shape: dict, sampling_mesh: dict, chunk: int = 256) -> list:
    """memory.Row per stage of ExperimentConfig `cfg` (see the module docstring)."""
    lx, ly = cfg.max_input_length, cfg.max_target_length
    conf = {role: cfg.model_config(role) for role in ("oracle", "teacher", "student")}
    size = {role: getattr(cfg, role).size for role in conf}
    rows = []
    for stage, role in (("oracle data", "oracle"), ("offline data", "teacher")):
        e = memory.estimate(
            conf[role], memory.Workload(chunk, lx, ly), mode="sample", mesh_shape=sampling_mesh
        )
        rows.append(memory.Row(stage, f"{role} {size[role]}", e))
    for stage, role, tc in (
        ("SFT", "teacher", cfg.teacher_sft),
        ("SFT", "student", cfg.student_sft),
    ):
        e = memory.estimate(
            conf[role],
            memory.Workload(tc.batch_size, lx, ly, num_microbatches=tc.num_microbatches),
            mode="train",
            optimizer=tc.optimizer,
            mesh_shape=mesh_shape,
        )
        rows.append(memory.Row(f"{role} {stage} ({tc.optimizer})", f"{role} {size[role]}", e))
    fwd = memory.Workload(cfg.distill.batch_size, lx, ly)
    evaluator_params = sum(
        memory.estimate(conf[r], fwd, mode="forward", mesh_shape=mesh_shape)["params"]
        for r in ("oracle", "teacher")
    )
    for regime in dict.fromkeys(run.regime for run in cfg.runs):
        e = memory.distill_estimate(
            conf["student"],
            conf["teacher"],
            memory.Workload(
                cfg.distill.batch_size, lx, ly, num_microbatches=cfg.distill.num_microbatches
            ),
            regime=regime,
            optimizer=cfg.distill.optimizer,
            mesh_shape=mesh_shape,
        )
        e["teacher_params"] += evaluator_params
        e["total"] += evaluator_params
        model = f"student {size['student']} + teacher {size['teacher']} (+ eval copies)"
        rows.append(memory.Row(f"distill/{regime}", model, e))
    ev = cfg.evaluation
    scored = memory.Workload(ev.batch_size * ev.num_samples, lx, ly)
    per_role = {
        r: memory.estimate(conf[r], scored, mode="forward", mesh_shape=mesh_shape) for r in conf
    }
    e = dict(per_role["oracle"])
    e["params"] = sum(x["params"] for x in per_role.values())
    e["logits"] += per_role["teacher"]["logits"] // 2 + per_role["student"]["logits"] // 2
    e["total"] = e["params"] + e["activations"] + e["logits"] + e["cache"]
    rows.append(memory.Row("evaluation (score)", "oracle + teacher + student", e))
    return rows


def main(argv):
    del argv
    if FLAGS.gin_file:
        cfg = common.experiment_config("memory.py")
        mesh = parse_mesh(FLAGS.mesh) if FLAGS.mesh else dict(cfg.mesh_shape)
        mesh = resolve_mesh(mesh, FLAGS.num_devices)
        rows = experiment_rows(cfg, mesh, parse_mesh(FLAGS.sampling_mesh), FLAGS.sampling_chunk)
        print(f"## {cfg.name}: memory per device (estimate), training mesh {mesh}\n")
    elif FLAGS.size:
        mesh = resolve_mesh(parse_mesh(FLAGS.mesh or "data=-1"), FLAGS.num_devices)
        config = models.get_config(FLAGS.size)
        workload = memory.Workload(
            FLAGS.batch_size,
            FLAGS.input_length,
            FLAGS.target_length,
            num_microbatches=FLAGS.num_microbatches,
            num_samples=FLAGS.num_samples,
        )
        e = memory.estimate(
            config,
            workload,
            mode=FLAGS.mode,
            mesh_shape=mesh,
            optimizer=FLAGS.optimizer,
            param_dtype=FLAGS.param_dtype,
            activation_dtype=FLAGS.activation_dtype,
        )
        rows = [memory.Row(FLAGS.mode, f"{FLAGS.size} ({e['num_params'] / 1e6:.0f}M)", e)]
    else:
        raise app.UsageError("give --gin_file=experiments/x.gin or --size=small|base|large|xl")
    print(memory.table(rows))


def run() -> None:
    """Console script `thack-memory` (and `python launch/memory.py`)."""
    common.run(main, "memory.py")


if __name__ == "__main__":
    run()
