"""Hugging Face Llama / Qwen2 import/export against transformers' PyTorch models (tiny
random models): logits equal to 1e-4 in float32, export loadable by from_pretrained, every
mismatch named. Config translation tests need no torch but share the file."""

import copy
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
from thack_jax.models import decoder_api, hf_decoder, hf_decoder_config
from thack_jax.models.decoder_config import DECODER_CONFIGS, get_decoder_config
from thack_jax.models.hf_files import DamagedCheckpointError
from thack_jax.models.mapping import CheckpointMismatchError, flatten

VOCAB = 128
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LLAMA3 = dict(
    rope_type="llama3",
    factor=32.0,
    high_freq_factor=4.0,
    low_freq_factor=1.0,
    # With head_dim 8 and theta 5e5 the wavelengths fall in all three llama3 bands
    # (< 16 kept, 16..64 smoothed, > 64 divided by the factor).
    original_max_position_embeddings=64,
)
# name -> (transformers config class, overrides)
KINDS = {
    "llama_gqa": (transformers.LlamaConfig, dict(rope_theta=10000.0)),
    # Multi-query, head_dim * heads != hidden_size, Llama-3 RoPE scaling.
    "llama_mqa_llama3": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=1,
            head_dim=8,
            rope_theta=500000.0,
            rope_scaling=LLAMA3,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
        ),
    ),
    "qwen2_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_mqa": (transformers.Qwen2Config, dict(num_key_value_heads=1)),
}
_logits = jax.jit(decoder_api.logits, static_argnums=0)


