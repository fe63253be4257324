"""Tests of reporting.findings and report_text: the decisions of the six findings, from
hand-made analyses (no files, no plots), in oracle and field mode."""

import numpy as np
import pytest

from thack_jax.reporting import findings, report, report_text


def _run(name, regime="offline", seed=0, **fields):
    config = dict(
        name=name,
        regime=regime,
        num_prompts=64,
        completions_per_prompt=1,
        online_fraction=0.0,
        online_role="student",
        seed=seed,
    )
    config.update(fields)
    return report.Run(name, "/w", config, np.arange(3), {}, None, f"/w/{name}.jsonl", {})


def _a(rise=0.0, final_golden=0.5, final_proxy=0.2, u=False, flag=None, se=0.01):
    return dict(
        golden_rise=rise,
        golden_rise_z=rise / se,
        final_golden=final_golden,
        final_proxy=final_proxy,
        u_shape=u,
        flag_step=flag,
        lag=None if flag is None else flag - 1000,
        start_golden=3.0,
        start_proxy=10.0,
        golden_min=final_golden - rise,
        golden_min_step=1000,
        proxy_at_golden_min=0.3,
    )


def _findings(*pairs):
    runs = [r for r, _ in pairs]
    groups, _ = report.group_runs(runs)
    labels = [r.name for r in runs]
    out = findings.findings(runs, labels, [a for _, a in pairs], groups)
    return [(f.status, f.text) for f in out]


HACKED = _a(rise=0.1, u=True, flag=1500)


def test_all_reproduced_and_not_run():
    f = _findings(
        (_run("off"), HACKED),
        (_run("off_s1", seed=1), _a(rise=0.12, u=True, flag=1600)),
        (_run("on", "online_student"), _a()),
    )
    assert [s for s, _ in f] == [True, True, None, None, None, True]
    assert f[0][1].startswith("2 of 2 offline runs with one completion per prompt show a U shape.")
    assert "off: step 1500 (lag 500); off_s1: step 1600 (lag 600)" in f[5][1]
    assert f[2][1] == "Needs a mixed run and an offline run of the same experiment."


def test_not_reproduced():
    f = _findings(
        (_run("off"), HACKED),
        (_run("off_no_u", num_prompts=32), _a(rise=0.01)),
        (_run("off_flat", num_prompts=16, completions_per_prompt=4), _a(rise=0.05)),
        (_run("off_more", completions_per_prompt=4), _a(rise=0.1, final_golden=0.6)),
        (_run("mix", "mixed", online_fraction=0.1), _a(rise=0.2)),
        (_run("on", "online_teacher"), _a(rise=0.05, flag=2000)),
    )
    assert [s for s, _ in f] == [False, False, False, False, False, False]
    # Finding 1 is decided by the one-completion runs; the others are only reported.
    assert (
        "1 of 2 offline runs with one completion per prompt show a U shape "
        "(0 of 2 runs with more completions per prompt do)" in f[0][1]
    )
    assert "on: golden 3 -> 0.5, rise after its minimum 5.0 se" in f[1][1]
    # The mixed run is compared with the offline run of its own offline data (64x1).
    assert (
        "mixed 10% student N=64x1: golden rise 0.2 (20.0 se) vs 0.1 for offline N=64x1" in f[2][1]
    )
    assert "offline N=64x1: rise 0.1, offline N=16x4: rise 0.05" in f[3][1]
    assert "offline N=64x1: final proxy 0.2, golden 0.5, offline N=64x4: final proxy 0.2" in f[4][1]
    assert "Flagged: 1 of 4 offline runs, 1 of 1 online runs." in f[5][1]


def test_mixed_reference_falls_back_to_all_offline():
    f = _findings(
        (_run("off", num_prompts=128), HACKED),
        (_run("mix", "mixed", online_fraction=0.1), _a(rise=0.01)),
    )
    assert f[2][0] is True
    assert "0.01 (1.0 se) vs 0.1 for offline N=128x1" in f[2][1]


def test_group_stats_are_means_over_seeds():
    runs = [_run("a"), _run("b", seed=1), _run("c", seed=2)]
    analyses = [_a(rise=0.1, u=True, flag=1), _a(rise=0.2), _a(rise=0.3, u=True)]
    (group,), _ = report.group_runs(runs)
    s = findings.group_stats(group, [findings.golden_view(a) for a in analyses])
    assert s["rise"] == pytest.approx(0.2) and (s["rise_min"], s["rise_max"]) == (0.1, 0.3)
    assert (s["n"], s["u"], s["flagged"]) == (3, 2, 1)


