"""Tests of reporting.report on synthetic experiment workdirs (numpy + matplotlib, seconds).

`make_workdir` writes the layout of experiment.py: an offline group of 2 seeds with a
U-shaped golden and a flattening proxy, offline variants for the prompt-diversity and
generation-budget findings, a 10% mixed run with a flat golden, and two online runs whose
curves fall monotonically. With `Reference(...)` the evaluations also log the reference
metrics (reference cross-entropy = golden + the oracle's entropy, so it has the golden's
shape), and with `oracle=None` the workdir is a field-mode one: no golden keys, no oracle
level, "mode": "field" in experiment.json.
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from thack_jax.hacking import diagnostics, guard, noise
from thack_jax.hacking.simulation import CurveSpec, simulate_curve
from thack_jax.reporting import report

EXPERIMENT = {
    "task": "synthetic",
    "task_options": [],
    "max_input_length": 16,
    "max_target_length": 12,
    "oracle": {"size": "tiny", "overrides": [["d_model", 64]], "checkpoint": None},
    "teacher": {"size": "tiny", "overrides": [], "checkpoint": None},
    "student": {"size": "tiny", "overrides": [["num_heads", 2]], "checkpoint": None},
    "oracle_logit_scale": 3.0,
    "oracle_data_prompts": 4096,
    "teacher_sft": {"num_steps": 300, "batch_size": 32, "learning_rate": 0.0003},
    "student_sft": {"num_steps": 100, "batch_size": 32, "learning_rate": 0.0003},
    "teacher_sft_examples": 0,
    "student_sft_examples": 512,
    "seed": 0,
}

# name -> (run.json fields, proxy kind, proxy scale, golden offset, golden slope after break)
RUNS = {
    "offline": (dict(regime="offline", num_prompts=64, seed=0), "flatten", 1.0, 0.5, 0.15),
    "offline_s1": (dict(regime="offline", num_prompts=64, seed=1), "flatten", 1.0, 0.5, 0.15),
    "offline_16x4": (
        dict(regime="offline", num_prompts=16, completions_per_prompt=4),
        "flatten",
        1.0,
        0.5,
        0.3,
    ),
    "offline_64x4": (
        dict(regime="offline", num_prompts=64, completions_per_prompt=4),
        "flatten",
        0.8,
        0.4,
        0.1,
    ),
    "mixed10": (
        dict(regime="mixed", num_prompts=64, online_fraction=0.1, online_role="student"),
        "power_law",
        1.0,
        0.5,
        0.0,
    ),
    "online_teacher": (
        dict(regime="online_teacher", online_role="teacher"),
        "power_law",
        1,
        0.5,
        -0.05,
    ),
    "online_student": (dict(regime="online_student"), "power_law", 1.0, 0.5, -0.05),
}
GOLDEN_SE = 0.005
DATA = os.path.join(os.path.dirname(__file__), "data")


def _run_json(name, fields):
    base = dict(
        name=name,
        regime="offline",
        num_prompts=256,
        completions_per_prompt=1,
        online_fraction=0.0,
        online_role="student",
        seed=0,
    )
    return dict(base, **fields)


def _eval_row(step, proxy, proxy_se, golden):
    row = {"step": int(step)}
    for div, factor in (("forward_kl", 1.0), ("reverse_kl", 1.3), ("js", 0.2)):
        for prefix, value, se in (("proxy", proxy, proxy_se), ("golden", golden, GOLDEN_SE)):
            key = f"{prefix}/{div}"
            row.update({key: factor * value, f"{key}_stderr": factor * se})
            row.update({f"{key}_per_token": factor * value / 10, f"{key}_per_token_stderr": 0.01})
    row.update({"guard/statistic": 0.0, "guard/fired": 0.0})
    return row


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference metrics of a fake run: the teacher's level and the oracle's (its
    entropy; a field-mode run logs none)."""

    teacher: float = 5.3
    oracle: float = 5.0


