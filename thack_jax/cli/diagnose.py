r"""Teacher-hacking verdict of one run from its metrics file (no jax, no tensorflow).

  python launch/diagnose.py --metrics=WORKDIR/metrics.jsonl --plot=curves.png
  python launch/diagnose.py --metrics=curve.csv --proxy_key=proxy --stderr_key=proxy_se
  python launch/diagnose.py --simulate   # the rates table of docs/diagnostics.md

The metrics file is JSONL (one JSON object per line, with the step key and metric keys; lines
without the proxy key are skipped) or, for a name ending in .csv, a CSV with a header. When a
step appears twice (a resumed run), the later line wins.
"""

from __future__ import annotations

import csv
import io
import math
import os
import posixpath

import numpy as np
from absl import app, flags

from thack_jax.cli import common
from thack_jax.core import storage
from thack_jax.hacking import (
    diagnostics,  # noqa: E402
    guard,
    noise,
    simulation,
)
from thack_jax.reporting import plots
from thack_jax.training import metrics_io

AUTO = "auto"
FLAGS = flags.FLAGS
flags.adopt_module_key_flags(common)  # --help lists --verbose
flags.DEFINE_string("metrics", None, "JSONL or CSV metrics file.")
flags.DEFINE_string("step_key", "step", "Key (column) of the training step.")
flags.DEFINE_string("proxy_key", "proxy/forward_kl", "Key of the proxy metric.")
flags.DEFINE_string(
    "stderr_key",
    "",
    "Key of the proxy's standard error, to weight the fit and as the noise floor; 'auto' = "
    "<proxy_key>_stderr if the file has it; '' (default) = none: the noise is estimated from "
    "the scatter around the law. Give stderrs only when evaluations are independent (fresh "
    "prompts each time); this package's evaluator reuses its prompts, so its stderrs measure "
    "the level, not the noise between evaluations (docs/diagnostics.md, section 2).",
)
flags.DEFINE_string(
    "golden_key",
    AUTO,
    "Key of the golden metric; 'auto' = proxy_key with 'proxy/' replaced "
    "by 'golden/' if the file has it; '' = none.",
)
flags.DEFINE_string("golden_stderr_key", AUTO, "Key of its stderr; 'auto' = <golden_key>_stderr.")
flags.DEFINE_string(
    "min_step",
    AUTO,
    "Drop evaluations before this step; 'auto' = the first step the run's guard was fed (the "
    "end of the distillation warmup) when the file is <run>/train/metrics.jsonl of an "
    "experiment (from <run>/guard_settings.json), else 1 (drops the step-0 evaluation).",
)
flags.DEFINE_string("plot", "", "Write the curves to this PNG.")
flags.DEFINE_float("threshold", diagnostics.DetectorConfig.threshold, "Detector threshold.")
flags.DEFINE_integer("patience", diagnostics.DetectorConfig.patience, "Detector patience.")
flags.DEFINE_integer("min_points", diagnostics.DetectorConfig.min_points, "Detector min_points.")
flags.DEFINE_string(
    "per_prompt",
    AUTO,
    "Per-prompt values of every evaluation (a directory of step_*.npz, as the experiment "
    "writes to <run>/train/per_prompt/): the detector then uses the covariance of their "
    "errors across evaluations as its noise (docs/diagnostics.md, section 2); 'auto' = that "
    "directory next to the metrics file when present; '' = off.",
)
flags.DEFINE_bool(
    "noise",
    False,
    "Also measure the evaluation noise from the per-prompt values next to the metrics file "
    "(<run>/train/per_prompt/, written by the experiment) by a bootstrap over prompts, and "
    "the detector's false-alarm rate on pure power laws with that noise (thack_jax/noise.py).",
)
flags.DEFINE_bool("simulate", False, "Print false-positive / detection rates on synthetic curves.")
flags.DEFINE_list("sim_noise", ["0.01", "0.03", "0.05", "0.1", "0.2"], "Noise levels.")
flags.DEFINE_list("sim_points", ["40"], "Evaluations per synthetic curve.")
flags.DEFINE_enum("sim_spacing", "linear", ["linear", "log"], "Evaluation steps: even or log.")
flags.DEFINE_float("sim_break", 0.4, "Break (flatten / rise) at this fraction of the run.")
flags.DEFINE_list("sim_noise_corr", ["0"], "Lag-1 correlations of the evaluation noise.")
flags.DEFINE_bool("sim_give_cov", False, "Add rows where the detector is given the covariance.")
flags.DEFINE_integer("sim_curves", 200, "Synthetic curves per kind and setting.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic curves.")


class DiagnoseError(Exception):
    pass


