"""Runs launch/diagnose.py in a subprocess on JSONL and CSV files written here."""

import csv
import json

import numpy as np
import pytest
from _cli_common import run_light_script

from thack_jax.hacking import diagnostics as d
from thack_jax.hacking import guard as g
from thack_jax.hacking.simulation import CurveSpec, simulate_curve


def _run(*args):
    return run_light_script("diagnose", *args, timeout=120)


def _write_jsonl(path, steps, proxy, proxy_se, golden=None):
    with open(path, "w") as f:
        # A step-0 evaluation before distillation (dropped by --min_step=1), without golden.
        f.write(json.dumps({"step": 0, "proxy/forward_kl": 9.0, "proxy/forward_kl_stderr": 0.1}))
        f.write("\n\n")
        for i, step in enumerate(steps):
            f.write(json.dumps({"step": int(step), "train/loss": 1.0}) + "\n")  # skipped
            row = {"step": int(step), "proxy/forward_kl": proxy[i]}
            row["proxy/forward_kl_stderr"] = proxy_se[i]
            if golden is not None:
                row.update({"golden/forward_kl": golden[i], "golden/forward_kl_stderr": 0.005})
            if i == 20:  # a resumed run evaluated step 2100 twice: the later line wins
                f.write(json.dumps(dict(row, **{"proxy/forward_kl": 100.0})) + "\n")
            f.write(json.dumps(row) + "\n")


def test_jsonl_teacher_hacking_with_golden_and_plot(tmp_path):
    steps, proxy, proxy_se = simulate_curve(
        np.random.default_rng(0), "flatten", CurveSpec(noise=0.02)
    )
    x = np.log(steps / (0.4 * steps[-1]))
    golden = 0.5 + 0.2 * np.where(x < 0, x**2, 0.0) + 0.15 * np.maximum(x, 0.0)
    metrics = tmp_path / "metrics.jsonl"
    _write_jsonl(metrics, steps, proxy, proxy_se, golden)
    result = _run(f"--metrics={metrics}", f"--plot={tmp_path / 'curves.png'}")
    assert result.returncode == 0, result.stdout + result.stderr
    # By default the stderrs are not used (this package's evaluations share their prompts).
    expected = d.verdict(steps, proxy, None, golden, np.full(40, 0.005))
    out = result.stdout
    assert "40 evaluations of proxy/forward_kl" in out
    assert "noise: estimated from the scatter" in out
    assert "verdict: teacher_hacking" in out
    assert f"flag step: {expected.details['flag_step']} " in out
    assert f"best step (oracle-free): {expected.details['best_step']}\n" in out
    assert (
        "U shape: yes" in out and f"lag (flag - golden minimum): {expected.details['lag']}" in out
    )
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # --stderr_key=auto weights the fit by <proxy_key>_stderr.
    result = _run(f"--metrics={metrics}", "--stderr_key=auto")
    expected = d.verdict(steps, proxy, proxy_se, golden, np.full(40, 0.005))
    assert "noise: stderrs (auto)" in result.stdout
    assert f"flag step: {expected.details['flag_step']} " in result.stdout


