"""Keeping the student the hacking guard may choose, and shipping the run's students.

During a distillation run the guard (`hacking.guard.HackingGuard`) names an oracle-free best
step among the evaluations, usually not one of the checkpoint steps. `StudentSnapshots`
keeps the student params of the evaluations the guard may still choose
(`HackingGuard.candidate_steps()`) as Hugging Face directories under
`<run_dir>/candidates/step_<k>/`; `export_students` writes the final student and the
guard's one to `<run_dir>/export/{final,guard_best}/` (config.json + model.safetensors,
loadable by transformers' `T5ForConditionalGeneration.from_pretrained`, decoder-only:
`LlamaForCausalLM` / `Qwen2ForCausalLM`, and a model card README.md) with a
machine-readable `<run_dir>/export/export.json`.

The wiring (in `distillation.distill`'s eval_fn, after `guard.update`, on every process):

    if step in guard.candidate_steps():
        snapshots.save(step, params)
    snapshots.prune(guard.candidate_steps())

Files go through `core/storage.py` (local or gs://); process 0 writes, every process
gathers the params (`partitioning.to_host` is a collective across processes).

Completeness: a snapshot is complete when its `DONE.json` exists, written after the HF
files (each written atomically); its marker is deleted first whenever a snapshot is
replaced or removed, so a save or a removal killed halfway never leaves a marker beside
partial files (GCS has no folder rename, hence a marker rather than a renamed folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping

import jax

from thack_jax.core import storage
from thack_jax.models import ModelConfig
from thack_jax.models.hf_io import save as save_hf_checkpoint
from thack_jax.parallel import partitioning

CANDIDATES_DIR = "candidates"
EXPORT_DIR = "export"
EXPORT_FILE = "export.json"
CARD_FILE = "README.md"
DONE_FILE = "DONE.json"
HF_FILES = ("config.json", "model.safetensors")  # what save_hf_checkpoint writes
_FAMILY_NAMES = {"t5": "T5", "llama": "decoder-only (Llama)", "qwen2": "decoder-only (Qwen2)"}
_LOADERS = {"t5": "T5ForConditionalGeneration", "llama": "LlamaForCausalLM"}
_LOADERS["qwen2"] = "Qwen2ForCausalLM"
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclasses.dataclass(frozen=True)
class CardInfo:
    """What the model cards say about a run.

    run: the run's name; regime: its data regime (offline, online_teacher, ...);
    teacher: a description of the teacher (size, where it was loaded from);
    num_steps: the run's training steps; metrics: {evaluation step: {metric key: value}},
    the logged evaluations (`proxy/<div>`, `golden/<div>`, each with `<key>_stderr` where
    estimated; other keys are listed as they are); fired_at: the first evaluation step at
    which the guard fired, or None when it never did; family: 't5' or a decoder-only
    family ('llama', 'qwen2'), which the card names with the transformers class to load it.
    """

    run: str
    regime: str
    teacher: str
    num_steps: int
    metrics: Mapping[int, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    fired_at: int | None = None
    family: str = "t5"


def _host(params) -> dict:
    """The params pytree as numpy on every process (a collective when sharded over hosts)."""
    return jax.tree.map(partitioning.to_host, params)


class StudentSnapshots:
    """The student params at chosen evaluations, one HF directory per step, under
    `<run_dir>/candidates/`."""

    def __init__(self, run_dir: str, config: ModelConfig):
        self.directory = storage.join(run_dir, CANDIDATES_DIR)
        self.config = config

    def path(self, step: int) -> str:
        return storage.join(self.directory, f"step_{int(step)}")

    def save(self, step: int, params) -> str:
        """Writes the params of evaluation `step` (a pytree of arrays, maybe sharded) as a
        complete snapshot, replacing any earlier or partial one of that step. Call on every
        process; process 0 writes. Returns the snapshot's folder."""
        host = _host(params)
        path = self.path(step)
        if jax.process_index() != 0:
            return path
        self._remove(path)
        save_hf_checkpoint(path, self.config, host)
        storage.write_json(
            storage.join(path, DONE_FILE), {"step": int(step), "files": list(HF_FILES)}
        )
        return path

    def _all_steps(self) -> list[int]:
        """Steps of every step_<k> folder, complete or not, ascending."""
        found = (_STEP_DIR.fullmatch(name) for name in storage.listdir(self.directory))
        return sorted(int(m.group(1)) for m in found if m is not None)

    def steps(self) -> list[int]:
        """Steps of the complete snapshots (DONE.json present), ascending."""
        return [s for s in self._all_steps() if self.is_complete(s)]

    def is_complete(self, step: int) -> bool:
        return storage.exists(storage.join(self.path(step), DONE_FILE))

    def prune(self, keep) -> list[int]:
        """Removes every snapshot (complete or partial) whose step is not in `keep`; returns
        the removed steps. Process 0 only removes (the others return [])."""
        if jax.process_index() != 0:
            return []
        keep = {int(s) for s in keep}
        removed = [s for s in self._all_steps() if s not in keep]
        for step in removed:
            self._remove(self.path(step))
        return removed

    @staticmethod
    def _remove(path: str) -> None:
        # The marker first: a removal killed halfway leaves an incomplete snapshot.
        storage.remove(storage.join(path, DONE_FILE))
        storage.rmtree(path)


