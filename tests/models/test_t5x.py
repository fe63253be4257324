"""T5X checkpoint import: a tiny checkpoint written in t5x's own layout (msgpack + zarr)."""

import flax.serialization
import jax
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from thack_jax import models
from thack_jax.models.hf_files import DamagedCheckpointError
from thack_jax.models.mapping import CheckpointMismatchError, flatten, unflatten
from thack_jax.models.t5x import PLACEHOLDER, load_t5x_checkpoint

CONFIG = models.get_config("tiny")


def _params(config=CONFIG, seed=0):
    """Random float32 parameters with the model's tree and shapes (numpy: no compiling)."""
    rng = np.random.default_rng(seed)
    shapes = models.param_shapes(config)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def _write_zarr(directory, name, array):
    """Writes `array` like t5x's Checkpointer.save; returns the spec JSON the msgpack holds."""
    relative = name.replace("/", ".")
    # t5x picks chunks of up to 64 MiB; split the first axis in two to read several chunks.
    chunks = [max(1, array.shape[0] // 2), *array.shape[1:]] if array.ndim else []
    spec = {
        "driver": "zarr",
        "dtype": np.dtype(array.dtype).name,
        "kvstore": {"driver": "file", "path": relative},
        "metadata": {
            "compressor": {"id": "gzip"},
            "shape": list(array.shape),
            "chunks": chunks,
        },
    }
    local = {**spec, "kvstore": {"driver": "file", "path": str(directory / relative)}}
    ts.open(local, create=True, open=True).result().write(array).result()
    return ts.Spec(spec).to_json()  # relative path, as t5x stores it


def write_t5x_checkpoint(directory, params, inline=lambda name: False, leaf=None):
    """A t5x (format version 3) step directory: a `checkpoint` msgpack + one zarr per array.

    inline(name) -> True stores that array in the msgpack itself (as t5x does for
    unpartitioned arrays); `leaf(directory, name, array)` overrides how a leaf is written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    write = leaf or _write_zarr
    target = {}
    for path, array in flatten(params).items():
        name = f"target/{path}"
        target[path] = array if inline(path) else write(directory, name, array)
    # Adafactor state as t5x keeps it; the loader must ignore it.
    emb = params["token_embedder"]["embedding"]
    v_row = np.ones(emb.shape[:1], np.float32)
    param_states = {
        "token_embedder": {"embedding": {"v_row": v_row, "v_col": np.ones(emb.shape[1:])}}
    }
    param_states["token_embedder"]["embedding"]["v_row"] = write(
        directory, "state/param_states/token_embedder/embedding/v_row", v_row
    )
    contents = {
        "version": 3,
        "optimizer": {
            "target": unflatten(target),
            "state": {"step": np.int32(1000), "param_states": param_states},
        },
    }
    (directory / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(contents))
    return directory


def _assert_equal(loaded, params, dtype=np.float32):
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)


def test_tensorstore_checkpoint(tmp_path):
    params = _params()
    # Layer norm scales inline, like unpartitioned arrays; everything else in zarr.
    path = write_t5x_checkpoint(tmp_path / "checkpoint_1000", params, lambda n: "norm" in n)
    assert (path / "target.encoder.layers_0.attention.query.kernel" / ".zarray").exists()
    _assert_equal(load_t5x_checkpoint(path, CONFIG), params)
    _assert_equal(load_t5x_checkpoint(path / "checkpoint", CONFIG), params)


def test_inline_checkpoint_tied_relu(tmp_path):
    config = models.get_config(
        "t5_1_0_small",
        **{
            k: getattr(CONFIG, k)
            for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers")
        },
    )
    params = _params(config)
    assert "logits_dense" not in params["decoder"]
    path = write_t5x_checkpoint(tmp_path, params, inline=lambda n: True)
    assert sorted(p.name for p in path.iterdir()) == [
        "checkpoint",
        "state.param_states.token_embedder.embedding.v_row",
    ]
    _assert_equal(load_t5x_checkpoint(path, config), params)


def test_bfloat16_arrays(tmp_path):
    params = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), _params())
    path = write_t5x_checkpoint(tmp_path, params)
    spec = (path / "target.token_embedder.embedding" / ".zarray").read_text()
    assert "bfloat16" in spec
    _assert_equal(load_t5x_checkpoint(path, CONFIG), params)  # cast to float32, exactly
    _assert_equal(load_t5x_checkpoint(path, CONFIG, dtype="bfloat16"), params, ml_dtypes.bfloat16)


@pytest.mark.parametrize("store", ["zarr", "zarr3", "ocdbt"])
def test_orbax_placeholders(tmp_path, store):
    """Orbax-era leaves "PLACEHOLDER://<name>" with the array stored as tensorstore writes it."""

    def placeholder(directory, name, array):
        name = name.replace("/", ".")
        if store == "zarr":
            _write_zarr(directory, name, array)
            return PLACEHOLDER + name
        if store == "zarr3":
            kvstore = {"driver": "file", "path": str(directory / name)}
            metadata = {"shape": list(array.shape), "data_type": "float32"}
        else:
            kvstore = {"driver": "ocdbt", "base": f"file://{directory}/", "path": name + "/"}
            metadata = {"shape": list(array.shape), "chunks": list(array.shape), "dtype": "<f4"}
        spec = {"driver": "zarr3" if store == "zarr3" else "zarr", "kvstore": kvstore}
        ts.open({**spec, "metadata": metadata}, create=True, open=True).result().write(
            array
        ).result()
        return PLACEHOLDER + name

    params = _params()
    path = write_t5x_checkpoint(tmp_path, params, leaf=placeholder)
    assert (path / "manifest.ocdbt").exists() == (store == "ocdbt")
    _assert_equal(load_t5x_checkpoint(path, CONFIG), params)


def test_every_mismatch_listed_at_once(tmp_path):
    flat = flatten(_params())
    del flat["encoder/layers_1/attention/key/kernel"]
    flat["encoder/layers_0/attention/extra/kernel"] = np.zeros((3,), np.float32)
    flat["decoder/layers_0/mlp/wo/kernel"] = np.zeros((128, 32), np.float32)
    path = write_t5x_checkpoint(tmp_path, unflatten(flat))
    with pytest.raises(CheckpointMismatchError) as info:
        load_t5x_checkpoint(path, CONFIG)
    problems = info.value.problems
    assert "missing encoder/layers_1/attention/key/kernel (expected shape (32, 32))" in problems
    assert "unexpected encoder/layers_0/attention/extra/kernel (shape (3,))" in problems
    assert (
        "wrong shape decoder/layers_0/mlp/wo/kernel: expected (64, 32), found (128, 32)"
    ) in problems
    assert "config d_ff=64 but decoder/layers_0/mlp/wo/kernel has shape (128, 32)" in problems


def test_config_disagrees_with_weights(tmp_path):
    path = write_t5x_checkpoint(tmp_path, _params())
    wrong = CONFIG.replace(num_encoder_layers=3, tie_word_embeddings=True, feed_forward="relu")
    with pytest.raises(CheckpointMismatchError) as info:
        load_t5x_checkpoint(path, wrong)
    message = str(info.value)
    assert "config num_encoder_layers=3 but the checkpoint has 2 encoder layers" in message
    assert "config tie_word_embeddings=True but the checkpoint has decoder/logits_dense" in message
    assert "config feed_forward='relu' but the checkpoint has gated mlp wi_0/wi_1" in message


def test_missing_or_foreign_arrays(tmp_path):
    path = write_t5x_checkpoint(tmp_path / "a", _params())
    for part in (path / "target.encoder.encoder_norm.scale").iterdir():
        part.unlink()
    (path / "target.encoder.encoder_norm.scale").rmdir()
    with pytest.raises(
        CheckpointMismatchError,
        match="cannot open the tensorstore array at .*target.encoder.encoder_norm.scale",
    ):
        load_t5x_checkpoint(path, CONFIG)

    def escaping(directory, name, array):
        spec = _write_zarr(directory, name, array)
        spec["kvstore"]["path"] = "../elsewhere/" + spec["kvstore"]["path"]
        return spec

    path = write_t5x_checkpoint(tmp_path / "b", _params(), leaf=escaping)
    with pytest.raises(CheckpointMismatchError, match="outside the checkpoint"):
        load_t5x_checkpoint(path, CONFIG)

    def integers(directory, name, array):
        return _write_zarr(directory, name, array.astype(np.int32))

    path = write_t5x_checkpoint(tmp_path / "c", _params(), leaf=integers)
    with pytest.raises(CheckpointMismatchError, match="unsupported dtype int32"):
        load_t5x_checkpoint(path, CONFIG)


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_t5x_checkpoint(tmp_path / "nope", CONFIG)
    with pytest.raises(FileNotFoundError, match="no msgpack file named 'checkpoint'"):
        load_t5x_checkpoint(tmp_path, CONFIG)
    write_t5x_checkpoint(tmp_path / "checkpoint_5", _params(), inline=lambda n: True)
    with pytest.raises(FileNotFoundError, match="checkpoint_5"):
        load_t5x_checkpoint(tmp_path, CONFIG)
    (tmp_path / "tf").mkdir()
    (tmp_path / "tf" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1"\n')
    with pytest.raises(ValueError, match="TensorFlow checkpoint"):
        load_t5x_checkpoint(tmp_path / "tf", CONFIG)
    (tmp_path / "other").mkdir()
    other = {"version": 3, "optimizer": {"state": {"step": np.int32(1)}}}
    (tmp_path / "other" / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(other))
    with pytest.raises(ValueError, match="no 'target' or 'params' tree"):
        load_t5x_checkpoint(tmp_path / "other", CONFIG)


def _poison(params, path, index, value):
    flat = flatten(jax.tree.map(np.copy, params))
    flat[path].flat[index] = value
    return unflatten(flat)


@pytest.mark.parametrize("inline", [False, True])
def test_non_finite_weights_are_refused_and_named(tmp_path, inline):
    name = "encoder/layers_0/attention/query/kernel"
    params = _poison(_params(), name, 5, np.nan)
    params = _poison(params, name, 9, np.inf)
    params = _poison(params, "decoder/decoder_norm/scale", 0, 3e38)  # finite but impossible
    path = write_t5x_checkpoint(tmp_path, params, inline=lambda n: inline)
    with pytest.raises(DamagedCheckpointError) as info:
        load_t5x_checkpoint(path, CONFIG)
    message = str(info.value)
    size = params["encoder"]["layers_0"]["attention"]["query"]["kernel"].size
    where = f"inline in {path / 'checkpoint'}" if inline else "array at "
    assert f"{name} ({where}" in message
    assert f"2 of {size} values are NaN/inf (first at flat index 5)" in message
    assert "decoder/decoder_norm/scale" in message and "1 of 32 have |x| >= 1e+30" in message
    assert "2 array(s)" in message and str(tmp_path) in message
    if not inline:
        assert f"array at {path / 'target.encoder.layers_0.attention.query.kernel'}" in message


def test_damaged_chunk_names_the_array(tmp_path):
    path = write_t5x_checkpoint(tmp_path, _params())
    array_dir = path / "target.encoder.encoder_norm.scale"
    chunk = next(p for p in sorted(array_dir.iterdir()) if not p.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes()[:5])  # a truncated gzip chunk
    with pytest.raises(ValueError, match=r"encoder/encoder_norm/scale: cannot read the array at"):
        load_t5x_checkpoint(path, CONFIG)