def test_min_step_auto_reads_the_guard_settings(tmp_path):
    steps, proxy, proxy_se = simulate_curve(
        np.random.default_rng(3), "power_law", CurveSpec(noise=0.02)
    )
    run = tmp_path / "runs" / "offline"
    (run / "train").mkdir(parents=True)
    _write_jsonl(run / "train" / "metrics.jsonl", steps, proxy, proxy_se)
    settings = g.guard_settings(1000, "proxy/forward_kl", d.DetectorConfig())
    (run / g.GUARD_FILE).write_text(json.dumps(settings))
    result = _run(f"--metrics={run / 'train' / 'metrics.jsonl'}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "31 evaluations of proxy/forward_kl, steps 1000..4000" in result.stdout
    result = _run(f"--metrics={run / 'train' / 'metrics.jsonl'}", "--min_step=1")
    assert "40 evaluations of proxy/forward_kl, steps 100..4000" in result.stdout
    (run / g.GUARD_FILE).write_text(json.dumps({"min_step": 0}))
    result = _run(f"--metrics={run / 'train' / 'metrics.jsonl'}")
    assert result.returncode == 1
    assert f"{run / g.GUARD_FILE}: 'min_step' is 0, expected an integer >= 1" in result.stderr


def test_csv_healthy(tmp_path):
    steps, proxy, proxy_se = simulate_curve(
        np.random.default_rng(1), "power_law", CurveSpec(noise=0.03)
    )
    path = tmp_path / "curve.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "proxy", "proxy_se"])
        writer.writerows(zip(steps, proxy, proxy_se, strict=True))
    result = _run(f"--metrics={path}", "--proxy_key=proxy", "--stderr_key=proxy_se")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict: healthy" in result.stdout and "flag step: none" in result.stdout
    assert "step^-0.5" in result.stdout  # the fitted exponent
    # Without the stderr column the noise is estimated from the residuals.
    result = _run(f"--metrics={path}", "--proxy_key=proxy")
    assert "noise: estimated from the scatter" in result.stdout
    assert "verdict: healthy" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metrics={dir}/absent.jsonl"], "metrics file not found: {dir}/absent.jsonl"),
        (
            ["--metrics={dir}/m.jsonl", "--proxy_key=proxy/js"],
            "column 'proxy/js' not found in {dir}/m.jsonl; available columns: ['proxy/forward_kl'",
        ),
        (
            ["--metrics={dir}/m.jsonl", "--golden_key=golden/js"],
            "column 'golden/js' not found",
        ),
        (["--metrics={dir}/m.jsonl", "--min_step=600"], "only 5 evaluations"),
        (["--metrics={dir}/m.jsonl", "--min_step=soon"], "--min_step='soon': expected"),
        (["--metrics={dir}/bad.jsonl"], "bad.jsonl:2: not a JSON line"),
    ],
)
def test_errors(tmp_path, args, message):
    steps, proxy, proxy_se = simulate_curve(np.random.default_rng(2), spec=CurveSpec(n_points=10))
    _write_jsonl(tmp_path / "m.jsonl", steps, proxy, proxy_se)
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{"step": \n')
    result = _run(*[a.format(dir=tmp_path) for a in args])
    assert result.returncode == 1, result.stdout + result.stderr
    assert message.format(dir=tmp_path) in result.stderr
    assert "imported:" not in result.stdout


def test_simulate_prints_table():
    result = _run("--simulate", "--sim_curves=5", "--sim_noise=0.03", "--sim_points=20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| 20 | linear | 0.03 | 0 | yes |" in result.stdout
    assert "| 20 | linear | 0.03 | 0 | no |" in result.stdout
    result = _run(
        "--simulate",
        "--sim_curves=5",
        "--sim_noise=0.03",
        "--sim_points=20",
        "--sim_spacing=log",
        "--sim_break=0.1",
        "--sim_noise_corr=0.5",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| 20 | log | 0.03 | 0.5 | no |" in result.stdout and "break at 10%" in result.stdout


def test_noise_from_per_prompt_values(tmp_path):
    from thack_jax.hacking import noise

    steps, proxy, proxy_se = simulate_curve(
        np.random.default_rng(4), "power_law", CurveSpec(noise=0.02)
    )
    train = tmp_path / "train"
    train.mkdir()
    _write_jsonl(train / "metrics.jsonl", steps, proxy, proxy_se)
    rng = np.random.default_rng(5)
    prompt_effect = rng.normal(0, 0.3, 64)  # shared by every evaluation
    for step, value in zip(steps, proxy, strict=True):
        row = value * np.exp(prompt_effect + 0.01 * rng.standard_normal(64))
        noise.save_per_prompt(str(train / "per_prompt"), int(step), {"proxy/forward_kl": row})
    result = _run(f"--metrics={train / 'metrics.jsonl'}", "--noise")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "evaluation noise (40 evaluations, bootstrap over prompts)" in result.stdout
    corr = float(result.stdout.split("lag-1 correlation ")[1].split()[0])
    assert corr > 0.9
    assert "noise: covariance of the per-prompt values in" in result.stdout
    assert "false-alarm rate on pure power laws with this noise (1000 curves):" in result.stdout
    # --per_prompt='' falls back to the scatter.
    result = _run(f"--metrics={train / 'metrics.jsonl'}", "--per_prompt=")
    assert "noise: estimated from the scatter" in result.stdout
    (tmp_path / "bare").mkdir()
    _write_jsonl(tmp_path / "bare" / "metrics.jsonl", steps, proxy, proxy_se)
    result = _run(f"--metrics={tmp_path / 'bare' / 'metrics.jsonl'}", "--noise")
    assert result.returncode == 1 and "no per-prompt evaluations" in result.stderr