def _split_metrics(metrics: Mapping[str, float]) -> dict[str, list[tuple[str, float, float]]]:
    """{group: [(key, value, stderr or None)]} of one evaluation's metrics; groups 'proxy'
    (`proxy/...`), 'reference' (`reference/...`), 'golden' (`golden/...`) and 'other', keys
    sorted, stderrs paired."""
    groups = {"proxy": [], "reference": [], "golden": [], "other": []}
    for key in sorted(metrics):
        if key.endswith("_stderr") and key[: -len("_stderr")] in metrics:
            continue
        prefix = key.split("/", 1)[0]
        group = prefix if prefix in ("proxy", "reference", "golden") else "other"
        groups[group].append((key, metrics[key], metrics.get(f"{key}_stderr")))
    return groups


_GROUP_TITLES = {
    "proxy": "Proxy metrics (student vs teacher: what the guard watches)",
    "reference": (
        "Reference metrics (cross-entropy of held-out reference responses, nats: the "
        "student's and the reference models' levels; never seen by the guard)"
    ),
    "golden": "Golden metrics (student vs oracle; oracle mode only, never seen by the guard)",
    "other": "Other logged values",
}


def _how_chosen(kind: str, step: int, card: CardInfo) -> str:
    if kind == "final":
        return f"the student at the last training step ({step}), whatever the guard said."
    if card.fired_at is None:
        return (
            "oracle-free: the guard never fired, so the evaluation with the lowest proxy "
            "(docs/diagnostics.md, section 6)."
        )
    return (
        "oracle-free: the last evaluation before the window of evaluations whose proxy first "
        f"deviated from its power law (the guard fired at step {card.fired_at}; "
        "docs/diagnostics.md, section 6)."
    )


def model_card(kind: str, step: int, best_step: int, card: CardInfo) -> str:
    """The README.md (markdown) of an exported student. kind: 'final' or 'guard_best';
    step: the training step of its params; best_step: the guard's best step."""
    if kind not in ("final", "guard_best"):
        raise ValueError(f"model_card kind={kind!r}; expected 'final' or 'guard_best'")
    title = {"final": "final student", "guard_best": "the hacking guard's student"}[kind]
    verdict = (
        "did not fire"
        if card.fired_at is None
        else f"fired at step {card.fired_at} (the proxy departed from its power law)"
    )
    lines = [
        f"# {card.run}: {title} (step {step})",
        "",
        f"A {_FAMILY_NAMES.get(card.family, card.family)} student distilled with thack_jax "
        "(arXiv 2502.02671).",
        "",
        f"- Chosen: {_how_chosen(kind, step, card)}",
        f"- Regime: {card.regime}",
        f"- Teacher: {card.teacher}",
        f"- Steps: {step} of {card.num_steps} training steps",
        f"- Hacking guard: {verdict}; best step {best_step}",
    ]
    metrics = card.metrics.get(step)
    if not metrics:
        lines += ["", f"No evaluation was logged at step {step}."]
    else:
        for group, rows in _split_metrics(metrics).items():
            if not rows:
                continue
            lines += ["", f"## {_GROUP_TITLES[group]}, step {step}", ""]
            lines += ["| metric | value | stderr |", "|---|---|---|"]
            for key, value, stderr in rows:
                shown = "" if stderr is None else f"{stderr:.4g}"
                lines.append(f"| {key} | {value:.4g} | {shown} |")
    lines += [
        "",
        f"Load: `transformers.{_LOADERS.get(card.family, 'AutoModelForCausalLM')}"
        ".from_pretrained(<this folder>)`.",
        "",
    ]
    return "\n".join(lines)


