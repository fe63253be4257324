"""The whole study with decoder-only roles: a tiny experiment whose oracle, teacher and
student are Llama-architecture models runs every stage and every regime through the one
model seam, writes the report, and exports students that transformers' LlamaForCausalLM
loads with our logits. Plus the shipped gin config builds."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _experiment_common import tiny_config

from thack_jax import models
from thack_jax.experiment import gin_registry, runner
from thack_jax.experiment.config import ModelSpec
from thack_jax.models import hf_io

LLAMA = {"vocab_size": 64, "d_model": 16, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8}
LLAMA |= {"d_ff": 32, "num_layers": 2}


def _decoder_config(**overrides):
    roles = dict(
        oracle=ModelSpec(size="llama-tiny", overrides=LLAMA | {"init_std": 0.125}, init_seed=0),
        teacher=ModelSpec(size="llama-tiny", overrides=LLAMA, init_seed=1),
        student=ModelSpec(size="llama-tiny", overrides=LLAMA, init_seed=2),
    )
    return tiny_config(**{**roles, **overrides})


def test_the_shipped_decoder_config_builds_decoder_only_roles():
    gin_registry.parse(["experiments/decoder_default.gin"])
    cfg = gin_registry.experiment_config()
    for role in cfg.roles:
        config = cfg.model_config(role)
        assert models.is_decoder_only(config) and config.family == "llama", role
    assert cfg.model_config("oracle").init_std == 0.125


@pytest.mark.slow
def test_every_stage_and_regime_runs_with_decoder_only_roles(tmp_path):
    cfg = _decoder_config()
    workdir = str(tmp_path / "wd")
    runner.Experiment(cfg, workdir, progress=False).run()
    assert os.path.isfile(os.path.join(workdir, "report.md"))
    for run in cfg.runs:
        rows = [json.loads(line) for line in open(f"{workdir}/runs/{run.name}/train/metrics.jsonl")]
        evals = [r for r in rows if "golden/forward_kl" in r]
        assert [r["step"] for r in evals] == [0, 3, 6], run.name
        assert all(np.isfinite(r["proxy/forward_kl"]) and r["golden/js"] >= 0 for r in evals)
    # The exported student loads in transformers (a LlamaForCausalLM) with our logits.
    folder = f"{workdir}/runs/online_student/export/final"
    assert "LlamaForCausalLM" in open(f"{folder}/README.md").read()
    config, params = hf_io.load(folder)
    assert models.is_decoder_only(config)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt, response = np.array([[5, 9, 12, 7]]), np.array([[3, 4, 8]])
    ours = models.logits(config, params, jnp.asarray(prompt), jnp.asarray(response))
    with torch.no_grad():
        ids = torch.tensor(np.concatenate([prompt, response[:, :-1]], axis=1))
        hf = theirs(input_ids=ids).logits.numpy()[:, prompt.shape[1] - 1 :]
    np.testing.assert_allclose(np.asarray(ours), hf, atol=1e-4)


def test_roles_of_different_vocabularies_are_refused_naming_each_size():
    other = ModelSpec(size="llama-tiny", overrides=LLAMA | {"vocab_size": 72}, init_seed=2)
    cfg = _decoder_config(student=other)
    with pytest.raises(
        ValueError, match=r"vocabularies differ \(oracle 64, teacher 64, student 72\)"
    ):
        runner.check_models(cfg)
    runner.check_models(_decoder_config())  # one vocabulary: accepted
