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


def _shapes(index):
    return {name: (info.shape, info.dtype) for name, info in index.items()}


def test_single_file_headers_and_tensors(tmp_path):
    _save(tmp_path / hf_files.WEIGHTS_FILE, {"a": A, "b": B})
    index = hf_files.tensor_index(str(tmp_path))
    assert {info.file for info in index.values()} == {str(tmp_path / "model.safetensors")}
    assert _shapes(index) == {"a": ((2, 3), "F32"), "b": ((4,), "BF16")}
    arrays = hf_files.read_tensors(index, ["a", "b"])
    np.testing.assert_array_equal(arrays["a"], A)
    assert arrays["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(arrays["b"].astype(np.float32), B.astype(np.float32))
    arrays["a"][0, 0] = 7.0  # writable, like safe_open's arrays


def test_reads_equal_safe_open_for_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        f"t_{dtype}": rng.normal(size=(3, 5, 2)).astype(dtype)
        for dtype in (np.float32, np.float16, np.float64, ml_dtypes.bfloat16)
    }
    tensors["empty"] = np.zeros((0, 4), np.float32)
    tensors["scalar"] = np.array(2.5, np.float32)
    _save(tmp_path / hf_files.WEIGHTS_FILE, tensors)
    arrays = hf_files.read_tensors(hf_files.tensor_index(str(tmp_path)), sorted(tensors))
    with safe_open(tmp_path / hf_files.WEIGHTS_FILE, framework="numpy") as f:
        for name in tensors:
            want = f.get_tensor(name)
            assert arrays[name].dtype == want.dtype and arrays[name].shape == want.shape
            assert arrays[name].tobytes() == want.tobytes(), name


def test_sharded_index(tmp_path):
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    index = hf_files.tensor_index(str(_sharded(tmp_path, weight_map)))
    assert {n: info.file for n, info in index.items()} == {
        n: str(tmp_path / shard) for n, shard in weight_map.items()
    }
    assert _shapes(index)["b"] == ((4,), "BF16")
    np.testing.assert_array_equal(hf_files.read_tensors(index, ["a"])["a"], A)


def test_bad_index(tmp_path):
    shard = "model-00001-of-00002.safetensors"
    for bad in (f"../{shard}", ".", ""):
        with pytest.raises(ValueError, match="not a file name"):
            hf_files.tensor_index(str(_sharded(tmp_path / "a", {"a": bad})))
    with pytest.raises(FileNotFoundError, match="lists shard gone.safetensors"):
        hf_files.tensor_index(str(_sharded(tmp_path / "b", {"a": "gone.safetensors"})))
    index_path = tmp_path / "c" / hf_files.INDEX_FILE
    with pytest.raises(ValueError, match=rf"{index_path} lists tensors its shards lack: \['c'\]"):
        hf_files.tensor_index(str(_sharded(tmp_path / "c", {"a": shard, "c": shard})))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / hf_files.INDEX_FILE).write_text('{"weight_map": []}')
    with pytest.raises(ValueError, match="no 'weight_map' object"):
        hf_files.tensor_index(str(tmp_path / "d"))
    (tmp_path / "d" / hf_files.INDEX_FILE).write_text("{")
    with pytest.raises(ValueError, match="index.json is not valid JSON"):
        hf_files.tensor_index(str(tmp_path / "d"))


def test_missing_weights_and_pickles(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_files.checkpoint_dir(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        hf_files.checkpoint_dir(tmp_path / "f")
    assert hf_files.checkpoint_dir(tmp_path) == str(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"found \['config.json', 'f'\]"):
        hf_files.tensor_index(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickles and are not supported"):
        hf_files.tensor_index(str(tmp_path))


def test_write_checkpoint(tmp_path):
    out = tmp_path / "new" / "dir"
    config = {"model_type": "t5", "d_model": 8}
    hf_files.write_checkpoint(str(out), config, {"a": A, "b": B})
    assert hf_files.read_json(out / "config.json") == config
    index = hf_files.tensor_index(str(out))
    np.testing.assert_array_equal(hf_files.read_tensors(index, ["a"])["a"], A)
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}  # transformers requires it
    # The bytes the former writers (json.dump, safetensors.numpy.save_file) produced.
    _save(tmp_path / "reference.safetensors", {"a": A, "b": B})
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "reference.safetensors"
    ).read_bytes()
    assert (out / "config.json").read_text() == json.dumps(config, indent=2, sort_keys=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    _sharded(tmp_path / "sharded", {"a": "model-00001-of-00002.safetensors"})
    with pytest.raises(FileExistsError, match="sharded checkpoint"):
        hf_files.write_checkpoint(str(tmp_path / "sharded"), {}, {"a": A})
