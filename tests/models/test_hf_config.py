"""config.json <-> T5Config (thack_jax.models.hf_config); no torch needed."""

import json

import pytest

from thack_jax import models
from thack_jax.models import hf_config

VOCAB = 100


def test_config_from_hf_defaults_and_errors():
    base = dict(d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, vocab_size=VOCAB)
    config = hf_config.config_from_hf(base)
    assert config.tie_word_embeddings  # transformers' default when absent
    assert config.feed_forward == "relu" and config.num_decoder_layers == 2
    assert not hf_config.config_from_hf({**base, "tie_word_embeddings": False}).tie_word_embeddings
    # transformers >= 5 files: tie_word_embeddings is always true, scaling decides.
    v5 = {**base, "tie_word_embeddings": True, "scale_decoder_outputs": False}
    assert not hf_config.config_from_hf(v5).tie_word_embeddings
    assert hf_config.config_from_hf(base, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'"):
        hf_config.config_from_hf({**base, "feed_forward_proj": "gated-silu"})
    with pytest.raises(ValueError, match="is_gated_act=True contradicts"):
        hf_config.config_from_hf({**base, "feed_forward_proj": "relu", "is_gated_act": True})
    with pytest.raises(ValueError, match="model_type='umt5'"):
        hf_config.config_from_hf({**base, "model_type": "umt5"})
    with pytest.raises(ValueError, match="d_ff=0"):
        hf_config.config_from_hf({**base, "d_ff": 0})
    round_trip = hf_config.config_from_hf(hf_config.config_to_hf(models.get_config("small")))
    assert round_trip == models.get_config("small").replace(max_input_length=1024)


def test_config_from_a_file_or_its_directory(tmp_path):
    c = hf_config.config_to_hf(models.get_config("tiny"))
    (tmp_path / "config.json").write_text(json.dumps(c))
    assert hf_config.config_from_hf(tmp_path) == hf_config.config_from_hf(c)
    assert hf_config.config_from_hf(tmp_path / "config.json") == hf_config.config_from_hf(c)
    with pytest.raises(FileNotFoundError, match="no Hugging Face config file"):
        hf_config.config_from_hf(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        hf_config.config_from_hf(tmp_path / "bad.json")


def test_scaled_output_with_a_separate_head_is_refused():
    c = dict(feed_forward_proj="relu", tie_word_embeddings=False, scale_decoder_outputs=True)
    with pytest.raises(ValueError, match="scale_decoder_outputs=True with tie_word_embeddings"):
        hf_config.config_from_hf(c)


def test_config_to_hf_writes_both_tie_keys():
    c = hf_config.config_to_hf(models.get_config("tiny"), dtype="bfloat16")
    assert c["model_type"] == "t5" and c["dtype"] == "bfloat16"
    assert c["dense_act_fn"] == hf_config.FEED_FORWARD_ACTIVATION[c["feed_forward_proj"]]
    assert c["tie_word_embeddings"] == c["scale_decoder_outputs"]
