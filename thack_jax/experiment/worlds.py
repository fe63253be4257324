"""Whole-world seeds: `ExperimentConfig.world` derives every seed of the experiment.

Without it the sweep's "seeds" (`RunConfig.seed`) vary only the distillation run: the
oracle, the teacher, the initial student and the data are one world shared by all of them.
World w > 0 replaces every seed value v of the configuration by `world_seed(v, w)`:

    ModelSpec.init_seed        oracle, teacher, student (their random initialisations)
    ExperimentConfig.seed      every training prompt draw: the oracle data, the field
                               mode's references, the runs' offline prompts, the online pool
                               (and the offline generation keys derived from it)
    TrainConfig.seed           teacher_sft, student_sft (row order, step keys) and distill
    EvalConfig.seed            the held-out prompts, the oracle references, the evaluator's
                               sample keys
    RunConfig.seed             every run (its data order and keys, with distill.seed)

Nothing else in the experiment is random (grep `seed` in thack_jax/experiment/): every key
and permutation is derived from one of these, so a world is a whole new draw of the study.
A loaded checkpoint ignores its init_seed; the world then changes the rest only. Equal seed
values stay equal within a world (world w is world 0 with each value relabelled), so the
structure of the configured seeds is kept.

`Experiment.__init__` maps its configuration once (`in_world`); the result is marked, so
mapping it again returns it unchanged. experiment.json and run.json record the mapped
seeds (what was used); experiment.json of a world w > 0 also holds the world and the base
values of its seeds (`BASE_KEY`), from which `pooled` recovers world 0's experiment.json
exactly: the report pools the runs of one experiment over its worlds (reporting/report.py).
World 0 is today's world bit for bit, and its experiment.json has no world key.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from thack_jax.experiment.config import ExperimentConfig, to_json

# experiment.json of a world > 0 holds its base seeds under BASE_KEY; `pooled` reads them
# back (the report does, a layer below this package: it is defined there).
from thack_jax.reporting.text_format import WORLD_BASE_KEY as BASE_KEY
from thack_jax.reporting.text_format import pooled_experiment as pooled

__all__ = ["BASE_KEY", "SHARED_SEEDS", "base_of", "base_seeds", "in_world", "pooled", "world_seed"]

# The mapped seeds that experiment.json holds (dotted paths into it); the others (distill,
# evaluation, runs) are in the stage markers and run.json, not in experiment.json.
SHARED_SEEDS = (
    "seed",
    "oracle.init_seed",
    "teacher.init_seed",
    "student.init_seed",
    "teacher_sft.seed",
    "student_sft.seed",
)
# Derived seeds stay below 2**29 so that the sums distillation.py forms (cfg.seed + 2000 +
# run.seed, distill.seed + run.seed) stay in int32: with x64 off jax.random.key keeps only
# the low 32 bits of a seed (key(2**32 + 5) == key(5)), which would merge two worlds' keys.
_RANGE = 2**29
_BASE = "_world_base"  # the non-field attribute marking a mapped configuration


def world_seed(base: int, world: int) -> int:
    """The seed of world `world` standing for `base`: `base` itself in world 0, otherwise a
    hash of (world, base) by numpy's SeedSequence. A hash, not arithmetic like
    base + 1000 * world: distinct (world, base) pairs give unrelated seeds, so world 1's
    run seed 1 is not world 0's run seed 1001, nor any other world's seed."""
    if world == 0:
        return int(base)
    state = np.random.SeedSequence([int(world), int(base)]).generate_state(1)[0]
    return int(state % _RANGE)


def in_world(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with every seed mapped to world `cfg.world` (see the module doc); `cfg` itself
    in world 0 and when `cfg` is already mapped (idempotent). The result remembers `cfg`
    (`base_of`). A `dataclasses.replace` of a mapped configuration is not marked: map the
    base configuration instead."""
    if cfg.world == 0 or _BASE in vars(cfg):
        return cfg

    def seed(value: int) -> int:
        return world_seed(value, cfg.world)

    def spec(s):
        return dataclasses.replace(s, init_seed=seed(s.init_seed))

    def train(t):
        return dataclasses.replace(t, seed=seed(t.seed))

    mapped = dataclasses.replace(
        cfg,
        seed=seed(cfg.seed),
        oracle=spec(cfg.oracle),
        teacher=spec(cfg.teacher),
        student=spec(cfg.student),
        teacher_sft=train(cfg.teacher_sft),
        student_sft=train(cfg.student_sft),
        distill=train(cfg.distill),
        evaluation=dataclasses.replace(cfg.evaluation, seed=seed(cfg.evaluation.seed)),
        runs=tuple(dataclasses.replace(r, seed=seed(r.seed)) for r in cfg.runs),
    )
    object.__setattr__(mapped, _BASE, cfg)  # frozen: the mark is not a field (no __eq__)
    return mapped


def base_of(cfg: ExperimentConfig) -> ExperimentConfig:
    """The configuration `cfg` was mapped from (`cfg` itself when it was not mapped)."""
    return vars(cfg).get(_BASE, cfg)


def _get(record: dict, path: str):
    for key in path.split("."):
        record = record[key]
    return record


def base_seeds(cfg: ExperimentConfig, shared: dict) -> dict:
    """{path: base value} of the SHARED_SEEDS of `cfg` (mapped) that the experiment.json
    record `shared` holds (field mode's too: the oracle's spec is kept there)."""
    base = to_json(base_of(cfg))
    return {path: _get(base, path) for path in SHARED_SEEDS if _has(shared, path)}


def _has(record: dict, path: str) -> bool:
    try:
        _get(record, path)
    except (KeyError, TypeError):
        return False
    return True
