"""The reference metric checked against the golden one, in the oracle world.

Field mode measures a student by its cross-entropy of the task's references,
E_y[-log q(y|x)] = KL(data || q) + H(data): the forward KL to the data distribution up to a
constant. In oracle mode the references are oracle samples (`eval_references.npy`, drawn on a
stream of their own), so

    reference/cross_entropy - reference/oracle_cross_entropy

(the student's and the oracle's negative log-likelihood of the same references) estimates
golden/forward_kl, which the evaluator measures on other oracle samples (with the
Rao-Blackwellised estimator by default). Both are means over the same held-out prompts,
so their difference is judged prompt by prompt: d_i = (ce_i - h_i) - g_i from the
per-prompt values of `train/per_prompt/step_*.npz`, mean(d) +- its standard error. |z| < 2
at an evaluation is agreement within error bars.

numpy + matplotlib only (no jax).
"""

from __future__ import annotations

import numpy as np

from thack_jax.core import storage
from thack_jax.hacking import noise
from thack_jax.reporting import plots

CE = "reference/cross_entropy"
ORACLE_CE = "reference/oracle_cross_entropy"
GOLDEN = "golden/forward_kl"


def run_agreement(run_dir: str) -> list[dict]:
    """One row per evaluation of the run at `run_dir` (runs/<name>): step, golden +- se,
    reference CE - oracle CE +- se, their paired difference +- se and its z-score."""
    directory = storage.join(run_dir, "train", noise.PER_PROMPT_DIR)
    if not storage.isdir(directory):
        raise ValueError(f"{directory} is missing: the run saved no per-prompt values")
    rows = []
    for step in _steps(directory):
        values = noise.read_per_prompt(directory, step)
        missing = [k for k in (CE, ORACLE_CE, GOLDEN) if k not in values]
        if missing:
            raise ValueError(
                f"{directory}: step {step} has no {missing} (needs an oracle-mode run evaluated "
                "with references; keys present: " + ", ".join(sorted(values)) + ")"
            )
        golden, reference = values[GOLDEN], values[CE] - values[ORACLE_CE]
        d = reference - golden
        n = len(d)
        se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        rows.append(
            {
                "step": step,
                "golden": float(golden.mean()),
                "golden_stderr": _se(golden),
                "reference": float(reference.mean()),
                "reference_stderr": _se(reference),
                "difference": float(d.mean()),
                "difference_stderr": se,
                "z": float(d.mean() / se) if se > 0 else float("nan"),
            }
        )
    return rows


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _steps(directory: str) -> list[int]:
    names = [n for n in storage.listdir(directory) if noise._FILE.fullmatch(n)]
    return sorted(int(noise._FILE.fullmatch(n).group(1)) for n in names)


def agreement(workdir: str) -> dict[str, list[dict]]:
    """{run name: `run_agreement` rows} for every run of an experiment workdir."""
    runs_dir = storage.join(workdir, "runs")
    if not storage.isdir(runs_dir):
        raise ValueError(f"{runs_dir} is missing: not an experiment workdir")
    return {
        name: run_agreement(storage.join(runs_dir, name))
        for name in sorted(storage.listdir(runs_dir))
        if storage.isdir(storage.join(runs_dir, name, "train"))
    }


def summary_line(result: dict[str, list[dict]]) -> str:
    """'k of n evaluations within 2 stderr (max |z| ...)'."""
    zs = np.array([abs(r["z"]) for rows in result.values() for r in rows])
    if zs.size == 0:
        return "no evaluations"
    return (
        f"{int((zs < 2).sum())} of {zs.size} evaluations within 2 standard errors, "
        f"{int((zs < 3).sum())} within 3 (max |z| {zs.max():.2f}, median {np.median(zs):.2f})"
    )


def render(result: dict[str, list[dict]], source: str) -> str:
    """The markdown table of `agreement`."""
    lines = [
        "# Reference metric vs golden forward KL (oracle world)",
        "",
        f"Source: `{source}`. Reference CE - oracle CE (same oracle-sampled references) vs "
        "golden/forward_kl (the evaluator's own oracle samples), nats per response; "
        "difference paired over prompts.",
        "",
        summary_line(result),
        "",
        "| run | step | golden fKL | ref CE - oracle CE | difference | z |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, rows in result.items():
        for r in rows:
            lines.append(
                f"| {name} | {r['step']} | {r['golden']:.3f} +- {r['golden_stderr']:.3f} | "
                f"{r['reference']:.3f} +- {r['reference_stderr']:.3f} | "
                f"{r['difference']:+.3f} +- {r['difference_stderr']:.3f} | {r['z']:+.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(path_png: str, result: dict[str, list[dict]]) -> None:
    """Golden forward KL and reference CE - oracle CE vs step, one panel per run."""
    fig, axes = plots._figure(len(result))
    for ax, (name, rows) in zip(axes, result.items(), strict=True):
        steps = np.array([max(r["step"], 1) for r in rows])
        for key, label, color in (
            ("golden", "golden forward KL", "tab:red"),
            ("reference", "reference CE - oracle CE", "tab:blue"),
        ):
            mean = np.array([r[key] for r in rows])
            se = np.array([r[f"{key}_stderr"] for r in rows])
            ax.plot(steps, mean, color=color, label=label)
            ax.fill_between(steps, mean - 2 * se, mean + 2 * se, color=color, alpha=0.2)
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("nats per response")
        ax.legend(fontsize=8)
    plots._save(fig, path_png)


def write(workdir: str, out_dir: str) -> str:
    """Writes reference_check.{md,json,png} of `workdir` into `out_dir`; returns the .md path."""
    result = agreement(workdir)
    storage.makedirs(out_dir)
    storage.write_json(storage.join(out_dir, "reference_check.json"), result)
    plot(storage.join(out_dir, "reference_check.png"), result)
    path = storage.join(out_dir, "reference_check.md")
    storage.write_atomic(path, render(result, workdir).encode())
    return path
