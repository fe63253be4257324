"""Tests of training.checkpoints: sharded round trips, keep-last-N, fallback, mismatches."""

import hashlib
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from _train_worker import fast_init_params

from thack_jax import models
from thack_jax.core import storage
from thack_jax.parallel import partitioning
from thack_jax.training import checkpoints, optim, train_state

CFG = models.get_config("tiny")
OPT = optim.make_optimizer(optim.OptimizerConfig("adafactor", 1e-3, min_dim_size_to_factor=16))


def _state(mesh, seed=0, step=0):
    sh = train_state.state_shardings(mesh, CFG, OPT)
    state = train_state.create_train_state(fast_init_params(CFG, seed), OPT, seed)
    return jax.device_put(state.replace(step=np.int32(step)), sh)


def _target(mesh, config=CFG, opt=OPT):
    shapes = train_state.abstract_state(config, opt)
    return checkpoints.abstract_target(shapes, train_state.state_shardings(mesh, config, opt))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _digest(directory):
    """{relative path: sha1} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A directory with checkpoints at steps 2, 4 and 6 saved from a (4, 2) mesh."""
    directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    mesh = partitioning.make_mesh({"data": 4, "model": 2})
    ckpt = checkpoints.Checkpointer(directory, max_to_keep=3)
    states = {}
    for step in (2, 4, 6):
        states[step] = _state(mesh, seed=step, step=step)
        assert ckpt.save(step, states[step], {"epoch": 0, "index": step})
    ckpt.wait_until_finished()
    ckpt.close()
    return directory, states


@pytest.fixture
def copy_of(saved, tmp_path):
    directory, states = saved
    dest = str(tmp_path / "checkpoints")
    shutil.copytree(directory, dest)
    return dest, states


def test_round_trip_onto_another_mesh(copy_of):
    directory, states = copy_of
    mesh = partitioning.make_mesh({"data": 2, "model": 4})
    ckpt = checkpoints.Checkpointer(directory)
    target = _target(mesh)
    state, source, step = ckpt.restore(target)
    assert step == 6 and source == {"epoch": 0, "index": 6}
    _assert_trees_equal(state, states[6])
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
        assert leaf.sharding == want.sharding
    assert isinstance(state, train_state.TrainState)


def test_keep_last_n_and_steps(tmp_path):
    directory = str(tmp_path / "c")
    ckpt = checkpoints.Checkpointer(directory, max_to_keep=2)
    state = _state(None)
    for step in range(1, 6):
        ckpt.save(step, state, {})
    assert ckpt.save(5, state, {}) is False  # already there: not saved again
    ckpt.wait_until_finished()
    assert checkpoints.all_steps(directory) == [4, 5]
    assert checkpoints.latest_step(directory) == 5
    # An interrupted save (orbax's temporary name) is never a finalized step.
    os.makedirs(os.path.join(directory, "7.orbax-checkpoint-tmp-1234567"))
    assert checkpoints.list_finalized_steps(directory) == [4, 5]
    assert checkpoints.list_finalized_steps(str(tmp_path / "absent")) == []
    assert checkpoints.latest_step(str(tmp_path / "absent")) is None


def test_save_returns_after_copying_off_the_device(tmp_path):
    """The trainer donates the state right after save(): the save must not need it."""
    directory = str(tmp_path / "c")
    ckpt = checkpoints.Checkpointer(directory)
    state = _state(None, seed=3, step=3)
    expected = jax.tree.map(np.asarray, state)
    ckpt.save(3, state, {"k": 1})
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    ckpt.wait_until_finished()
    restored, source, step = ckpt.restore(_target(None))
    _assert_trees_equal(restored, expected)
    assert (source, step) == ({"k": 1}, 3)