ENTROPY = 5.0  # reference cross-entropy = golden forward KL + this


def _eval_line(row, golden, ref: Reference | None, field: bool):
    """An evaluation row with the reference metrics of `ref` (None: none; golden: the golden
    forward KL of the row); in field mode without its golden keys and oracle level."""
    if field:
        row = {k: v for k, v in row.items() if not k.startswith("golden/")}
    if ref is not None:
        levels = {"cross_entropy": golden + ENTROPY, "teacher_cross_entropy": ref.teacher}
        if not field:
            levels["oracle_cross_entropy"] = ref.oracle
        for name, value in levels.items():
            key = f"reference/{name}"
            row.update({key: value, f"{key}_stderr": GOLDEN_SE})
            row.update({f"{key}_per_token": value / 10, f"{key}_per_token_stderr": 0.001})
    return json.dumps(row) + "\n"


def write_run(workdir, name, spec, seed, complete=True, ref=None, field=False):
    fields, kind, scale, offset, slope = spec
    run_dir = os.path.join(workdir, "runs", name)
    os.makedirs(os.path.join(run_dir, "train"))
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(_run_json(name, fields), f)
    rng = np.random.default_rng(seed)
    steps, proxy, proxy_se = simulate_curve(rng, kind, CurveSpec(noise=0.02))
    x = np.log(steps / (0.4 * steps[-1]))
    golden = offset + 0.2 * np.where(x < 0, x**2, 0.0) + slope * np.maximum(x, 0.0)
    golden = golden + 0.002 * rng.standard_normal(len(steps))
    with open(os.path.join(run_dir, "train", "metrics.jsonl"), "w") as f:
        row = _eval_row(0, 12.0 * scale, 0.2, offset + 2.5)
        f.write(_eval_line(row, offset + 2.5, ref, field))
        for i, step in enumerate(steps):
            f.write(json.dumps({"step": int(step), "train/loss": 1.0 / (i + 1)}) + "\n")
            row = _eval_row(step, scale * proxy[i], scale * proxy_se[i], golden[i])
            f.write(_eval_line(row, golden[i], ref, field))
    if complete:
        with open(os.path.join(run_dir, "COMPLETE.json"), "w") as f:
            json.dump({"fingerprint": "x", "wall_seconds": 125.0}, f)


def make_workdir(path, names=tuple(RUNS), ref=None, refs=None, field=False):
    """ref: the runs' Reference (None: no reference metrics); refs: run name -> Reference
    for the runs whose differs; field: a field-mode workdir."""
    os.makedirs(path, exist_ok=True)
    experiment = dict(EXPERIMENT, mode="field", reference_examples=512) if field else EXPERIMENT
    with open(os.path.join(path, "experiment.json"), "w") as f:
        json.dump(experiment, f)
    for k, name in enumerate(names):
        run_ref = (refs or {}).get(name, ref)
        complete = name != "online_student"
        write_run(path, name, RUNS[name], 20 + k, complete, ref=run_ref, field=field)
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("exp"))
    path = report.write_report([workdir], workdir)
    return workdir, path, open(path).read()


def _rows(text, name):
    """The cells of every table row of run `name`, in the report's order."""
    lines = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def _row(text, name):
    return _rows(text, name)[0]


def test_load_runs_keeps_evaluation_lines(tmp_path):
    workdir = make_workdir(tmp_path / "w", names=("offline", "online_student"))
    runs = report.load_runs([workdir])
    assert [r.name for r in runs] == ["offline", "online_student"]
    offline = runs[0]
    assert offline.steps.tolist() == [0] + list(range(100, 4100, 100))
    assert "train/loss" not in offline.metrics  # training lines are not evaluations
    assert offline.metrics["golden/js_per_token"].shape == (41,)
    assert offline.config["num_prompts"] == 64 and offline.experiment["task"] == "synthetic"
    assert offline.wall_seconds == 125.0 and runs[1].wall_seconds is None
    assert offline.metrics_path.endswith(os.path.join("runs", "offline", "train", "metrics.jsonl"))