def _write(path: str, data: bytes | str) -> str:
    """Writes `data` atomically; returns its sha256."""
    storage.write_atomic(path, data)
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _copy_snapshot(snapshots: StudentSnapshots, step: int, target: str) -> dict[str, str]:
    """Copies the HF files of snapshot `step` into `target`; {file name: sha256}."""
    storage.makedirs(target)
    source = snapshots.path(step)
    return {
        name: _write(storage.join(target, name), storage.read_bytes(storage.join(source, name)))
        for name in HF_FILES
    }


def export_students(
    run_dir: str,
    *,
    config: ModelConfig,
    final_params,
    final_step: int,
    best_step: int,
    card: CardInfo,
) -> dict:
    """Writes `<run_dir>/export/final/` (final_params) and `<run_dir>/export/guard_best/`
    (the snapshot of best_step from `StudentSnapshots(run_dir, config)`; final_params when
    best_step == final_step and no snapshot of it was kept), each config.json +
    model.safetensors + README.md (`model_card`), then `<run_dir>/export/export.json`, the
    returned summary: {kind: {path (relative to run_dir), step, metrics, files: {name:
    sha256}}, guard: {fired,
    fired_at, best_step}, run, regime}. Call on every process (final_params are gathered);
    process 0 writes, the others return the summary without the `files` digests.

    Raises FileNotFoundError naming the step and the folder when best_step has no complete
    snapshot (and is not final_step), before anything is written.
    """
    final_host = _host(final_params)
    export_dir = storage.join(run_dir, EXPORT_DIR)
    snapshots = StudentSnapshots(run_dir, config)
    steps = {"final": int(final_step), "guard_best": int(best_step)}
    summary = {
        "run": card.run,
        "regime": card.regime,
        "guard": {
            "fired": card.fired_at is not None,
            "fired_at": card.fired_at,
            "best_step": int(best_step),
        },
    }
    for kind, step in steps.items():
        summary[kind] = {
            # Relative to the run's folder: a workdir copied elsewhere stays consistent.
            "path": f"{EXPORT_DIR}/{kind}",
            "step": step,
            "metrics": dict(card.metrics.get(step, {})),
        }
    if jax.process_index() != 0:
        return summary
    best_saved = snapshots.is_complete(best_step)
    if not best_saved and best_step != final_step:
        raise FileNotFoundError(
            f"no complete snapshot of the guard's best step {best_step} in "
            f"{snapshots.directory} (complete: {snapshots.steps()}); it was not saved or "
            "was pruned"
        )
    # A half-redone export must not keep the old summary, which marks an export complete.
    storage.remove(storage.join(export_dir, EXPORT_FILE))
    for kind, step in steps.items():
        target = storage.join(run_dir, summary[kind]["path"])
        if kind == "guard_best" and best_saved:
            files = _copy_snapshot(snapshots, step, target)
        else:
            save_hf_checkpoint(target, config, final_host)
            files = {name: storage.file_digest(storage.join(target, name)) for name in HF_FILES}
        readme = model_card(kind, step, int(best_step), card)
        files[CARD_FILE] = _write(storage.join(target, CARD_FILE), readme)
        summary[kind]["files"] = files
    storage.write_json(storage.join(export_dir, EXPORT_FILE), summary)
    return summary
