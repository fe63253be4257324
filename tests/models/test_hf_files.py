"""Hugging Face checkpoint files (thack_jax.models.hf_files), written with safetensors."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from thack_jax.models import hf_files

A = np.arange(6, dtype=np.float32).reshape(2, 3)
B = np.ones((4,), dtype=ml_dtypes.bfloat16)


def _save(path, tensors):
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _sharded(directory, weight_map):
    directory.mkdir(parents=True, exist_ok=True)
    _save(directory / "model-00001-of-00002.safetensors", {"a": A})
    _save(directory / "model-00002-of-00002.safetensors", {"b": B})
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / hf_files.INDEX_FILE).write_text(json.dumps(index))
    return directory


def test_single_file_headers_and_tensors(tmp_path):
    _save(tmp_path / hf_files.WEIGHTS_FILE, {"a": A, "b": B})
    files = hf_files.weight_files(tmp_path)
    assert files == {"a": tmp_path / "model.safetensors", "b": tmp_path / "model.safetensors"}
    assert hf_files.tensor_headers(files) == {"a": ((2, 3), "F32"), "b": ((4,), "BF16")}
    arrays = hf_files.read_tensors(files, ["a", "b"])
    np.testing.assert_array_equal(arrays["a"], A)
    assert arrays["b"].dtype == ml_dtypes.bfloat16


def test_sharded_index(tmp_path):
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    files = hf_files.weight_files(_sharded(tmp_path, weight_map))
    assert {n: p.name for n, p in files.items()} == weight_map
    assert hf_files.tensor_headers(files)["b"] == ((4,), "BF16")
    np.testing.assert_array_equal(hf_files.read_tensors(files, ["a"])["a"], A)


def test_bad_index(tmp_path):
    shard = "model-00001-of-00002.safetensors"
    with pytest.raises(ValueError, match="not a file name"):
        hf_files.weight_files(_sharded(tmp_path / "a", {"a": f"../{shard}"}))
    with pytest.raises(FileNotFoundError, match="lists shard gone.safetensors"):
        hf_files.weight_files(_sharded(tmp_path / "b", {"a": "gone.safetensors"}))
    files = hf_files.weight_files(_sharded(tmp_path / "c", {"a": shard, "c": shard}))
    with pytest.raises(ValueError, match=r"shards lack: \['c'\]"):
        hf_files.tensor_headers(files)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / hf_files.INDEX_FILE).write_text('{"weight_map": []}')
    with pytest.raises(ValueError, match="no 'weight_map' object"):
        hf_files.weight_files(tmp_path / "d")
    (tmp_path / "d" / hf_files.INDEX_FILE).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        hf_files.weight_files(tmp_path / "d")


def test_missing_weights_and_pickles(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_files.checkpoint_dir(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        hf_files.checkpoint_dir(tmp_path / "f")
    assert hf_files.checkpoint_dir(str(tmp_path)) == tmp_path
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"found \['config.json', 'f'\]"):
        hf_files.weight_files(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickles and are not supported"):
        hf_files.weight_files(tmp_path)


def test_write_checkpoint(tmp_path):
    out = tmp_path / "new" / "dir"
    hf_files.write_checkpoint(out, {"model_type": "t5"}, {"a": A})
    assert hf_files.read_json(out / "config.json") == {"model_type": "t5"}
    files = hf_files.weight_files(out)
    np.testing.assert_array_equal(hf_files.read_tensors(files, ["a"])["a"], A)
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}  # transformers requires it
    _sharded(tmp_path / "sharded", {"a": "model-00001-of-00002.safetensors"})
    with pytest.raises(FileExistsError, match="sharded checkpoint"):
        hf_files.write_checkpoint(tmp_path / "sharded", {}, {"a": A})