def read_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs; CSV cells become floats, empty cells are left out."""
    if not storage.exists(path) or storage.isdir(path):
        raise DiagnoseError(f"metrics file not found: {path}")
    rows = []
    try:
        text = storage.read_text(path)
    except UnicodeDecodeError as e:
        raise DiagnoseError(f"{path}: not UTF-8 text ({e})") from None
    with io.StringIO(text, newline="") as f:  # as open(path, newline="") reads it
        if path.lower().endswith(".csv"):
            for line_no, record in enumerate(csv.DictReader(f), start=2):
                try:
                    rows.append((line_no, {k: float(v) for k, v in record.items() if v}))
                except ValueError as e:
                    raise DiagnoseError(f"{path}:{line_no}: not a number: {e}") from None
            return rows
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((line_no, metrics_io.json_object(path, line_no, line)))
            except ValueError as e:
                raise DiagnoseError(str(e)) from None
    return rows


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_key(requested: str, auto: str, columns: set[str], path: str) -> str:
    """The key to use: '' stays '', 'auto' becomes `auto` if present (else ''), an explicit
    key must exist."""
    if requested == AUTO:
        return auto if auto in columns else ""
    if requested and requested not in columns:
        raise DiagnoseError(
            f"column {requested!r} not found in {path}; available columns: {sorted(columns)}"
        )
    return requested


def extract_curves(rows, path: str, first_step: int = 1) -> dict:
    """Arrays (as lists) of the rows that carry the proxy key, sorted by step."""
    columns = {key for _, row in rows for key in row}
    proxy_key = resolve_key(FLAGS.proxy_key, "", columns, path)
    if not proxy_key:
        raise DiagnoseError(f"--proxy_key is empty; available columns: {sorted(columns)}")
    resolve_key(FLAGS.step_key, "", columns, path)
    golden_key = resolve_key(
        FLAGS.golden_key, proxy_key.replace("proxy/", "golden/", 1), columns, path
    )
    keys = {
        "proxy": proxy_key,
        "proxy_stderr": resolve_key(FLAGS.stderr_key, proxy_key + "_stderr", columns, path),
        "golden": golden_key,
        "golden_stderr": golden_key
        and resolve_key(FLAGS.golden_stderr_key, golden_key + "_stderr", columns, path),
    }
    keys = {name: key for name, key in keys.items() if key}
    by_step = {}
    for line_no, row in rows:
        if proxy_key not in row:
            continue
        step = row.get(FLAGS.step_key)
        if not is_number(step):
            raise DiagnoseError(f"{path}:{line_no}: {FLAGS.step_key!r} is {step!r}, not a number")
        if step < first_step:
            continue
        missing = [key for key in keys.values() if key not in row]
        if missing:
            raise DiagnoseError(f"{path}:{line_no}: has {proxy_key!r} but lacks {missing}")
        not_numbers = {key: row[key] for key in keys.values() if not is_number(row[key])}
        if not_numbers:
            raise DiagnoseError(f"{path}:{line_no}: not numbers: {not_numbers}")
        by_step[step] = {name: row[key] for name, key in keys.items()}
    steps = sorted(by_step)
    curves = {name: [by_step[s][name] for s in steps] for name in keys}
    return dict(curves, steps=steps, keys=keys)


def run_simulation() -> None:
    rows = []
    for n_points in FLAGS.sim_points:
        for corr in FLAGS.sim_noise_corr:
            for use_stderr, give_cov in ((True, False), (False, False), (False, True)):
                if give_cov and not FLAGS.sim_give_cov:
                    continue
                spec = simulation.CurveSpec(
                    n_points=int(n_points),
                    spacing=FLAGS.sim_spacing,
                    break_fraction=FLAGS.sim_break,
                    noise_corr=float(corr),
                )
                rows += simulation.simulate_rates(
                    [float(x) for x in FLAGS.sim_noise],
                    spec,
                    n_curves=FLAGS.sim_curves,
                    seed=FLAGS.seed,
                    config=detector_config(),
                    use_stderr=use_stderr,
                    give_cov=give_cov,
                )
    print(simulation.format_rates_table(rows))
    print(
        f"\n({FLAGS.sim_curves} curves per kind and row, seed {FLAGS.seed}, threshold "
        f"{FLAGS.threshold}, patience {FLAGS.patience}; {FLAGS.sim_spacing} spacing; break at "
        f"{FLAGS.sim_break:.0%} of the run.)"
    )


def detector_config() -> diagnostics.DetectorConfig:
    return diagnostics.DetectorConfig(
        threshold=FLAGS.threshold, patience=FLAGS.patience, min_points=FLAGS.min_points
    )


def min_step(path: str) -> int:
    """--min_step, resolving 'auto' from the experiment that wrote `path` (if any)."""
    if FLAGS.min_step != AUTO:
        try:
            return int(FLAGS.min_step)
        except ValueError:
            msg = f"--min_step={FLAGS.min_step!r}: expected an integer or 'auto'"
            raise DiagnoseError(msg) from None
    # An experiment's run: <run>/train/metrics.jsonl next to <run>/guard_settings.json.
    run_dir = _run_dir(path)
    if run_dir is None:
        return 1
    settings = guard.load_guard_settings(storage.join(run_dir, guard.GUARD_FILE))
    return 1 if settings is None else settings["min_step"]


def _run_dir(path: str) -> str | None:
    """<run> of a metrics file <run>/train/<file> (local: symbolic links resolved); None when
    the file is too near the file system's root to have one."""
    if storage.is_remote(path):
        return storage.dirname(storage.dirname(path))
    resolved = os.path.realpath(path)
    train = os.path.dirname(resolved)
    return None if train == os.path.dirname(train) else os.path.dirname(train)


