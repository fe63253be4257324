"""Tests of whole-world seeds (experiment/worlds.py): world 0 is the identity, another world
maps every seed and nothing else, the mapping is deterministic and idempotent, and
experiment.json records it (a workdir of world 1 refuses world 2)."""

import json

import pytest
from _experiment_common import tiny_config

from thack_jax.experiment import runner, worlds
from thack_jax.experiment.config import ExperimentConfig, to_json

# Every seed of the configuration, as dotted paths into to_json (runs: one per run).
SEEDS = (
    "seed",
    "oracle.init_seed",
    "teacher.init_seed",
    "student.init_seed",
    "teacher_sft.seed",
    "student_sft.seed",
    "distill.seed",
    "evaluation.seed",
)


def _flat(value, prefix=""):
    """{dotted path: leaf} of a to_json structure (lists indexed)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix.rstrip("."): value}
    out = {}
    for key, item in items:
        out.update(_flat(item, f"{prefix}{key}."))
    return out


def _seed_paths(cfg):
    return set(SEEDS) | {f"runs.{i}.seed" for i in range(len(cfg.runs))}


def test_world_zero_is_the_identity():
    cfg = tiny_config()
    assert worlds.in_world(cfg) is cfg
    assert worlds.world_seed(7, 0) == 7
    shared = runner._shared_section(cfg)
    assert "world" not in shared and worlds.BASE_KEY not in shared
    # The record of an explicit world=0 equals that of a configuration without the field.
    assert shared == runner._shared_section(tiny_config(world=0))
    expected = to_json(cfg)
    for key in ("runs", "distill", "evaluation", "guard_mode", "distill_prompt_pool", "name"):
        expected.pop(key)
    for key in ("mode", "reference_examples", "world"):
        expected.pop(key)
    assert shared == expected


def test_world_one_maps_every_seed_and_nothing_else():
    cfg = tiny_config()
    mapped = worlds.in_world(tiny_config(world=1))
    before, after = _flat(to_json(cfg)), _flat(to_json(mapped))
    assert set(before) == set(after)
    changed = {path for path in before if before[path] != after[path]}
    assert changed == _seed_paths(cfg) | {"world"}
    for path in _seed_paths(cfg):
        assert after[path] == worlds.world_seed(before[path], 1)
        assert 0 <= after[path] < 2**29
    assert worlds.base_of(mapped) == tiny_config(world=1)


def test_seed_fields_are_all_listed():
    """A new seed field of the configuration must be mapped too: every leaf named *seed."""
    leaves = _flat(to_json(tiny_config()))
    assert {p for p in leaves if p.rsplit(".", 1)[-1].endswith("seed")} == _seed_paths(
        tiny_config()
    )
    shared = runner._shared_section(tiny_config())
    shared_seeds = {p for p in _flat(shared) if p.rsplit(".", 1)[-1].endswith("seed")}
    assert shared_seeds == set(worlds.SHARED_SEEDS)


def test_worlds_differ_and_mapping_is_deterministic():
    one, two = (worlds.in_world(tiny_config(world=w)) for w in (1, 2))
    a, b = _flat(to_json(one)), _flat(to_json(two))
    for path in _seed_paths(one):
        assert a[path] != b[path]
    assert worlds.in_world(tiny_config(world=1)) == one  # fields equal: same seeds
    # Run seeds 0, 1, 2 stay distinct, and world 1's seed of 1 is no other pair's seed.
    values = {worlds.world_seed(s, w) for s in range(50) for w in range(1, 5)}
    assert len(values) == 200


def test_in_world_is_idempotent():
    once = worlds.in_world(tiny_config(world=3))
    assert worlds.in_world(once) is once
    assert worlds.in_world(worlds.in_world(once)) == once
    assert runner._shared_section(once) == runner._shared_section(tiny_config(world=3))


def test_experiment_json_records_the_world_and_its_base_seeds(tmp_path):
    workdir = str(tmp_path / "w1")
    runner.check_workdir(tiny_config(world=1), workdir)
    stored = json.load(open(tmp_path / "w1" / "experiment.json"))
    mapped = worlds.in_world(tiny_config(world=1))
    assert stored["world"] == 1 and stored["seed"] == mapped.seed
    assert stored["oracle"]["init_seed"] == mapped.oracle.init_seed
    assert stored[worlds.BASE_KEY] == {
        "seed": 0,
        "oracle.init_seed": 0,
        "teacher.init_seed": 1,
        "student.init_seed": 2,
        "teacher_sft.seed": 0,
        "student_sft.seed": 0,
    }
    # pooled gives world 0's experiment.json back exactly.
    assert worlds.pooled(stored) == runner._shared_section(tiny_config())
    assert worlds.pooled(runner._shared_section(tiny_config())) == runner._shared_section(
        tiny_config()
    )
    runner.check_workdir(tiny_config(world=1), workdir)  # the same world is accepted
    with pytest.raises(runner.ExperimentMismatchError, match=r"(?s)differing.*\bworld: stored 1"):
        runner.check_workdir(tiny_config(world=2), workdir)
    with pytest.raises(runner.ExperimentMismatchError, match="world: stored None"):
        runner.check_workdir(tiny_config(world=1), str(_world_zero(tmp_path)))


def _world_zero(tmp_path):
    workdir = tmp_path / "w0"
    runner.check_workdir(tiny_config(), str(workdir))
    return workdir


def test_world_is_checked():
    with pytest.raises(ValueError, match="ExperimentConfig.world"):
        ExperimentConfig(world=-1)


@pytest.mark.slow  # three oracle stages, about 17 s on 2 busy cores
def test_oracle_weights_follow_the_world(tmp_path):
    """The oracle stage alone: world 1 draws another oracle than world 0, the same one twice."""
    digests = {}
    for name, world in (("w0", 0), ("w1", 1), ("w1_again", 1)):
        workdir = str(tmp_path / name)
        runner.Experiment(tiny_config(world=world), workdir, progress=False).run(stages=("oracle",))
        digests[name] = (tmp_path / name / "oracle" / "model" / "model.safetensors").read_bytes()
    assert digests["w1"] == digests["w1_again"]
    assert digests["w0"] != digests["w1"]
