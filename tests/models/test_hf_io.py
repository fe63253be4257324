"""models/hf_io.py: one entry point for HF checkpoints of either family (config.json's
model_type decides), a role's config checked against the checkpoint's shape."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from thack_jax import models
from thack_jax.models import hf_decoder_config, hf_io


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_io")
    out = {}
    for name in ("tiny", "llama-tiny"):
        config = models.get_config(name, vocab_size=32)
        params = models.init_params(config, jax.random.key(0))
        hf_io.save(root / name, config, params)
        out[name] = (root / name, config, params)
    return out


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_each_family_round_trips(saved, name):
    folder, config, params = saved[name]
    assert hf_io.model_type(folder) == ("t5" if name == "tiny" else "llama")
    loaded, back = hf_io.load(folder)
    assert type(loaded) is type(config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_a_role_of_the_other_family_or_shape_is_refused(saved):
    llama_dir, llama, _ = saved["llama-tiny"]
    t5_dir, t5, _ = saved["tiny"]
    with pytest.raises(ValueError, match="holds a llama .decoder-only. checkpoint; the role is T5"):
        hf_io.load(llama_dir, config=t5)
    with pytest.raises(ValueError, match="holds a T5 checkpoint; the role is decoder-only"):
        hf_io.load(t5_dir, config=llama)
    with pytest.raises(ValueError, match="d_ff: checkpoint 128, config 64"):
        hf_io.load(llama_dir, config=llama.replace(d_ff=64))
    # Runtime fields (length caps, dtypes, EOS) are the role's, not the checkpoint's.
    role = llama.replace(max_input_length=2048, eos_id=7)
    assert hf_io.load(llama_dir, config=role)[0] == role


def test_eos_token_id_maps_to_eos_id_and_back(saved, tmp_path):
    folder, config, _ = saved["llama-tiny"]
    data = json.loads((folder / "config.json").read_text())
    assert data["eos_token_id"] == config.eos_id == 1
    for given, want in ((2, 2), ([5, 6], 5), (None, 1)):
        assert hf_decoder_config.config_from_hf(data | {"eos_token_id": given}).eos_id == want
    with pytest.raises(ValueError, match="eos_token_id='x'"):
        hf_decoder_config.config_from_hf(data | {"eos_token_id": "x"})


def test_an_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        hf_io.load(tmp_path)