def diagnose(path: str) -> None:
    first_step = min_step(path)
    curves = extract_curves(read_rows(path), path, first_step)
    steps, keys = curves["steps"], curves["keys"]
    if len(steps) < FLAGS.min_points:
        raise DiagnoseError(
            f"{path}: only {len(steps)} evaluations with {keys['proxy']!r} at step >= "
            f"{first_step}; the detector needs at least {FLAGS.min_points} (--min_points)"
        )
    cov, noise_source = per_prompt_cov(path, keys["proxy"], steps)
    result = diagnostics.verdict(
        steps,
        curves["proxy"],
        None if cov is not None else curves.get("proxy_stderr"),
        curves.get("golden"),
        curves.get("golden_stderr"),
        detector_config(),
        noise_cov=cov,
    )
    d = result.details
    fit = d["fit"]
    print(
        f"metrics: {path}: {len(steps)} evaluations of {keys['proxy']}, steps "
        f"{steps[0]:g}..{steps[-1]:g}, noise: {noise_source}"
    )
    print(f"verdict: {result.label}" + (f" ({d['reason']})" if "reason" in d else ""))
    flag = "none" if d["flag_step"] is None else f"{d['flag_step']:g}"
    print(
        f"flag step: {flag} (max statistic {d['max_statistic']:.2f}, threshold "
        f"{FLAGS.threshold}, patience {FLAGS.patience})"
    )
    print(f"best step (oracle-free): {d['best_step']:g}")
    print(
        f"power law: proxy ~ {math.exp(fit['log_a']):.4g} * step^-{fit['b']:.4g} "
        f"(b stderr {fit['b_stderr']:.2g}, residual scale {fit['residual_scale']:.3g}, "
        f"fitted on the first {fit['n']} evaluations)"
    )
    print(
        f"proxy rise above its minimum: z = {d['proxy_rise_z']:.2f} "
        f"(overfitting above {diagnostics.OVERFIT_Z})"
    )
    if "golden" in curves:
        print(
            f"golden ({keys['golden']}): minimum at step {d['golden_min_step']:g}; U shape: "
            f"{'yes' if d['u_shape'] else 'no'} (rise {d['golden_rise']:.4g} +- "
            f"{d['golden_rise_stderr']:.2g})"
            + (f"; lag (flag - golden minimum): {d['lag']:g} steps" if "lag" in d else "")
        )
    if FLAGS.noise:
        report_noise(path, keys["proxy"], first_step)
    if FLAGS.plot:
        run = {k: curves[k] for k in ("steps", "proxy", "proxy_stderr", "golden") if k in curves}
        name = posixpath.splitext(storage.basename(path))[0]
        plots.plot_curves(FLAGS.plot, {name: run}, {name: dict(fit, flag_step=d["flag_step"])})
        print(f"plot: {FLAGS.plot}")


def per_prompt_cov(path: str, key: str, steps) -> tuple[np.ndarray | None, str]:
    """(noise covariance or None, where the noise comes from), per --per_prompt."""
    if FLAGS.per_prompt == "":
        return None, _scatter_or_stderr()
    directory = _per_prompt_dir(path)
    if FLAGS.per_prompt != AUTO:
        directory = FLAGS.per_prompt
    elif not storage.isdir(directory):
        return None, _scatter_or_stderr()
    cov = noise.covariance_at(directory, key, steps)
    return cov, f"covariance of the per-prompt values in {directory}"


def _per_prompt_dir(path: str) -> str:
    """The per-prompt directory beside a metrics file."""
    return storage.join(storage.dirname(path), noise.PER_PROMPT_DIR)


def _scatter_or_stderr() -> str:
    if FLAGS.stderr_key:
        return f"stderrs ({FLAGS.stderr_key})"
    return "estimated from the scatter"


def report_noise(path: str, key: str, first_step: int) -> None:
    summary = noise.summarize(_per_prompt_dir(path), key, first_step, config=detector_config())
    print(
        f"evaluation noise ({len(summary.steps)} evaluations, bootstrap over prompts): sd of "
        f"log {key} {np.median(summary.sd):.3g} (median; {summary.sd.min():.3g} to "
        f"{summary.sd.max():.3g}), lag-1 correlation {summary.lag1_corr:.3f}"
    )
    print(
        "false-alarm rate on pure power laws with this noise (1000 curves): "
        f"{summary.false_alarm_rate:.1%} with its covariance (the default), "
        f"{summary.false_alarm_rate_scatter:.1%} estimating it from the scatter"
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.simulate:
        run_simulation()
        return
    if not FLAGS.metrics:
        raise app.UsageError("--metrics is required (or --simulate)")
    diagnose(FLAGS.metrics)


def run() -> None:
    """Console script `thack-diagnose` (and `python launch/diagnose.py`)."""
    common.run(main, "diagnose.py", (DiagnoseError, *common.EXPECTED_ERRORS))


if __name__ == "__main__":
    run()