def _largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate_data", "delete_metadata", "delete_manifest"])
def test_corrupted_latest_falls_back_with_a_warning(copy_of, caplog, damage):
    directory, states = copy_of
    state_dir = os.path.join(directory, "6", "state")
    if damage == "truncate_data":
        path = _largest_file(state_dir)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "delete_metadata":
        os.remove(os.path.join(state_dir, "_METADATA"))
    else:
        os.remove(os.path.join(state_dir, "manifest.ocdbt"))
    ckpt = checkpoints.Checkpointer(directory)
    with caplog.at_level(logging.WARNING, logger="thack_jax.training.checkpoints"):
        state, source, step = ckpt.restore(_target(None))
    assert step == 4 and source["index"] == 4
    _assert_trees_equal(state, states[4])
    bad = os.path.join(directory, "6")
    assert any(bad in r.getMessage() and "corrupted" in r.getMessage() for r in caplog.records)
    # Moved aside, so that the resumed run can save step 6 again.
    assert checkpoints.all_steps(directory) == [2, 4]
    assert len(os.listdir(directory + "_corrupt")) == 1
    assert ckpt.save(6, states[6], {})
    ckpt.wait_until_finished()
    assert checkpoints.all_steps(directory) == [2, 4, 6]


def test_half_written_latest_is_ignored_with_a_warning(copy_of, caplog):
    directory, states = copy_of
    tmp = os.path.join(directory, "8.orbax-checkpoint-tmp-1700000000")
    shutil.copytree(os.path.join(directory, "6"), tmp)
    os.remove(os.path.join(tmp, "state", "manifest.ocdbt"))
    ckpt = checkpoints.Checkpointer(directory)
    with caplog.at_level(logging.WARNING, logger="thack_jax.training.checkpoints"):
        _, _, step = ckpt.restore(_target(None))
    assert step == 6
    assert any(tmp in r.getMessage() and "half-written" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(tmp)


def test_wrong_shapes_or_dtypes_give_one_error_and_change_nothing(copy_of):
    directory, _ = copy_of
    before = _digest(os.path.dirname(directory))
    wider = CFG.replace(d_ff=48, param_dtype="bfloat16")
    ckpt = checkpoints.Checkpointer(directory)
    with pytest.raises(checkpoints.CheckpointMismatchError) as info:
        ckpt.restore(_target(None, config=wider))
    message = str(info.value)
    assert os.path.join(directory, "6") in message
    assert (
        "params.encoder.layers_0.mlp.wi_0.kernel: expected bfloat16[32, 48], found float32[32, 64]"
        in message
    )
    assert "params.encoder.encoder_norm.scale: expected bfloat16[32], found float32[32]" in message
    assert "nothing was overwritten" in message
    ckpt.close()
    assert _digest(os.path.dirname(directory)) == before


def test_another_optimizer_is_a_mismatch(copy_of):
    directory, _ = copy_of
    with pytest.raises(checkpoints.CheckpointMismatchError, match="missing from the checkpoint"):
        checkpoints.Checkpointer(directory).restore(
            _target(None, opt=optim.make_optimizer(optim.OptimizerConfig("adamw", 1e-3)))
        )


def test_nothing_readable_is_an_error_and_nothing_moves(copy_of):
    directory, _ = copy_of
    for step in (2, 4, 6):
        os.remove(os.path.join(directory, str(step), "state", "manifest.ocdbt"))
    with pytest.raises(checkpoints.NoUsableCheckpointError, match="none of the checkpoints"):
        checkpoints.Checkpointer(directory).restore(_target(None))
    assert checkpoints.all_steps(directory) == [2, 4, 6]


def test_empty_directory_restores_nothing(tmp_path):
    assert checkpoints.Checkpointer(str(tmp_path / "c")).restore(_target(None)) is None


def test_restore_params_for_the_evaluator(copy_of):
    directory, states = copy_of
    mesh = partitioning.make_mesh({"data": 8})
    shapes = models.param_shapes(CFG)
    shardings = partitioning.param_shardings(mesh, models.param_axes(CFG), shapes)
    params = checkpoints.restore_params(directory, 4, shapes, shardings)
    _assert_trees_equal(params, states[4].params)
    emb = params["token_embedder"]["embedding"]
    assert emb.sharding == shardings["token_embedder"]["embedding"]
    single = checkpoints.restore_params(directory, 6, shapes)  # default: first device
    _assert_trees_equal(single, states[6].params)
    with pytest.raises(FileNotFoundError, match="step 5 is not finalized"):
        checkpoints.restore_params(directory, 5, shapes)
    with pytest.raises(checkpoints.CheckpointMismatchError, match="mlp.wo.kernel"):
        checkpoints.restore_params(directory, 6, models.param_shapes(CFG.replace(d_ff=8)))


# ------------------------------------------------------------- gs:// (tests/_gcs.py)


@pytest.fixture
def gcs_saved(gcs_bucket, tmp_path, monkeypatch):
    """Checkpoints at steps 2, 4, 6 (from a (4, 2) mesh) in a bucket of the local GCS
    server; the cwd is tmp_path, where no `gs:` folder may appear."""
    monkeypatch.chdir(tmp_path)
    directory = gcs_bucket + "/run/checkpoints"
    mesh = partitioning.make_mesh({"data": 4, "model": 2})
    ckpt = checkpoints.Checkpointer(directory, max_to_keep=3)
    states = {step: _state(mesh, seed=step, step=step) for step in (2, 4, 6)}
    for step, state in states.items():
        assert ckpt.save(step, state, {"epoch": 0, "index": step})
    ckpt.wait_until_finished()
    ckpt.close()
    yield directory, states
    assert not os.path.exists(tmp_path / "gs:")


def test_gcs_round_trip_keep_last_n_and_restore_params(gcs_saved):
    directory, states = gcs_saved
    assert checkpoints.all_steps(directory) == [2, 4, 6]
    assert storage.exists(directory + "/6/commit_success.txt")  # orbax's mark on GCS
    assert storage.exists(directory + "/6/state/manifest.ocdbt")  # tensorstore's data
    ckpt = checkpoints.Checkpointer(directory)
    assert ckpt.directory == directory  # a URI is not made "absolute"
    state, source, step = ckpt.restore(_target(None))
    assert step == 6 and source == {"epoch": 0, "index": 6}
    _assert_trees_equal(state, states[6])
    assert ckpt.save(8, states[6], {})  # keep-last-3 deletes step 2 from the bucket
    ckpt.wait_until_finished()
    ckpt.close()
    assert checkpoints.all_steps(directory) == [4, 6, 8]
    assert not storage.exists(directory + "/2")
    params = checkpoints.restore_params(directory, 4, models.param_shapes(CFG))
    _assert_trees_equal(params, states[4].params)
    with pytest.raises(FileNotFoundError, match="step 2 is not finalized"):
        checkpoints.restore_params(directory, 2, models.param_shapes(CFG))


def test_gcs_half_written_is_deleted_and_corrupted_moved_aside(gcs_saved, caplog):
    directory, states = gcs_saved
    # On GCS a save cut short is a step folder without orbax's commit_success.txt.
    storage.remove(directory + "/6/commit_success.txt")
    storage.remove(directory + "/4/state/manifest.ocdbt")  # and step 4 is damaged
    assert checkpoints.list_finalized_steps(directory) == [2, 4]
    ckpt = checkpoints.Checkpointer(directory)
    with caplog.at_level(logging.WARNING, logger="thack_jax.training.checkpoints"):
        state, source, step = ckpt.restore(_target(None))
    assert step == 2 and source["index"] == 2
    _assert_trees_equal(state, states[2])
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{directory}/6" in m and "half-written" in m for m in messages)
    assert any(f"{directory}/4" in m and "corrupted" in m for m in messages)
    quarantined = storage.listdir(directory + "_corrupt")
    assert [name.split(".")[0] for name in quarantined] == ["4"]  # 6 held nothing usable
    assert storage.listdir(directory) == ["2"]
    # The resumed run saves those steps again.
    assert ckpt.save(4, states[4], {}) and ckpt.save(6, states[6], {})
    ckpt.wait_until_finished()
    ckpt.close()
    assert checkpoints.all_steps(directory) == [2, 4, 6]
