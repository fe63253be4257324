"""Integrity of a complete offline store: overwritten rows, edited manifest checksums and
damaged files are refused, naming the file (and the array); opening verifies by default."""

import json
import os

import numpy as np
import pytest
from test_offline_store import _generate, _prompts, _silent, _spec

from thack_jax.data.offline_store import OfflineStore, StoreIntegrityError


@pytest.fixture
def store_dir(tmp_path):
    d = str(tmp_path / "store")
    OfflineStore.create_or_open(d, _spec(), _prompts()).fill(_generate, 4, progress=_silent)
    return d


def _edit_manifest(d, edit):
    path = os.path.join(d, "manifest.json")
    manifest = json.load(open(path))
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def _flip(digest: str) -> str:
    """The digest with its first hex digit changed."""
    return ("1" if digest[0] == "0" else "0") + digest[1:]


def _refused(d, match):
    """Both entry points refuse the store by default (the sft and regimes paths)."""
    for open_store in (
        lambda: OfflineStore.open(d),
        lambda: OfflineStore.create_or_open(d, _spec()),
    ):
        with pytest.raises(StoreIntegrityError, match=match):
            open_store()


def test_intact_store_opens_by_default(store_dir):
    assert OfflineStore.open(store_dir).is_complete
    assert OfflineStore.create_or_open(store_dir, _spec(), _prompts()).is_complete


@pytest.mark.parametrize("name", ["targets", "inputs"])
def test_overwritten_rows_are_refused(store_dir, name):
    arr = np.load(os.path.join(store_dir, f"{name}.npy"), mmap_mode="r+")
    arr[5:7] = 0  # two rows overwritten, shapes unchanged
    arr.flush()
    del arr
    _refused(store_dir, rf"{name}\.npy: the {name} array's sha256 [0-9a-f]+ differs")
    assert OfflineStore.open(store_dir, verify_checksums=False).is_complete  # opt-out


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["checksums"].update(targets="0" * 64), "the targets array's sha256"),
        (lambda m: m["checksums"].update(inputs=_flip(m["checksums"]["inputs"])), "inputs"),
        (lambda m: m["checksums"].pop("targets"), r"no valid sha256 of targets\.npy \(None\)"),
        (lambda m: m.update(checksums=None), r"no valid sha256 of inputs\.npy"),
        (lambda m: m["checksums"].update(targets=""), r"no valid sha256 of targets\.npy \(''\)"),
    ],
    ids=["zeroed", "edited", "entry_removed", "all_removed", "emptied"],
)
def test_edited_manifest_checksums_are_refused(store_dir, edit, match):
    _edit_manifest(store_dir, edit)
    _refused(store_dir, match)
    with pytest.raises(StoreIntegrityError, match="manifest.json|sha256"):
        OfflineStore.open(store_dir)


def test_damaged_manifest_names_the_file(store_dir):
    path = os.path.join(store_dir, "manifest.json")
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"manifest\.json: not valid JSON"):
        OfflineStore.open(store_dir)
    _edit_manifest_text(path, json.dumps({"format_version": 1, "spec": {}}))
    with pytest.raises(ValueError, match=r"manifest\.json: lacks \['arrays'"):
        OfflineStore.open(store_dir)


def _edit_manifest_text(path, text):
    with open(path, "w") as f:
        f.write(text)


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_damaged_npy_names_the_file(store_dir, damage):
    path = os.path.join(store_dir, "targets.npy")
    data = open(path, "rb").read()
    data = b"garbage!" + data[8:] if damage == "header" else data[: len(data) - 10]
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match=r"targets\.npy: not a readable \.npy array"):
        OfflineStore.open(store_dir, verify_checksums=False)
