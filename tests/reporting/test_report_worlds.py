"""Tests of the report over whole-world seeds (experiment/worlds.py): runs of workdirs that
differ only in `world` (and the seeds it maps) form one group, the report says how many
worlds a group spans, and each run is compared with its own workdir's reference levels."""

import json
import os

from test_report import EXPERIMENT, make_workdir
from test_report_levels import _record, _row

from thack_jax.experiment import worlds
from thack_jax.reporting import levels, report

NAMES = ("offline", "offline_s1", "online_teacher")


def _in_world(experiment: dict, world: int) -> dict:
    """experiment.json of `experiment` in `world`, as runner._shared_section writes it."""
    out = json.loads(json.dumps(experiment))
    base = {}
    for path in worlds.SHARED_SEEDS:
        *parents, last = path.split(".")
        record = out
        for key in parents:
            record = record.get(key, {})
        if last in record:
            base[path] = record[last]
            record[last] = worlds.world_seed(record[last], world)
    return dict(out, world=world, **{worlds.BASE_KEY: base})


def _workdir(path, world: int, teacher_level: float) -> str:
    """A fake workdir of NAMES in `world` (its experiment.json and run seeds mapped) whose
    reference_levels.json puts the teacher's golden forward KL at `teacher_level`."""
    workdir = make_workdir(path, names=NAMES)
    if world:
        with open(os.path.join(workdir, "experiment.json"), "w") as f:
            json.dump(_in_world(EXPERIMENT, world), f)
        for name in NAMES:
            run_json = os.path.join(workdir, "runs", name, "run.json")
            config = json.load(open(run_json))
            config["seed"] = worlds.world_seed(config["seed"], world)
            json.dump(config, open(run_json, "w"))
    with open(os.path.join(workdir, levels.FILE), "w") as f:
        json.dump(_record(teacher_level), f)
    return workdir


def test_worlds_pool_into_one_group_with_their_own_levels(tmp_path):
    # Finals: offline ~0.64, online_teacher ~0.46 (test_report's fakes, in both workdirs).
    a, b = _workdir(tmp_path / "a", 0, 0.3), _workdir(tmp_path / "b", 1, 0.7)
    runs = report.load_runs([a, b])
    groups, experiments = report.group_runs(runs)
    assert experiments == [EXPERIMENT]  # world 1's experiment.json pools back to world 0's
    assert sorted(g.label for g in groups) == ["offline N=64x1", "online_teacher"]
    for grp in groups:
        assert grp.worlds == (0, 1)
        assert {runs[i].workdir for i in grp.members} == {a, b}
    text = open(report.write_report([a, b], str(tmp_path / "out"))).read()
    members = "offline @a, offline_s1 @a, offline @b, offline_s1 @b"
    assert f"| offline N=64x1 | {members} (2 worlds) |" in text
    assert "- worlds: [0, 1]" in text and "- Worlds: a group spanning" in text
    # Each run shows, and is warned against, its own workdir's teacher level.
    assert _row(text, "offline @a")[8] == "0.3 ± 0.01"
    assert _row(text, "offline @b")[8] == "0.7 ± 0.01"
    # A group's level is the mean of its runs' own levels: (0.3 + 0.7) / 2, one stderr per
    # workdir (sqrt(2 * (2 * 0.01)^2) / 4).
    assert _row(text, "offline N=64x1")[5] == "0.5 ± 0.0071"
    (warning,) = [x for x in text.splitlines() if x.startswith("**WARNING**")]
    named = warning.split("In these")[0]
    assert "offline @b (" in named and "online_teacher @b (" in named
    assert "offline @a (" not in named and "online_teacher @a (" not in named
    # The group means: online_teacher (~0.46) is below the mean level 0.5, offline is not.
    assert "group means: online_teacher (mean" in named and "offline N=64x1" not in named


def test_one_world_reads_as_before(tmp_path):
    """Two world-0 workdirs: no worlds line or note, the groups as before."""
    a, b = _workdir(tmp_path / "a", 0, 0.3), _workdir(tmp_path / "b", 0, 0.3)
    text = open(report.write_report([a, b], str(tmp_path / "out"))).read()
    assert "worlds" not in text.lower()
    assert "| offline N=64x1 | offline @a, offline_s1 @a, offline @b, offline_s1 @b |" in text


def test_other_experiments_stay_apart(tmp_path):
    """A world-1 workdir of another experiment (a changed non-seed field) is not pooled, and
    neither is a world-1 record whose base seeds differ from the world-0 one's."""
    a, b = _workdir(tmp_path / "a", 0, 0.3), _workdir(tmp_path / "b", 1, 0.3)
    other = dict(_in_world(EXPERIMENT, 1), oracle_logit_scale=2.0)
    json.dump(other, open(os.path.join(b, "experiment.json"), "w"))
    groups, experiments = report.group_runs(report.load_runs([a, b]))
    assert len(experiments) == 2 and all(g.worlds in ((0,), (1,)) for g in groups)
    shifted = _in_world(dict(EXPERIMENT, seed=5), 1)
    assert worlds.pooled(shifted) == dict(EXPERIMENT, seed=5) != EXPERIMENT
