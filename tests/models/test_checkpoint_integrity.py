"""Damaged Hugging Face checkpoints: every error names the file; damaged or non-finite weights
are refused; export -> import is exact and the remote (URI) code path reads the same bytes.

Checkpoints are exported by `save_hf_checkpoint` (real safetensors), then damaged here:
truncated, header bytes overwritten, 2,000 random bytes written into the tensor data.
"""

import json
import re

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from thack_jax import models
from thack_jax.core import storage
from thack_jax.models import hf, hf_config, hf_files
from thack_jax.models.hf_files import DamagedCheckpointError
from thack_jax.models.mapping import flatten

CONFIG = models.get_config("tiny")
QUERY = "encoder.block.0.layer.0.SelfAttention.q.weight"
QUERY_OURS = "encoder/layers_0/attention/query/kernel"


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = models.param_shapes(CONFIG)
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(directory, params, model.safetensors bytes) of a tiny exported model."""
    directory = tmp_path_factory.mktemp("exported")
    params = _params()
    hf.save_hf_checkpoint(str(directory), CONFIG, params)
    return directory, params, (directory / hf_files.WEIGHTS_FILE).read_bytes()


def _copy(exported, out, weights=None, config_text=None):
    """A copy of the exported checkpoint with replaced weight bytes / config.json text."""
    directory, _, data = exported
    out.mkdir(parents=True, exist_ok=True)
    (out / hf_files.WEIGHTS_FILE).write_bytes(data if weights is None else weights)
    text = (directory / "config.json").read_text() if config_text is None else config_text
    (out / "config.json").write_text(text)
    return out


def _data_start(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _assert_equal_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_export_import_round_trips_exactly_with_unchanged_bytes(exported, tmp_path):
    directory, params, data = exported
    config, loaded = hf.load_hf_checkpoint(str(directory))
    assert config == CONFIG.replace(max_input_length=1024, max_target_length=512)
    _assert_equal_trees(loaded, params)
    with safe_open(directory / hf_files.WEIGHTS_FILE, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    # The bytes the former writer (safetensors.numpy.save_file) produced for these tensors.
    tensors = {}
    for ours, value in flatten(params).items():
        name, transposed = hf.to_hf(ours)
        tensors[name] = np.ascontiguousarray(value.T if transposed else value)
    safetensors.numpy.save_file(tensors, tmp_path / "ref.safetensors", {"format": "pt"})
    assert data == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize(
    "cut, match",
    [
        (0, "truncated: 0 bytes"),
        (5, "truncated: 5 bytes"),
        (40, "damaged or truncated: the header length field says"),  # in the JSON header
        (-1, "truncated: .* ends at data byte"),  # one byte short
        (0.5, "truncated: .* ends at data byte"),
    ],
)
def test_truncated_weights_name_the_file(exported, tmp_path, cut, match):
    data = exported[2]
    keep = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    path = _copy(exported, tmp_path, weights=data[:keep])
    weights = re.escape(str(path / hf_files.WEIGHTS_FILE))
    with pytest.raises(DamagedCheckpointError, match=f"^{weights}: {match}"):
        hf.load_hf_checkpoint(str(path))


@pytest.mark.parametrize(
    "offset, fill, match",
    [
        (0, b"\xff" * 8, "damaged or truncated: the header length"),  # the length field
        (8, b"\xff" * 12, "damaged safetensors header: not JSON"),  # not UTF-8
        (9, b"}]", "damaged safetensors header: not JSON"),
        ("dtype", b"   7 ", "damaged safetensors header: entry"),  # JSON, a broken entry
    ],
)
def test_damaged_header_names_the_file(exported, tmp_path, offset, fill, match):
    data = bytearray(exported[2])
    if offset == "dtype":
        offset = data.index(b'"F32"')
    data[offset : offset + len(fill)] = fill
    path = _copy(exported, tmp_path, weights=bytes(data))
    with pytest.raises(DamagedCheckpointError, match=re.escape(str(path)) + ".*: " + match):
        hf.load_hf_checkpoint(str(path))


def test_offsets_that_do_not_fit_the_shape_are_refused(exported, tmp_path):
    data = exported[2]
    start = _data_start(data)
    header = json.loads(data[8:start])
    header[QUERY]["shape"] = [header[QUERY]["shape"][0] + 1, header[QUERY]["shape"][1]]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(start - 8)
    path = _copy(exported, tmp_path, weights=data[:8] + raw + data[start:])
    with pytest.raises(DamagedCheckpointError, match=rf"{QUERY} \(F32 \[33, 32\]\) needs"):
        hf.load_hf_checkpoint(str(path))


def _tensor_ranges(data):
    """HF name -> (first byte, end byte) in the file."""
    start = _data_start(data)
    header = json.loads(data[8:start])
    header.pop("__metadata__")
    return {
        n: (start + e["data_offsets"][0], start + e["data_offsets"][1]) for n, e in header.items()
    }


@pytest.mark.parametrize("seed", range(12))
def test_random_bytes_in_the_tensor_data_are_refused(exported, tmp_path, seed):
    """2,000 random bytes at a random place of the data: the tensor they hit is named."""
    data = bytearray(exported[2])
    rng = np.random.default_rng(seed)
    first = int(rng.integers(_data_start(data), len(data) - 2000))
    data[first : first + 2000] = rng.bytes(2000)
    path = _copy(exported, tmp_path, weights=bytes(data))
    with pytest.raises(DamagedCheckpointError) as info:
        hf.load_hf_checkpoint(str(path))
    message = str(info.value)
    hit = [n for n, (a, b) in _tensor_ranges(data).items() if a < first + 2000 and first < b]
    middle = [n for n, (a, b) in _tensor_ranges(data).items() if a <= first + 1000 < b]
    assert middle[0] in message, (middle, message)
    named = re.findall(r"^  - (\S+) \(ours: ", message, flags=re.M)
    assert named and set(named) <= set(hit)
    assert f"in {path / hf_files.WEIGHTS_FILE}: " in message


def test_non_finite_weights_name_both_tensor_names_file_and_count(exported, tmp_path):
    tensors = safetensors.numpy.load(exported[2])
    tensors[QUERY] = tensors[QUERY].copy()
    tensors[QUERY].flat[[3, 40, 41]] = [np.nan, np.inf, -np.inf]
    bf16 = {n: t.astype(ml_dtypes.bfloat16) for n, t in tensors.items()}
    for kind, content in (("f32", tensors), ("bf16", bf16)):
        path = _copy(exported, tmp_path / kind, weights=safetensors.numpy.save(content))
        with pytest.raises(DamagedCheckpointError) as info:
            hf.load_hf_checkpoint(str(path))
        message = str(info.value)
        assert message.startswith(f"{path}: 1 tensor(s) hold non-finite"), message
        assert (
            f"{QUERY} (ours: {QUERY_OURS}) in {path / hf_files.WEIGHTS_FILE}: 3 of "
            f"{tensors[QUERY].size} values are NaN/inf (first at flat index 3)"
        ) in message


def test_value_problem():
    assert hf_files.value_problem(np.array([1.0, -2.0, 1e29], np.float32)) is None
    assert hf_files.value_problem(np.zeros((0, 3), np.float32)) is None
    x = np.array([[1.0, np.nan], [-1e31, 2.0]], np.float32).T  # not contiguous
    assert hf_files.value_problem(x) == (
        "1 of 4 values are NaN/inf and 1 of 4 have |x| >= 1e+30 (first at flat index 1)"
    )
    # float16 cannot hold 1e30: only NaN/inf count; bfloat16 and float64 like float32.
    assert hf_files.value_problem(np.array([65504.0, -np.inf], np.float16)).startswith("1 of 2")
    assert hf_files.value_problem(np.array([3e38], ml_dtypes.bfloat16)).startswith("1 of 1 have")
    assert hf_files.value_problem(np.array([-1e300, 0.0])).startswith("1 of 2 have")
    assert hf_files.value_problem(np.float32(np.nan)) is not None  # 0-d


def test_bad_config_json_names_the_file(exported, tmp_path):
    for label, text in (("invalid", '{"d_model": 32,'), ("random", "\udcff")):
        path = tmp_path / label
        _copy(exported, path)
        raw = text.encode("utf-8", "surrogateescape")
        (path / "config.json").write_bytes(raw + np.random.default_rng(0).bytes(50))
        config_file = re.escape(str(path / "config.json"))
        with pytest.raises(ValueError, match=f"{config_file} is not valid JSON"):
            hf.load_hf_checkpoint(str(path))


def _shard(exported, out):
    """The exported weights split into two shards with an index."""
    tensors = safetensors.numpy.load(exported[2])
    names = sorted(tensors)
    out.mkdir(parents=True)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        content = {n: tensors[n] for n in part}
        safetensors.numpy.save_file(content, out / shard, {"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    index = {"metadata": {}, "weight_map": weight_map}
    (out / hf_files.INDEX_FILE).write_text(json.dumps(index))
    (out / "config.json").write_text((exported[0] / "config.json").read_text())
    return out


def test_sharded_checkpoint_damage_names_the_file(exported, tmp_path):
    good = _shard(exported, tmp_path / "good")
    _assert_equal_trees(hf.load_hf_checkpoint(str(good))[1], exported[1])
    second = "model-00002-of-00002.safetensors"

    missing = _shard(exported, tmp_path / "missing")
    (missing / second).unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shard {second} but .*missing/{second}"):
        hf.load_hf_checkpoint(str(missing))

    truncated = _shard(exported, tmp_path / "truncated")
    (truncated / second).write_bytes((truncated / second).read_bytes()[:-100])
    with pytest.raises(DamagedCheckpointError, match=f"truncated/{second}: truncated"):
        hf.load_hf_checkpoint(str(truncated))

    index = _shard(exported, tmp_path / "index")
    (index / hf_files.INDEX_FILE).write_text('{"weight_map": {"a": ')
    with pytest.raises(ValueError, match=f"index/{hf_files.INDEX_FILE} is not valid JSON"):
        hf.load_hf_checkpoint(str(index))

    poisoned = _shard(exported, tmp_path / "poisoned")
    tensors = safetensors.numpy.load_file(poisoned / second)
    name = sorted(tensors)[0]
    tensors[name].flat[0] = np.nan
    safetensors.numpy.save_file(tensors, poisoned / second, {"format": "pt"})
    with pytest.raises(DamagedCheckpointError, match=f"{re.escape(name)} .*poisoned/{second}: 1"):
        hf.load_hf_checkpoint(str(poisoned))


def test_remote_code_path_reads_and_writes_the_same(exported, tmp_path, monkeypatch):
    """A gs:// checkpoint directory: storage maps the URI to a local folder through
    etils.epath (stubbed here; the GCS emulator tests cover the real bucket). Export and
    import give the same bytes and parameters, every file goes through storage (a plain
    open() of a gs:// name would fail), and damage is still named with the URI."""
    directory, params, data = exported
    bucket, opened, epath_of = "gs://integrity-test", [], storage._epath

    class LocalBucket:  # an epath.Path of the folder under tmp_path that stands for `bucket`
        def __init__(self, path):
            assert str(path).startswith(bucket), path
            self.path = epath_of(str(tmp_path) + str(path)[len(bucket) :])

        def open(self, mode="r", **kwargs):
            opened.append((self.path.name, mode))
            return self.path.open(mode, **kwargs)

        def __getattr__(self, name):
            return getattr(self.path, name)

    monkeypatch.setattr(storage, "_epath", LocalBucket)
    out = f"{bucket}/run/oracle/model"
    (tmp_path / "run" / "oracle" / "model").mkdir(parents=True)  # GCS has no folders to make
    hf.save_hf_checkpoint(out, CONFIG, params)
    local = tmp_path / "run" / "oracle" / "model"
    assert (local / hf_files.WEIGHTS_FILE).read_bytes() == data
    assert (local / "config.json").read_bytes() == (directory / "config.json").read_bytes()
    config, loaded = hf.load_hf_checkpoint(out)
    _assert_equal_trees(loaded, params)
    assert config == models.get_config("tiny", max_input_length=1024, max_target_length=512)
    assert hf_config.config_from_hf(out) == config  # the directory form
    assert opened.count((hf_files.WEIGHTS_FILE, "rb")) == 2  # the header, then the tensors
    assert {("config.json", "wb"), ("config.json", "rb"), (hf_files.WEIGHTS_FILE, "wb")} <= set(
        opened
    )
    (local / hf_files.WEIGHTS_FILE).write_bytes(data[:-7])
    with pytest.raises(DamagedCheckpointError, match=f"^{out}/{hf_files.WEIGHTS_FILE}: trunc"):
        hf.load_hf_checkpoint(out)