def test_analyse_offline_and_online(built):
    workdir = built[0]
    runs = {r.name: r for r in report.load_runs([workdir])}
    a = report.analyse(runs["offline"])
    assert a["u_shape"] and a["verdict"] == "teacher_hacking"
    assert abs(a["golden_min_step"] - 1600) <= 300  # the break of the golden curve
    assert a["golden_rise"] == pytest.approx(a["final_golden"] - a["golden_min"])
    assert a["golden_rise_z"] == pytest.approx(a["golden_rise"] / (np.sqrt(2) * GOLDEN_SE))
    assert a["golden_rise_z"] > 10 and a["proxy_falls_after_golden_min"]
    assert a["lag"] == a["flag_step"] - a["golden_min_step"]
    assert a["start_golden"] == pytest.approx(3.0)  # the step-0 evaluation
    online = report.analyse(runs["online_teacher"])
    assert not online["u_shape"] and online["verdict"] == "healthy"
    assert online["flag_step"] is None and online["golden_min_step"] == 4000
    js = report.analyse(runs["offline"], metric="js")
    assert js["golden_min"] == pytest.approx(0.2 * a["golden_min"])


def test_groups_and_labels(built):
    runs = report.load_runs([built[0]])
    groups, experiments = report.group_runs(runs)
    labels = {g.label: [runs[i].name for i in g.members] for g in groups}
    assert labels == {
        "offline N=64x1": ["offline", "offline_s1"],
        "offline N=16x4": ["offline_16x4"],
        "offline N=64x4": ["offline_64x4"],
        "mixed 10% student N=64x1": ["mixed10"],
        "online_teacher": ["online_teacher"],
        "online_student": ["online_student"],
    }
    assert len(experiments) == 1


def test_report_tables_plots_and_findings(built):
    workdir, path, text = built
    assert path == os.path.join(workdir, "report.md")
    assert "- oracle: `tiny` (d_model=64), logit scale 3.0" in text
    assert "7 runs in 6 groups; run seeds: [0, 1]." in text
    row = _row(text, "offline")
    a = report.analyse(next(r for r in report.load_runs([workdir]) if r.name == "offline"))
    assert row[1:4] == ["offline N=64x1", "offline", "64 prompts x 1"]
    assert row[6] == f"{a['golden_min_step']}: {a['golden_min']:.4g} ± {GOLDEN_SE:.2g}"
    assert row[8:11] == ["n/a"] * 3  # no reference_levels.json in this workdir
    assert row[13:17] == ["yes", "teacher_hacking", str(a["flag_step"]), str(a["lag"])]
    # The oracle-free rule keeps a checkpoint before the flag, near the golden minimum.
    assert row[17] == f"{a['best_step']} ({a['best_golden_excess']:+.3g})"
    assert a["best_step"] < a["flag_step"] and 0 <= a["best_golden_excess"] < a["golden_rise"]
    assert row[18:] == ["2.1 min", "`runs/offline/train/metrics.jsonl`"]
    online = _row(text, "online_student")
    assert online[13:17] == ["no", "healthy", "–", "–"] and online[18] == "incomplete"
    assert "| offline N=64x1 | offline, offline_s1 |" in text
    for k in range(1, 7):
        assert re.search(rf"^{k}\. \*\*.*\*\*: \*\*reproduced\*\*\.", text, re.M), k
    assert "2 of 2 offline runs with one completion per prompt show a U shape (2 of 2 runs" in text
    assert "Flagged: 4 of 4 offline runs, 0 of 2 online runs." in text
    links = re.findall(r"!\[[^]]*\]\((plots/[^)]+\.png)\)", text)
    assert len(links) == 4
    for link in links:
        data = open(os.path.join(workdir, link), "rb").read()
        assert data[:4] == b"\x89PNG" and len(data) > 5000