def _hf_model(kind, seed=0, **extra):
    cls, overrides = copy.deepcopy(KINDS[kind])  # transformers edits rope_scaling in place
    torch.manual_seed(seed)
    config = cls(**{**BASE, **overrides, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # Norms start at 1 and biases at 0: perturb so each weight matters.
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _batch(seed=1):
    """Prompts of different lengths (right-padded) and padded responses."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(1, VOCAB, (3, 7)).astype(np.int32)
    inputs[0, 5:] = 0
    inputs[1, 2:] = 0
    targets = rng.integers(1, VOCAB, (3, 6)).astype(np.int32)
    targets[0, 4:] = 0
    targets[2, 1:] = 0
    return inputs, targets


def _torch_logits(model, inputs, targets):
    """[B, Ly, V] logits of HF's model, one call per row on the row's real tokens (zeros
    where the response is padding): position len_prompt - 1 + s predicts response token s."""
    out = np.zeros((*targets.shape, model.config.vocab_size), np.float32)
    for b in range(len(inputs)):
        prompt, response = inputs[b][inputs[b] != 0], targets[b][targets[b] != 0]
        ids = torch.from_numpy(np.concatenate([prompt, response])).long()[None]
        with torch.no_grad():
            row = model(input_ids=ids).logits[0].float().numpy()
        out[b, : len(response)] = row[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return out


def _max_diff(config, params, model, inputs=None, targets=None):
    if inputs is None:
        inputs, targets = _batch()
    ours = np.asarray(_logits(config, params, inputs, targets))
    ours = np.where((targets != 0)[..., None], ours, 0.0)  # compare real positions only
    return float(np.abs(ours - _torch_logits(model, inputs, targets)).max())


def _random_params(config, seed=0):
    """Random float32 parameters (norm scales near 1, so logits are O(1)); numpy."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        centre = 1.0 if path[-1].key == "scale" else 0.0
        return (centre + 0.1 * rng.normal(size=s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, models.param_shapes(config))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (directory, torch model), written once with save_pretrained."""
    out = {}
    for kind in KINDS:
        model = _hf_model(kind)
        directory = tmp_path_factory.mktemp(kind)
        model.save_pretrained(directory, safe_serialization=True)
        out[kind] = (directory, model)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_pytorch(saved, kind):
    directory, model = saved[kind]
    config, params = hf_decoder.load_hf_decoder(directory)
    hf = model.config
    assert config.family == hf.model_type
    assert (config.num_heads, config.num_kv_heads) == (4, hf.num_key_value_heads)
    assert config.head_dim == getattr(hf, "head_dim", None) or 16
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    assert config.attention_bias == (kind.startswith("qwen2"))
    assert (config.rope_scaling is not None) == (kind == "llama_mqa_llama3")
    shapes = jax.tree.map(lambda s: s.shape, models.param_shapes(config))
    assert jax.tree.map(np.shape, params) == shapes
    diff = _max_diff(config, params, model)
    print(f"{kind}: max |logits - torch logits| = {diff:.2e}")
    assert diff <= 1e-4
    if config.rope_scaling is not None:  # the scaling changes these logits: it is tested
        assert _max_diff(config.replace(rope_scaling=None), params, model) > 1e-3


def test_left_padded_prompts_match(saved):
    """The contract: positions come from the mask, so left padding gives the same rows."""
    directory, model = saved["llama_mqa_llama3"]
    config, params = hf_decoder.load_hf_decoder(directory)
    inputs, targets = _batch(seed=2)
    left = np.zeros_like(inputs)
    for b, row in enumerate(inputs):
        real = row[row != 0]
        left[b, len(row) - len(real) :] = real
    assert _max_diff(config, params, model, left, targets) <= 1e-4


def test_untied_head_is_used(saved):
    directory, model = saved["llama_gqa"]
    _, params = hf_decoder.load_hf_decoder(directory)
    head = params["lm_head"]["kernel"]
    np.testing.assert_array_equal(head, model.lm_head.weight.detach().numpy().T)
    q = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()  # [H*Dh, D]
    np.testing.assert_array_equal(
        params["layers_1"]["attention"]["query"]["kernel"], q.T.reshape(64, 4, 16)
    )


def test_sharded_checkpoint(saved, tmp_path):
    single, model = saved["qwen2_mqa"]
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _, params = hf_decoder.load_hf_decoder(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, hf_decoder.load_hf_decoder(single)[1])


def test_bfloat16_checkpoint(tmp_path):
    model = _hf_model("qwen2_tied").to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert f.get_slice(hf_decoder.EMBED).get_dtype() == "BF16"
    config, params = hf_decoder.load_hf_decoder(tmp_path)
    assert params["embed"]["embedding"].dtype == np.float32
    expected = model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(params["embed"]["embedding"], expected)
    config16, params16 = hf_decoder.load_hf_decoder(tmp_path, dtype="bfloat16")
    assert config16.param_dtype == "bfloat16"
    assert params16["final_norm"]["scale"].dtype == ml_dtypes.bfloat16
    # A fresh float32 model of the file: `.to(bfloat16)` also rounded its RoPE buffer.
    reference = _from_pretrained(tmp_path, dtype=torch.float32)
    assert _max_diff(config, params, reference) <= 1e-4


def _export_config(name):
    if name == "llama_mqa_llama3":  # the named tiny size with 1 kv head and llama3 RoPE
        scaling = tuple(sorted(LLAMA3.items()))
        return get_decoder_config("llama-tiny", num_kv_heads=1, head_dim=8, rope_scaling=scaling)
    if name == "llama_bias":  # Llama with attention_bias: zero o_proj biases are written
        return get_decoder_config("llama-tiny", attention_bias=True, tie_word_embeddings=True)
    return get_decoder_config(name)


def _from_pretrained(directory, **kwargs):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, output_loading_info=True, **kwargs
    )
    assert not any(info.values()), info  # missing / unexpected / mismatched keys, errors
    return model.eval()


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "llama_mqa_llama3", "llama_bias"])
def test_export_round_trip(tmp_path, name):
    config = _export_config(name)
    params = _random_params(config, seed=3)
    hf_decoder.save_hf_decoder(tmp_path, config, params)
    model = _from_pretrained(tmp_path)
    assert type(model).__name__ == hf_decoder_config.FAMILY_ARCHITECTURE[config.family]
    diff = _max_diff(config, params, model)
    print(f"export {name}: max |logits - torch logits| = {diff:.2e}")
    assert diff <= 1e-4
    config2, params2 = hf_decoder.load_hf_decoder(tmp_path)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_sharded_and_bfloat16(tmp_path):
    config = get_decoder_config("qwen2-tiny")
    params = _random_params(config)
    hf_decoder.save_hf_decoder(tmp_path / "s", config, params, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert _max_diff(config, params, _from_pretrained(tmp_path / "s")) <= 1e-4
    jax.tree.map(
        np.testing.assert_array_equal, hf_decoder.load_hf_decoder(tmp_path / "s")[1], params
    )
    with pytest.raises(FileExistsError, match="already holds"):
        hf_decoder.save_hf_decoder(tmp_path / "s", config, params, max_shard_bytes=50_000)

    hf_decoder.save_hf_decoder(tmp_path / "b", config, params, dtype="bfloat16")
    with safe_open(tmp_path / "b" / "model.safetensors", framework="numpy") as f:
        assert f.get_slice(hf_decoder.EMBED).get_dtype() == "BF16"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    model = _from_pretrained(tmp_path / "b")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    assert _max_diff(config, rounded, model.float()) <= 1e-4


def test_export_rejects_mismatched_params(tmp_path):
    config = get_decoder_config("llama-tiny")
    params = _random_params(config)
    with pytest.raises(CheckpointMismatchError, match="unexpected lm_head/kernel"):
        hf_decoder.save_hf_decoder(tmp_path, config.replace(tie_word_embeddings=True), params)
    with pytest.raises(ValueError, match="float64"):
        hf_decoder.save_hf_decoder(tmp_path, config, params, dtype="float64")
    with pytest.raises(ValueError, match="always has q/k/v biases"):
        hf_decoder.save_hf_decoder(tmp_path, config.replace(family="qwen2"), params)
    assert not (tmp_path / "config.json").exists()


def _rewrite(directory, out, edit_tensors=None, edit_config=None):
    """Copies a saved checkpoint to `out` with edited tensors / config.json."""
    tensors = safetensors.numpy.load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, out / "model.safetensors", {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_every_mismatch_listed_at_once(saved, tmp_path):
    def edit(t):
        del t["model.layers.1.self_attn.k_proj.weight"]
        t["model.layers.0.self_attn.extra.weight"] = np.zeros((3,), np.float32)
        t["model.layers.0.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)

    path = _rewrite(saved["llama_gqa"][0], tmp_path, edit)
    with pytest.raises(CheckpointMismatchError) as info:
        hf_decoder.load_hf_decoder(path)
    problems = info.value.problems
    assert "missing model.layers.1.self_attn.k_proj.weight (expected shape (32, 64))" in problems
    assert "unexpected model.layers.0.self_attn.extra.weight (shape (3,))" in problems
    assert (
        "wrong shape model.layers.0.mlp.up_proj.weight: expected (128, 64), found (96, 64)"
    ) in problems
    assert "config.json intermediate_size=128 but model.layers.0.mlp.up_proj.weight" in str(
        info.value
    )
    assert any(p.startswith("unsupported dtype I32 for model.norm.weight") for p in problems)


def test_config_disagrees_with_weights(saved, tmp_path):
    def edit(c):
        c["num_key_value_heads"] = 4
        c["num_hidden_layers"] = 1

    path = _rewrite(saved["qwen2_tied"][0], tmp_path, edit_config=edit)
    with pytest.raises(CheckpointMismatchError) as info:
        hf_decoder.load_hf_decoder(path)
    message = str(info.value)
    assert (
        "config.json num_key_value_heads*head_dim=64 but model.layers.0.self_attn.k_proj.bias "
        "has shape (32,)"
    ) in message
    assert "config.json num_hidden_layers=1 but the checkpoint has 2 layers" in message
    assert "unexpected model.layers.1.input_layernorm.weight" in message


def test_tied_head_copies_and_inv_freq(saved, tmp_path):
    directory, model = saved["qwen2_tied"]

    def equal(t):
        t[hf_decoder.HEAD] = t[hf_decoder.EMBED].copy()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((8,), np.float32)

    config, params = hf_decoder.load_hf_decoder(_rewrite(directory, tmp_path / "a", equal))
    assert "lm_head" not in params
    assert _max_diff(config, params, model) <= 1e-4

    def different(t):
        t[hf_decoder.HEAD] = t[hf_decoder.EMBED] + 1

    with pytest.raises(CheckpointMismatchError, match="lm_head.weight differs from model.embed"):
        hf_decoder.load_hf_decoder(_rewrite(directory, tmp_path / "b", different))
    untied = _rewrite(
        directory, tmp_path / "c", edit_config=lambda c: c.update(tie_word_embeddings=False)
    )
    with pytest.raises(CheckpointMismatchError) as info:
        hf_decoder.load_hf_decoder(untied)
    assert "missing lm_head.weight (expected shape (128, 64))" in info.value.problems
    assert "tie_word_embeddings=false but the checkpoint has no lm_head.weight" in str(info.value)


def test_llama_output_bias_must_be_zero(tmp_path):
    model = _hf_model("llama_gqa", attention_bias=True)
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    with pytest.raises(CheckpointMismatchError) as info:
        hf_decoder.load_hf_decoder(tmp_path / "src")
    assert "model.layers.0.self_attn.o_proj.bias is not zero" in str(info.value)
    assert "model.layers.1.self_attn.o_proj.bias is not zero" in str(info.value)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    model.save_pretrained(tmp_path / "zero", safe_serialization=True)
    config, params = hf_decoder.load_hf_decoder(tmp_path / "zero")
    assert config.attention_bias and config.family == "llama"
    assert _max_diff(config, params, model) <= 1e-4


def test_damaged_values_and_bad_paths(saved, tmp_path):
    def nan(t):
        t["model.layers.0.mlp.down_proj.weight"][3, 5] = np.nan

    with pytest.raises(DamagedCheckpointError, match="down_proj.weight in .*1 of 8192 values"):
        hf_decoder.load_hf_decoder(_rewrite(saved["llama_gqa"][0], tmp_path / "nan", nan))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_decoder.load_hf_decoder(tmp_path / "nope")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(
        (saved["llama_gqa"][0] / "config.json").read_text()
    )
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickles and are not supported"):
        hf_decoder.load_hf_decoder(tmp_path / "bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_decoder.load_hf_decoder(tmp_path / "empty")


def test_name_mapping_is_a_bijection():
    for name in DECODER_CONFIGS:
        for path in flatten(models.param_shapes(get_decoder_config(name))):
            hf_name, layout = hf_decoder.to_hf(path)
            assert hf_decoder.to_ours(hf_name) == (path, layout)
    assert hf_decoder.to_ours("model.layers.0.self_attn.o_proj.bias") is None


# config.json <-> DecoderConfig (no torch needed).
LLAMA_JSON = dict(architectures=["LlamaForCausalLM"], model_type="llama", **BASE)


def test_config_round_trip_and_transformers_reads_it():
    for name in DECODER_CONFIGS:
        config = get_decoder_config(name)
        c = hf_decoder_config.config_to_hf(config)
        assert hf_decoder_config.config_from_hf(c) == config
        hf = transformers.AutoConfig.for_model(**json.loads(json.dumps(c)))
        assert hf.rope_parameters["rope_theta"] == config.rope_theta
        assert hf.rope_parameters["rope_type"] == dict(config.rope_scaling or {}).get(
            "rope_type", "default"
        )
        assert hf.head_dim == config.head_dim


def test_config_defaults_and_old_layout():
    config = hf_decoder_config.config_from_hf(LLAMA_JSON)
    assert (config.head_dim, config.rope_theta, config.rope_scaling) == (16, 10000.0, None)
    assert not config.tie_word_embeddings and not config.attention_bias
    # transformers 4 layout: rope_theta + rope_scaling (with the old "type" key), torch_dtype.
    old = {
        **LLAMA_JSON,
        "rope_theta": 5e5,
        "torch_dtype": "bfloat16",
        "max_position_embeddings": 99,
    }
    old["rope_scaling"] = {k: v for k, v in LLAMA3.items() if k != "rope_type"} | {"type": "llama3"}
    del old["rope_scaling"]["original_max_position_embeddings"]  # defaults to max positions
    config = hf_decoder_config.config_from_hf(old, dtype="bfloat16")
    assert config.rope_theta == 5e5 and config.dtype == "bfloat16"
    assert config.param_dtype == "float32"  # the file's dtype does not set ours
    assert dict(config.rope_scaling)["original_max_position_embeddings"] == 99
    # Qwen2Config defaults num_key_value_heads to 32 (Llama: to num_attention_heads).
    qwen = {k: v for k, v in BASE.items() if k != "num_key_value_heads"}
    qwen = hf_decoder_config.config_from_hf(
        {**qwen, "model_type": "qwen2", "num_attention_heads": 32}
    )
    assert qwen.family == "qwen2" and qwen.attention_bias
    assert (qwen.num_kv_heads, qwen.head_dim) == (32, 2)


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(architectures=["MistralForCausalLM"]), "architectures=['MistralForCausalLM']"),
        (dict(architectures=None, model_type="gemma"), "model_type='gemma'"),
        (dict(model_type="qwen2"), "model_type='qwen2' contradicts"),
        (dict(rope_parameters=dict(rope_type="yarn", factor=4.0)), "rope_type='yarn'"),
        (dict(rope_scaling=dict(type="linear", factor=2.0)), "rope_scaling.rope_type='linear'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(mlp_bias=True), "mlp_bias=True"),
        (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
        (dict(hidden_size=0), "hidden_size=0"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "'sliding_attention'"),
    ],
)
def test_config_refusals_name_the_value(edit, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        hf_decoder_config.config_from_hf({**LLAMA_JSON, **edit})


def test_qwen2_sliding_window_refused():
    c = dict(architectures=["Qwen2ForCausalLM"], **BASE, use_sliding_window=True)
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        hf_decoder_config.config_from_hf({**c, "max_window_layers": 1})
    assert hf_decoder_config.config_from_hf({**c, "max_window_layers": 2}).family == "qwen2"


# The published config.json of each named size (transformers 4 layout, as on the hub).
PUBLISHED = {
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "hidden_act": "silu",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "is_llama_config": True,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 9,
        "num_hidden_layers": 30,
        "num_key_value_heads": 3,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_interleaved": False,
        "rope_scaling": None,
        "rope_theta": 100000,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "vocab_size": 49152,
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "vocab_size": 128256,
    },
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_give_the_named_sizes(name):
    assert hf_decoder_config.config_from_hf(PUBLISHED[name]) == get_decoder_config(name)


def test_hub_snapshot_folder_of_symlinks(saved, tmp_path):
    """A hub cache snapshot holds relative symlinks into ../../blobs: loaded as files."""
    directory, model = saved["llama_gqa"]
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "0123abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (blobs / f"blob-{name}").write_bytes((directory / name).read_bytes())
        (snapshot / name).symlink_to(f"../../blobs/blob-{name}")
    config, params = hf_decoder.load_hf_decoder(snapshot)
    assert _max_diff(config, params, model) <= 1e-4
