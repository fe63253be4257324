"""Formatting shared by the parts of report.md: numbers, paths, a run's data, the
experiment's lines and its world-0 form (numpy only)."""

from __future__ import annotations

import copy
import os
import posixpath

import numpy as np

from thack_jax.core import storage


def g(value) -> str:
    """4 significant digits; "–" for None."""
    return "–" if value is None else f"{value:.4g}"


def pm(value, se) -> str:
    return f"{value:.4g} ± {se:.2g}"


def wall(seconds) -> str:
    if seconds is None:
        return "incomplete"
    if not np.isfinite(seconds):
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def relative(path: str, start: str) -> str:
    """`path` as the report names it from `start` (its folder): relative when both are
    local or both in the same bucket, else in full (a local report of a gs:// workdir)."""
    if not storage.is_remote(path) and not storage.is_remote(start):
        return os.path.relpath(path, start)
    (scheme, _, rest), (start_scheme, _, start_rest) = path.partition("://"), start.partition("://")
    bucket, _, key = rest.partition("/")
    start_bucket, _, start_key = start_rest.partition("/")
    if (scheme, bucket) != (start_scheme, start_bucket) or not storage.is_remote(start):
        return path
    return posixpath.relpath("/" + key, "/" + start_key)


def data(cfg: dict) -> str:
    """What a run (run.json) distils on."""
    offline = f"{cfg['num_prompts']} prompts x {cfg['completions_per_prompt']}"
    if cfg["regime"] == "offline":
        return offline
    if cfg["regime"] == "mixed":
        return f"{offline} + {100 * cfg['online_fraction']:g}% online {cfg['online_role']}"
    return f"fresh {cfg['regime'].removeprefix('online_')} samples per batch"


# experiment.json of a world > 0 (experiment/worlds.py, which imports these two): {dotted
# path of a seed: its base value}, from which `pooled_experiment` recovers world 0's record.
WORLD_BASE_KEY = "world_base_seeds"


def pooled_experiment(experiment: dict) -> dict:
    """The experiment.json of world 0 of the experiment that `experiment` (an experiment.json
    dict) belongs to: no `world`, its seeds back at their base values. A dict without
    `world` (world 0, or written before worlds existed) is returned as it is."""
    if "world" not in experiment:
        return experiment
    out = copy.deepcopy({k: v for k, v in experiment.items() if k not in ("world", WORLD_BASE_KEY)})
    for path, value in (experiment.get(WORLD_BASE_KEY) or {}).items():
        *parents, last = path.split(".")
        record = out
        for key in parents:
            record = record.get(key) if isinstance(record, dict) else None
        if isinstance(record, dict) and last in record:
            record[last] = value
    return out


def experiment_lines(exp: dict) -> list[str]:
    """The models, data and SFTs of an experiment.json (field mode: no oracle; the SFTs
    train on the task's references)."""
    if not exp:
        return ["- experiment.json: not found"]
    field = exp.get("mode") == "field"

    def spec(role):
        s = exp.get(role) or {}
        text = f"`{s.get('size', '?')}`"
        if s.get("overrides"):
            text += " (" + ", ".join(f"{k}={v}" for k, v in dict(s["overrides"]).items()) + ")"
        return text + (f" from `{s['checkpoint']}`" if s.get("checkpoint") else "")

    def sft(key, examples):
        t = exp.get(key) or {}
        if field and t.get("num_steps") == 0:
            return "no SFT (used as loaded)"
        n = exp.get(examples) or "all"
        return f"SFT {t.get('num_steps')} steps, batch {t.get('batch_size')}, lr " + (
            f"{t.get('learning_rate')}, on {n} {'reference' if field else 'oracle'} examples"
        )

    options = f", options {dict(exp['task_options'])}" if exp.get("task_options") else ""
    if field:
        oracle = (
            "- oracle: none (field mode: no oracle); the task's references: "
            f"{exp.get('reference_examples')} examples"
        )
    else:
        oracle = (
            f"- oracle: {spec('oracle')}, logit scale {exp.get('oracle_logit_scale')}; oracle "
            f"data: {exp.get('oracle_data_prompts')} prompts"
        )
    return [
        f"- task: `{exp.get('task')}` (inputs {exp.get('max_input_length')} tokens, targets "
        f"{exp.get('max_target_length')}{options})",
        oracle,
        f"- teacher: {spec('teacher')}; {sft('teacher_sft', 'teacher_sft_examples')}",
        f"- student: {spec('student')}; {sft('student_sft', 'student_sft_examples')}",
        f"- experiment seed: {exp.get('seed')}",
    ]
