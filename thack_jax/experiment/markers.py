"""The completion markers of the workdir's stages: `COMPLETE.json` with the fingerprint of
the configuration a stage ran under, the record of that configuration (so that a changed
one is refused by naming its fields) and the sha256 of the files it left for later stages.
"""

from __future__ import annotations

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
