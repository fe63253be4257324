"""The hacking package's workdir files (per-prompt values, guard settings) in a gs://
workdir and damaged: the same values as from a local folder, errors naming the file."""

import os

import numpy as np
import pytest
from _fake_gcs import bucket_fixture, gcs_bucket, gcs_server, memory_bucket_fixture  # noqa: F401

from thack_jax.core import storage
from thack_jax.hacking import diagnostics, guard, noise


def _rows(k=4, p=6):
    return 1.0 + np.arange(k * p, dtype=np.float64).reshape(k, p) / 10


def test_per_prompt_values_in_a_bucket(bucket, tmp_path):
    remote, local = f"{bucket}/run/train/per_prompt", str(tmp_path / "local")
    for step, row in zip((0, 10, 20, 30), _rows(), strict=True):
        for directory in (remote, local):
            noise.save_per_prompt(directory, step, {"proxy/forward_kl": row, "x": 2 * row})
    assert storage.listdir(remote) == [f"step_{s:08d}.npz" for s in (0, 10, 20, 30)]
    steps, values = noise.load_per_prompt(remote, "proxy/forward_kl", min_step=1)
    assert steps.tolist() == [10, 20, 30]
    np.testing.assert_array_equal(values, _rows()[1:])
    np.testing.assert_array_equal(noise.read_per_prompt(remote, 20)["x"], 2 * _rows()[2])
    np.testing.assert_array_equal(
        noise.covariance_at(remote, "x", [10, 30]), noise.covariance_at(local, "x", [10, 30])
    )
    with pytest.raises(ValueError, match=r"step_00000040\.npz is missing"):
        noise.read_per_prompt(remote, 40)


def test_leftover_temporary_files_are_ignored(tmp_path):
    for step, row in zip((10, 20), _rows(2), strict=True):
        noise.save_per_prompt(str(tmp_path), step, {"k": row})
    (tmp_path / "step_00000030.npz.tmp.1234").write_bytes(b"partial")  # a killed write
    assert noise.load_per_prompt(str(tmp_path), "k")[0].tolist() == [10, 20]


def test_damaged_per_prompt_file_is_named(tmp_path):
    for step, row in zip((10, 20), _rows(2), strict=True):
        path = noise.save_per_prompt(str(tmp_path), step, {"k": row})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    for read in (
        lambda: noise.load_per_prompt(str(tmp_path), "k"),
        lambda: noise.read_per_prompt(str(tmp_path), 20),
    ):
        with pytest.raises(ValueError, match=r"step_00000020\.npz: not a readable \.npz file"):
            read()


def test_guard_settings_in_a_bucket(memory_bucket):
    path = f"{memory_bucket}/run/{guard.GUARD_FILE}"
    assert guard.load_guard_settings(path) is None
    settings = guard.guard_settings(50, "proxy/forward_kl", diagnostics.DetectorConfig())
    storage.write_json(path, settings)
    assert guard.load_guard_settings(path) == settings
    storage.write_atomic(path, "{")
    with pytest.raises(ValueError, match=r"guard_settings\.json: cannot read guard settings"):
        guard.load_guard_settings(path)