def test_findings_not_run_and_not_reproduced(tmp_path):
    only_online = make_workdir(tmp_path / "online", names=("online_teacher", "online_student"))
    text = open(report.write_report([only_online], str(tmp_path / "out"), "reverse_kl")).read()
    statuses = re.findall(r"^\d\. \*\*.*\*\*: \*\*([a-z ]+)\*\*", text, re.M)
    assert statuses == ["not run", "reproduced", "not run", "not run", "not run", "not run"]
    assert "`../online/runs/online_teacher/train/metrics.jsonl`" in text  # relative to out_dir
    # An "online" run whose golden turns up: finding 2 is not reproduced.
    bad = make_workdir(tmp_path / "bad", names=("online_teacher",))
    write_run(bad, "online_student", (dict(regime="online_student"), "power_law", 1, 0.5, 0.15), 0)
    text = open(report.write_report([bad], bad)).read()
    assert "**not reproduced**. 1 of 2 online runs" in text
    assert "online_student: golden 3 ->" in text and "(fails)" in text


def test_two_workdirs_same_run_names(tmp_path):
    a = make_workdir(tmp_path / "a", names=("offline",))
    b = make_workdir(tmp_path / "b", names=("offline",))
    out = str(tmp_path / "out")
    text = open(report.write_report([a, b], out)).read()
    assert "| offline @a | offline N=64x1 |" in text and "| offline @b |" in text
    assert "| offline N=64x1 | offline @a, offline @b |" in text  # one group of two seeds


def test_errors(tmp_path):
    with pytest.raises(report.ReportError, match="workdir not found: .*absent"):
        report.load_runs([str(tmp_path / "absent")])
    with pytest.raises(report.ReportError, match=r"no runs found; searched: .*runs/\*/train/"):
        report.load_runs([str(tmp_path)])
    train = tmp_path / "runs" / "r" / "train"
    train.mkdir(parents=True)
    (train / "metrics.jsonl").write_text('{"step": 0, "train/loss": 1.0}\n')
    with pytest.raises(report.ReportError, match="cannot read .*run.json"):
        report.load_runs([str(tmp_path)])
    (train.parent / "run.json").write_text(json.dumps(_run_json("r", {})))
    with pytest.raises(report.ReportError, match="metrics.jsonl: no evaluation lines"):
        report.load_runs([str(tmp_path)])
    (train / "metrics.jsonl").write_text('{"step": 0, "proxy/js": 1.0}\n')
    (run,) = report.load_runs([str(tmp_path)])
    with pytest.raises(report.ReportError, match=r"lacks \['proxy/forward_kl'.*has \['proxy/js'\]"):
        report.analyse(run)
    with pytest.raises(report.ReportError, match="metric='tv'"):
        report.write_report([str(tmp_path)], str(tmp_path), metric="tv")


def test_non_positive_estimate_and_non_primary(tmp_path, monkeypatch):
    workdir = make_workdir(tmp_path / "w", names=("offline",))
    (run,) = report.load_runs([workdir])
    run.metrics["proxy/forward_kl"][5] = -0.01  # a Monte Carlo estimate can dip below 0
    a = report.analyse(run)
    assert a["verdict"] == "invalid" and a["u_shape"] is None
    assert "index 4, step 500, value -0.01" in a["reason"]
    assert a["golden_rise_z"] > 10  # the golden numbers do not need the log-log fit
    monkeypatch.setattr(report, "_is_primary", lambda: False)
    out = tmp_path / "out"
    assert report.write_report([workdir], str(out)) == str(out / "report.md")
    assert not out.exists()  # only process 0 writes