def test_report_runs_checks_one_label_and_analysis_per_run():
    runs = [_run("a"), _run("b", seed=1)]
    groups, experiments = report.group_runs(runs)
    ok = report_text.ReportRuns(runs, ["a", "b"], [_a(), _a()], groups, experiments)
    assert ok.labels == ["a", "b"]
    with pytest.raises(ValueError, match="2 runs but 1 labels and 2 analyses"):
        report_text.ReportRuns(runs, ["a"], [_a(), _a()], groups, experiments)
    with pytest.raises(ValueError, match=r"members \[1\] not in 0..0"):
        report_text.ReportRuns(runs[:1], ["a"], [_a()], groups, experiments)


# ------------------------------------------------------------------------------ field mode
def _field(a, ref=None):
    """A field-mode analysis: `a`'s proxy and flag, no golden values, `ref`'s reference view
    (an oracle-mode `_a` dict read as the reference cross-entropy) or none."""
    out = {k: a[k] for k in ("start_proxy", "final_proxy", "flag_step")}
    if ref is not None:
        keys = {"start": "start_golden", "min_step": "golden_min_step", "min": "golden_min"}
        keys.update(final="final_golden", rise="golden_rise", rise_z="golden_rise_z")
        keys.update(u_shape="u_shape", proxy_at_min="proxy_at_golden_min", lag="lag")
        ref = {k: ref[v] for k, v in keys.items()}
    return dict(out, mode="field", reference=ref)


def _field_findings(*pairs):
    runs = [r for r, _ in pairs]
    groups, _ = report.group_runs(runs)
    return findings.findings(runs, [r.name for r in runs], [a for _, a in pairs], groups)


def test_field_mode_decides_on_the_reference_cross_entropy():
    out = _field_findings(
        (_run("off"), _field(HACKED, HACKED)),
        (_run("off_s1", seed=1), _field(HACKED, _a(rise=0.01, flag=1500))),
        (_run("on", "online_student"), _field(_a(), _a())),
    )
    assert [f.status for f in out] == [False, True, None, None, None, True]
    assert out[0].label == "not reproduced on the reference cross-entropy"
    assert out[0].title == (
        "Offline, many epochs: proxy falls, reference cross-entropy falls then rises (U shape)"
    )
    assert out[0].text.startswith(
        "Field mode: no oracle to measure it against; decided on the reference cross-entropy. "
        "1 of 2 offline runs with one completion per prompt show a U shape. off: reference "
        "cross-entropy 0.4 at step 1000"
    )
    assert out[2].label == "not run on the reference cross-entropy"
    assert "off: step 1500 (lag 500); off_s1: step 1500 (lag 500)" in out[5].text
    assert out[5].label == "reproduced"
    assert not any("golden" in f.title + f.text + f.label for f in out)


def test_field_mode_without_reference_metrics():
    """Findings 1-5 are not measurable; 6 counts flags without lags; runs without reference
    metrics are left out of findings 1-5 when others have them."""
    out = _field_findings(
        (_run("off"), _field(HACKED)), (_run("on", "online_student"), _field(_a()))
    )
    assert [f.label for f in out] == [findings.NO_ORACLE] * 5 + ["reproduced"]
    assert all(f.status is None for f in out[:5])
    assert "which these runs did not log" in out[0].text
    assert out[5].text == "Flagged: 1 of 1 offline runs, 0 of 1 online runs. off: step 1500."
    mixed = _field_findings(
        (_run("off"), _field(HACKED, HACKED)),
        (_run("off_old", seed=1), _field(HACKED)),
        (_run("on", "online_student"), _field(_a(), _a())),
    )
    assert "reference cross-entropy (1 runs without it left out). 1 of 1 offline" in mixed[0].text
    assert mixed[5].text.endswith("off: step 1500 (lag 500); off_old: step 1500.")


def test_a_field_run_puts_the_whole_report_in_field_mode():
    out = _field_findings((_run("off"), HACKED), (_run("off_f", seed=1), _field(HACKED, HACKED)))
    assert out[0].label == "reproduced on the reference cross-entropy"
    assert "(1 runs without it left out)" in out[0].text
