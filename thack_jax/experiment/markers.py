"""The completion markers of the workdir's stages: `COMPLETE.json` with the fingerprint of
the configuration a stage ran under, the record of that configuration (so that a changed
one is refused by naming its fields) and the sha256 of the files it left for later stages;
and the one change a finished distillation run takes instead of refusing it: a larger step
budget (`extension`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

from thack_jax.core import storage
from thack_jax.experiment.config import ExperimentMismatchError, diff, to_json
from thack_jax.experiment.config import fingerprint as config_fingerprint


def stage_config(parts: dict, inputs: dict) -> tuple[str, dict]:
    """(fingerprint, JSON record) of a stage's configuration `parts` ({name: value}) and the
    digests of its inputs. The fingerprint hashes the values in order, as it always did,
    so markers written before the record existed still match."""
    return config_fingerprint([*parts.values(), inputs]), to_json(parts) | {"inputs": inputs}


def is_complete(directory: str, fp: str, config: dict | None = None) -> bool:
    """Whether `directory` holds a COMPLETE.json of fingerprint `fp`; another fingerprint is
    refused, naming the fields that differ when the marker recorded its configuration."""
    path = storage.join(directory, "COMPLETE.json")
    if not storage.exists(path):
        return False
    marker = storage.read_json(path)
    stored = marker.get("fingerprint")
    if stored != fp:
        fields = diff(marker["config"], config) if "config" in marker and config else []
        named = (
            "; differing fields:\n  " + "\n  ".join(fields)
            if fields
            else " (the marker predates the record of its fields)"
        )
        raise ExperimentMismatchError(
            f"{path} was written under configuration {stored}, this run is {fp}: the stage "
            f"config changed{named}\nUse a new workdir (or a new run name), or delete "
            f"{path} to redo the stage."
        )
    return True


def mark_complete(directory: str, fp: str, config: dict, **info) -> None:
    record = {"fingerprint": fp, "config": config, **info}
    storage.write_json(storage.join(directory, "COMPLETE.json"), record)


def file_digests(root: str) -> dict[str, str]:
    """{path relative to `root`: sha256} of every file under the folder `root` (but the
    stage's own COMPLETE.json, where a stage's output is its whole folder)."""
    digests = {}
    for name in storage.listdir(root):
        if name == "COMPLETE.json" or storage.is_temporary(name):
            continue  # a killed writer's leftover is no output of the stage
        path = storage.join(root, name)
        if storage.isdir(path):
            digests.update({f"{name}/{k}": v for k, v in file_digests(path).items()})
        else:
            digests[name] = storage.file_digest(path)
    return digests


# A distillation run's record ({run, distill, evaluation, guard_mode, inputs}): the field that
# may grow, and the schedules of training/optim.make_schedule whose learning rate at step t
# does not depend on num_steps (warmup, then constant or T5's rsqrt). 'cosine' decays over
# num_steps: the steps already done had the rates of the shorter run.
BUDGET = ("distill", "num_steps")
STEP_FREE_SCHEDULES = ("constant", "rsqrt")


@dataclasses.dataclass(frozen=True)
class Extension:
    """A finished run whose record differs from this configuration only by a larger step
    budget: it resumes at `resume_step` (its last checkpoint; `old_steps`, or past it when an
    earlier extension was interrupted) and trains to `new_steps`."""

    old_steps: int
    new_steps: int
    resume_step: int
    marker: dict  # the old COMPLETE.json (its wall_seconds are added to the new one's)

    def line(self, run_name: str) -> str:
        """What the runner prints when the extension starts."""
        return (
            f"[thack_jax] run {run_name} extended: {self.old_steps} -> {self.new_steps} steps "
            f"(resuming from step {self.resume_step})"
        )

    def complete_info(self, seconds: float) -> dict:
        """The new COMPLETE.json's extra fields: the wall time of every session of the run,
        and the budgets it was finished at before (`extended_from`, oldest first)."""
        return {
            "wall_seconds": round(self.marker.get("wall_seconds", 0.0) + seconds, 1),
            "extended_from": [*self.marker.get("extended_from", []), self.old_steps],
        }


def budget_change(stored: dict, requested: dict) -> tuple[int, int] | None:
    """(stored, requested) num_steps when the two run records differ in distill.num_steps
    only, else None (equal records, or other fields differ too)."""
    section, field = BUDGET
    old = stored.get(section, {}).get(field)
    new = requested.get(section, {}).get(field)
    if old == new or not isinstance(old, int) or not isinstance(new, int):
        return None
    same_budget = copy.deepcopy(stored)
    same_budget[section][field] = new
    return (old, new) if not diff(same_budget, requested) else None


def extension(
    directory: str,
    fp: str,
    config: dict,
    last_checkpoint: Callable[[], int | None],
    guard_stopped: Callable[[], int | None] = lambda: None,
) -> Extension | None:
    """Whether the finished run in `directory` is to be extended to `config`'s step budget.

    None when there is no COMPLETE.json, when it has fingerprint `fp`, or when more than the
    budget changed (`is_complete` then skips, or refuses naming the fields). When only
    `distill.num_steps` changed, an Extension if it grew, the schedule does not depend on
    num_steps (`STEP_FREE_SCHEDULES`), the guard did not stop the run (`guard_stopped()`: the
    step it stopped at, or None) and the last checkpoint (`last_checkpoint()`) is at the old
    final step or between it and the new one; otherwise ExperimentMismatchError saying why.
    """
    path = storage.join(directory, "COMPLETE.json")
    if not storage.exists(path):
        return None
    marker = storage.read_json(path)
    if marker.get("fingerprint") == fp or "config" not in marker:
        return None
    change = budget_change(marker["config"], config)
    if change is None:
        return None
    old, new = change
    schedule = config["distill"].get("schedule")
    head = (
        f"{path}: only distill.num_steps changed (stored {old}, requested {new}), but the "
        "finished run is not extended: "
    )
    tail = "\nUse a new run name (or workdir), or delete the run's folder to redo it."
    if new < old:
        why = (
            "the budget shrank; a finished run is only extended, never cut back (its "
            f"checkpoints and evaluations go to step {old})"
        )
        raise ExperimentMismatchError(head + why + tail)
    if schedule not in STEP_FREE_SCHEDULES:
        why = (
            f"TrainConfig.schedule={schedule!r} depends on num_steps (it decays over it), so "
            f"its first {old} steps had other learning rates than a {new}-step run's; only "
            f"schedules {list(STEP_FREE_SCHEDULES)} are extended"
        )
        raise ExperimentMismatchError(head + why + tail)
    stopped = guard_stopped()
    if stopped is not None:
        why = (
            f"the hacking guard stopped it at step {stopped} (guard_mode 'stop', guard.json); "
            "an extension would stop again at its first evaluation"
        )
        raise ExperimentMismatchError(head + why + tail)
    resume = last_checkpoint()
    if resume is None:
        why = f"it has no checkpoint left to resume from (its old final step is {old})"
        raise ExperimentMismatchError(head + why + tail)
    if not old <= resume <= new:
        why = (
            f"its last checkpoint is at step {resume}, not at the old final step {old} (nor "
            f"between it and {new}, where an interrupted extension leaves it), so it would not "
            "continue from where it ended"
        )
        raise ExperimentMismatchError(head + why + tail)
    return Extension(old, new, resume, marker)
