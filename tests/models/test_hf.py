"""Hugging Face import/export against transformers' PyTorch T5 (tiny random models)."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from safetensors import safe_open

from thack_jax import models
from thack_jax.models import hf, hf_config
from thack_jax.models.mapping import CheckpointMismatchError, flatten

VOCAB = 100
# name -> (transformers T5Config overrides, untie lm_head by hand)
KINDS = {
    # T5 v1.1 with its own lm_head, as in google/t5-v1_1-* files.
    "v1_1": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), True),
    # transformers >= 5 shares lm_head with shared.weight even for v1.1: no lm_head in the file.
    "v1_1_shared_head": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), False),
    "v1_0": (
        dict(
            feed_forward_proj="relu",
            tie_word_embeddings=True,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
        ),
        False,
    ),
}


def _hf_model(seed=0, untie=False, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**{**kwargs, **overrides})
    )
    if untie:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.3)
    with torch.no_grad():  # Layer norms start at 1: perturb everything so each weight matters.
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, VOCAB, (3, 12)).astype(np.int32)
    inputs[0, 7:] = 0  # padded encoder inputs
    inputs[1, 3:] = 0
    targets = rng.integers(2, VOCAB, (3, 9)).astype(np.int32)
    targets[0, 6] = 1
    targets[0, 7:] = 0
    return inputs, targets


def _torch_logits(model, inputs, targets):
    x, y = torch.from_numpy(inputs).long(), torch.from_numpy(targets).long()
    with torch.no_grad():
        return model(input_ids=x, attention_mask=(x != 0).long(), labels=y).logits.float().numpy()


_logits = jax.jit(models.logits, static_argnums=0)


def _random_params(config, seed=0):
    """Random float32 parameters with the model's tree and shapes (numpy: no compiling)."""
    rng = np.random.default_rng(seed)
    shapes = models.param_shapes(config)
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def _max_diff(config, params, model):
    inputs, targets = _batch()
    ours = np.asarray(_logits(config, params, inputs, targets))
    return float(np.abs(ours - _torch_logits(model, inputs, targets)).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (directory, torch model), written once with save_pretrained."""
    out = {}
    for kind, (overrides, untie) in KINDS.items():
        model = _hf_model(untie=untie, **overrides)
        directory = tmp_path_factory.mktemp(kind)
        model.save_pretrained(directory, safe_serialization=True)
        out[kind] = (directory, model)
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_logits_match_pytorch(saved, kind):
    directory, model = saved[kind]
    config, params = hf.load_hf_checkpoint(directory)
    assert config.feed_forward == KINDS[kind][0]["feed_forward_proj"]
    assert config.tie_word_embeddings == (kind == "v1_0")
    assert config.relative_attention_num_buckets == model.config.relative_attention_num_buckets
    shapes = jax.tree.map(lambda x: x.shape, models.param_shapes(config))
    assert jax.tree.map(np.shape, params) == shapes
    diff = _max_diff(config, params, model)
    print(f"{kind}: max |logits - torch logits| = {diff:.2e}")
    assert diff <= 1e-4


def test_untied_lm_head_is_used(saved):
    directory, model = saved["v1_1"]
    _, params = hf.load_hf_checkpoint(directory)
    head = params["decoder"]["logits_dense"]["kernel"]
    np.testing.assert_array_equal(head, model.lm_head.weight.detach().numpy().T)
    assert not np.array_equal(head, params["token_embedder"]["embedding"].T)


def test_sharded_checkpoint(saved, tmp_path):
    _, model = saved["v1_1"]
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    config, params = hf.load_hf_checkpoint(tmp_path)
    _, single = hf.load_hf_checkpoint(saved["v1_1"][0])
    jax.tree.map(np.testing.assert_array_equal, params, single)
    assert _max_diff(config, params, model) <= 1e-4


def test_bfloat16_checkpoint(saved, tmp_path):
    _, model = saved["v1_1"]
    bf16 = _hf_model(untie=True, **KINDS["v1_1"][0]).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path, safe_serialization=True)
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("shared.weight").get_dtype() == "BF16"
    config, params = hf.load_hf_checkpoint(tmp_path)
    assert params["token_embedder"]["embedding"].dtype == np.float32
    expected = bf16.shared.weight.detach().float().numpy()
    np.testing.assert_array_equal(params["token_embedder"]["embedding"], expected)
    config16, params16 = hf.load_hf_checkpoint(tmp_path, dtype="bfloat16")
    assert config16.param_dtype == "bfloat16"
    assert params16["encoder"]["encoder_norm"]["scale"].dtype == ml_dtypes.bfloat16
    diff = _max_diff(config, params, bf16.float())
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ["tiny", "t5_1_0_small"])
def test_export_round_trip(tmp_path, name):
    size = dict(d_model=32, d_ff=64, num_heads=4, d_kv=8, num_encoder_layers=2)
    config = models.get_config(name, vocab_size=VOCAB, num_decoder_layers=3, **size)
    params = _random_params(config, seed=3)
    hf.save_hf_checkpoint(tmp_path, config, params)
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    diff = _max_diff(config, params, model)
    print(f"export {name}: max |logits - torch logits| = {diff:.2e}")
    assert diff <= 1e-4
    config2, params2 = hf.load_hf_checkpoint(tmp_path)
    assert config2 == config.replace(max_input_length=1024, max_target_length=512)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_bfloat16(tmp_path):
    config = models.get_config("tiny")
    params = _random_params(config)
    hf.save_hf_checkpoint(tmp_path, config, params, dtype="bfloat16")
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    transformers.T5ForConditionalGeneration.from_pretrained(tmp_path)


def test_export_rejects_mismatched_params(tmp_path):
    config = models.get_config("tiny")
    params = _random_params(config)
    with pytest.raises(CheckpointMismatchError, match="decoder/logits_dense/kernel"):
        hf.save_hf_checkpoint(tmp_path, config.replace(tie_word_embeddings=True), params)
    with pytest.raises(ValueError, match="float64"):
        hf.save_hf_checkpoint(tmp_path, config, params, dtype="float64")


def _rewrite(directory, tmp_path, edit_tensors=None, edit_config=None):
    """Copies a saved checkpoint to tmp_path with edited tensors / config.json."""
    tensors = safetensors.numpy.load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    tmp_path.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", {"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_every_mismatch_listed_at_once(saved, tmp_path):
    def edit(t):
        del t["encoder.block.1.layer.0.SelfAttention.k.weight"]
        t["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros((3,), np.float32)
        t["decoder.block.0.layer.1.EncDecAttention.q.weight"] = np.zeros((16, 32), np.float32)

    path = _rewrite(saved["v1_1"][0], tmp_path, edit)
    with pytest.raises(CheckpointMismatchError) as info:
        hf.load_hf_checkpoint(path)
    problems = info.value.problems
    assert "missing encoder.block.1.layer.0.SelfAttention.k.weight (expected shape (32, 32))" in (
        problems
    )
    assert "unexpected encoder.block.0.layer.0.SelfAttention.extra.weight (shape (3,))" in problems
    assert (
        "wrong shape decoder.block.0.layer.1.EncDecAttention.q.weight: expected (32, 32), "
        "found (16, 32)"
    ) in problems
    assert "config.json num_heads*d_kv=32 but" in str(info.value)


def test_config_disagrees_with_weights(tmp_path):
    model = _hf_model(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_ff=128)
    model.save_pretrained(tmp_path / "src", safe_serialization=True)

    def edit(c):
        c["d_ff"] = 64
        c["num_layers"] = 1

    path = _rewrite(tmp_path / "src", tmp_path, edit_config=edit)
    with pytest.raises(CheckpointMismatchError) as info:
        hf.load_hf_checkpoint(path)
    message = str(info.value)
    assert (
        "config.json d_ff=64 but decoder.block.0.layer.2.DenseReluDense.wi_0.weight "
        "has shape (128, 32)"
    ) in message
    assert "config.json num_layers=1 but the checkpoint has 2 encoder layers" in message
    with pytest.raises(CheckpointMismatchError, match="feed_forward_proj='relu' but"):
        hf.load_hf_checkpoint(
            tmp_path / "src",
            config=hf_config.config_from_hf(path).replace(
                d_ff=128, num_encoder_layers=2, feed_forward="relu"
            ),
        )


def test_unsupported_dtype_named(saved, tmp_path):
    def edit(t):
        t["encoder.final_layer_norm.weight"] = t["encoder.final_layer_norm.weight"].astype(np.int32)

    path = _rewrite(saved["v1_1"][0], tmp_path, edit)
    with pytest.raises(CheckpointMismatchError, match="unsupported dtype I32 for encoder.final"):
        hf.load_hf_checkpoint(path)


def test_embedding_copies(saved, tmp_path):
    def equal(t):
        t["encoder.embed_tokens.weight"] = t["shared.weight"].copy()

    config, params = hf.load_hf_checkpoint(_rewrite(saved["v1_0"][0], tmp_path / "a", equal))
    assert _max_diff(config, params, saved["v1_0"][1]) <= 1e-4

    def different(t):
        t["decoder.embed_tokens.weight"] = t["shared.weight"] + 1

    with pytest.raises(CheckpointMismatchError, match="decoder.embed_tokens.weight differs"):
        hf.load_hf_checkpoint(_rewrite(saved["v1_0"][0], tmp_path / "b", different))


def test_bad_paths(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_hf_checkpoint(tmp_path / "nope")
    with pytest.raises(NotADirectoryError):
        hf.load_hf_checkpoint(saved["v1_1"][0] / "model.safetensors")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "config.json").write_text((saved["v1_1"][0] / "config.json").read_text())
    (tmp_path / "a" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickles and are not supported"):
        hf.load_hf_checkpoint(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_hf_checkpoint(tmp_path / "b")


def test_name_mapping_is_a_bijection():
    for name in ("tiny", "t5_1_0_small"):
        for path in flatten(models.param_shapes(models.get_config(name))):
            hf_name, transposed = hf.to_hf(path)
            assert hf.to_ours(hf_name) == (path, transposed)