def test_group_labels_stay_unique():
    def run(name, experiment, **fields):
        config = dict(_run_json(name, fields), **fields)
        return report.Run(name, "/w", config, np.arange(2), {}, None, "/m", experiment)

    runs = [
        run("a", {"seed": 0}, regime="online_student"),
        run("b", {"seed": 0}, regime="online_student", num_prompts=8),
        run("c", {"seed": 1}, regime="online_student"),
        run("d", {"seed": 0}, regime="mixed", online_fraction=0.25, online_role="teacher"),
    ]
    groups, experiments = report.group_runs(runs)
    assert experiments == [{"seed": 0}, {"seed": 1}]
    assert [(g.label, g.members) for g in groups] == [
        ("mixed 25% teacher N=256x1 [exp 1]", [3]),
        ("online_student [exp 1]", [0]),
        ("online_student [exp 1] #2", [1]),
        ("online_student [exp 2]", [2]),
    ]


def test_verdict_sees_what_the_guard_saw(built):
    """The oracle-free verdict uses the evaluations from the end of the distillation warmup
    on, without stderrs (as experiment.py's guard does)."""
    run = next(r for r in report.load_runs([built[0]]) if r.name == "offline")
    settings_path = os.path.join(built[0], "runs", "offline", guard.GUARD_FILE)
    # No settings file: every evaluation after step 0, without stderrs.
    every = diagnostics.verdict(run.steps[1:], run.metrics["proxy/forward_kl"][1:])
    assert report.analyse(run)["flag_step"] == every.details["flag_step"] is not None
    with open(settings_path, "w") as f:
        json.dump(guard.guard_settings(1200, "proxy/forward_kl", diagnostics.DetectorConfig()), f)
    a = report.analyse(run)
    keep = run.steps >= 1200
    expected = diagnostics.verdict(run.steps[keep], run.metrics["proxy/forward_kl"][keep])
    assert a["flag_step"] == expected.details["flag_step"] is not None
    assert a["fit"]["n"] == expected.details["fit"]["n"]
    assert a["n_evals"] == 40  # the other statistics keep every evaluation after step 0
    with open(settings_path, "w") as f:
        f.write("{not json")
    with pytest.raises(report.ReportError, match="guard_settings.json: cannot read"):
        report.analyse(run)
    os.remove(settings_path)  # the module's other tests share this workdir


def test_verdict_uses_the_per_prompt_noise_covariance(tmp_path):
    workdir = make_workdir(tmp_path / "w", names=("offline",))
    run = report.load_runs([workdir])[0]
    proxy = run.metrics["proxy/forward_kl"]
    directory = os.path.join(workdir, "runs", "offline", "train", noise.PER_PROMPT_DIR)
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 0.3, 16)
    rows = [v * np.exp(prompt_effect) / np.exp(prompt_effect).mean() for v in proxy]
    for step, row in zip(run.steps, rows, strict=True):
        noise.save_per_prompt(directory, int(step), {"proxy/forward_kl": row})
    a = report.analyse(run)
    cov = noise.log_mean_cov(np.array(rows[1:]))
    expected = diagnostics.verdict(run.steps[1:], proxy[1:], noise_cov=cov)
    assert a["flag_step"] == expected.details["flag_step"]
    assert a["fit"]["residual_scale"] == expected.details["fit"]["residual_scale"]
    os.remove(os.path.join(directory, "step_00000300.npz"))
    a = report.analyse(run)
    assert a["verdict"] == "invalid" and "missing for steps [300]" in a["reason"]


def test_oracle_report_without_reference_metrics_is_unchanged(built):
    """report.md of an oracle-mode workdir without reference metrics is, byte for byte, the
    one the report gave before field mode and reference metrics existed (data/
    oracle_report.md: that code's report of this module's full `make_workdir`), with the
    reference-level columns and section added since (n/a: no reference_levels.json)."""
    workdir, path, _ = built
    with open(os.path.join(DATA, "oracle_report.md"), "rb") as f:
        expected = f.read().replace(b"{WORKDIR}", workdir.encode())
    with open(path, "rb") as f:
        assert f.read() == expected
