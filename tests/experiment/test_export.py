"""Tests of thack_jax.experiment.export: the guard's candidate snapshots, the exported HF
students (loaded by transformers, logits equal to ours) and their model cards."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from thack_jax import models
from thack_jax.core import storage
from thack_jax.experiment import export
from thack_jax.models import hf

CONFIG = models.get_config("tiny", vocab_size=64, d_model=16, d_kv=8, num_heads=2, d_ff=32)
CARD = export.CardInfo(
    run="offline",
    regime="offline",
    teacher="tiny T5 teacher (models/teacher)",
    num_steps=40,
    metrics={
        20: {"proxy/forward_kl": 0.5, "proxy/forward_kl_stderr": 0.01, "golden/forward_kl": 0.9},
        40: {"proxy/forward_kl": 0.4, "golden/forward_kl": 1.1, "golden/forward_kl_stderr": 0.02},
    },
    fired_at=30,
)
_logits = jax.jit(models.logits, static_argnums=0)


def _params(seed):
    return models.init_params(CONFIG, jax.random.key(seed))


def _sharded(params):
    """The params with every leading axis divisible by 8 sharded over the 8 CPU devices."""
    mesh = Mesh(np.array(jax.devices()), ("data",))

    def place(x):
        spec = PartitionSpec("data") if x.shape and x.shape[0] % 8 == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, params)


def _batch():
    rng = np.random.default_rng(1)
    inputs = rng.integers(2, 64, (3, 10)).astype(np.int32)
    inputs[0, 6:] = 0  # padded prompts
    targets = rng.integers(2, 64, (3, 7)).astype(np.int32)
    targets[0, 5], targets[0, 6:] = 1, 0
    return inputs, targets


def _check_hf_equals_ours(directory, params):
    """transformers loads `directory`, generates, and its logits equal ours to 1e-4."""
    model = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
    inputs, targets = _batch()
    x, y = torch.from_numpy(inputs).long(), torch.from_numpy(targets).long()
    with torch.no_grad():
        theirs = model(input_ids=x, attention_mask=(x != 0).long(), labels=y).logits.numpy()
        generated = model.generate(
            input_ids=x, attention_mask=(x != 0).long(), max_new_tokens=4, do_sample=False
        )
    assert generated.shape[0] == 3 and 2 <= generated.shape[1] <= 5
    ours = np.asarray(_logits(CONFIG, params, inputs, targets))
    assert np.abs(ours - theirs).max() <= 1e-4


def test_snapshots_prune_and_export_load_in_transformers(tmp_path):
    run_dir = str(tmp_path / "run")
    snapshots = export.StudentSnapshots(run_dir, CONFIG)
    params = {step: _params(step) for step in (10, 20, 30)}
    for step, p in params.items():
        snapshots.save(step, _sharded(p))
    assert snapshots.steps() == [10, 20, 30]
    assert snapshots.prune({20, 99}) == [10, 30]
    assert snapshots.steps() == [20]
    assert storage.listdir(snapshots.directory) == ["step_20"]

    final = _params(40)
    summary = export.export_students(
        run_dir, config=CONFIG, final_params=final, final_step=40, best_step=20, card=CARD
    )
    on_disk = json.loads((tmp_path / "run/export/export.json").read_text())
    assert on_disk == summary
    assert summary["guard"] == {"fired": True, "fired_at": 30, "best_step": 20}
    assert summary["guard_best"]["step"] == 20 and summary["final"]["step"] == 40
    assert summary["guard_best"]["metrics"] == dict(CARD.metrics[20])
    best_dir, final_dir = tmp_path / "run/export/guard_best", tmp_path / "run/export/final"
    assert summary["guard_best"]["path"] == "export/guard_best"
    assert sorted(p.name for p in best_dir.iterdir()) == ["README.md", *export.HF_FILES]
    for name, digest in summary["guard_best"]["files"].items():
        assert storage.file_digest(str(best_dir / name)) == digest
    _check_hf_equals_ours(best_dir, params[20])
    _check_hf_equals_ours(final_dir, final)
    readme = (best_dir / "README.md").read_text()
    assert "step 20" in readme and "fired at step 30" in readme and "oracle-free" in readme
    assert "| proxy/forward_kl | 0.5 | 0.01 |" in readme
    assert "| golden/forward_kl | 0.9 |  |" in readme
    assert "last training step (40)" in (final_dir / "README.md").read_text()


def test_killed_save_is_not_listed_and_is_replaced(tmp_path):
    run_dir = str(tmp_path)
    snapshots = export.StudentSnapshots(run_dir, CONFIG)
    snapshots.save(10, _params(10))
    # A save of step 20 killed before its marker: the HF files, some of them, no DONE.json.
    partial = tmp_path / "candidates/step_20"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert snapshots.steps() == [10]
    with pytest.raises(FileNotFoundError, match=r"best step 20 in .*candidates \(complete: \[10\]"):
        export.export_students(
            run_dir, config=CONFIG, final_params=_params(0), final_step=40, best_step=20, card=CARD
        )
    assert not (tmp_path / "export").exists()  # refused before writing anything
    snapshots.save(20, _params(20))  # the rerun's evaluation of step 20
    assert snapshots.steps() == [10, 20]
    _, loaded = hf.load_hf_checkpoint(snapshots.path(20))
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(_params(20)))
    # A partial folder of a step that is not kept goes with the pruning.
    (tmp_path / "candidates/step_30").mkdir()
    assert snapshots.prune({20}) == [10, 30]
    assert storage.listdir(snapshots.directory) == ["step_20"]


def test_best_step_equal_to_final_still_writes_both(tmp_path):
    run_dir = str(tmp_path)
    final = _params(5)
    card = export.CardInfo("online", "online_teacher", "teacher", 40, fired_at=None)
    summary = export.export_students(
        run_dir, config=CONFIG, final_params=final, final_step=40, best_step=40, card=card
    )
    assert summary["guard"] == {"fired": False, "fired_at": None, "best_step": 40}
    for kind in ("final", "guard_best"):
        _, loaded = hf.load_hf_checkpoint(str(tmp_path / "export" / kind))
        jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(final))
    readme = (tmp_path / "export/guard_best/README.md").read_text()
    assert "never fired, so the evaluation with the lowest proxy" in readme
    assert "No evaluation was logged at step 40." in readme


def test_model_card():
    text = export.model_card("final", 40, 20, CARD)
    assert text.startswith("# offline: final student (step 40)\n")
    for line in (
        "- Regime: offline",
        "- Teacher: tiny T5 teacher (models/teacher)",
        "- Steps: 40 of 40 training steps",
        "- Hacking guard: fired at step 30 (the proxy departed from its power law); best step 20",
        "| proxy/forward_kl | 0.4 |  |",
        "| golden/forward_kl | 1.1 | 0.02 |",
    ):
        assert line in text.splitlines()
    assert "stderr" not in text.split("golden/forward_kl | 1.1")[1].split("\n")[1]  # paired
    assert "Other logged values" not in text  # empty groups are left out
    with pytest.raises(ValueError, match="kind='best'"):
        export.model_card("best", 40, 20, CARD)


def test_snapshots_and_export_on_gcs(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local folder named gs: would appear here
    run_dir = gcs_bucket + "/run"
    snapshots = export.StudentSnapshots(run_dir, CONFIG)
    for step in (10, 20):
        snapshots.save(step, _params(step))
    assert snapshots.steps() == [10, 20]
    assert snapshots.prune({10}) == [20]
    assert snapshots.steps() == [10]
    summary = export.export_students(
        run_dir, config=CONFIG, final_params=_params(40), final_step=40, best_step=10, card=CARD
    )
    assert summary["guard_best"]["path"] == "export/guard_best"
    assert storage.read_json(run_dir + "/export/export.json") == summary
    _, loaded = hf.load_hf_checkpoint(run_dir + "/export/guard_best")
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(_params(10)))
    local = tmp_path / "guard_best"
    local.mkdir()
    for name in (*export.HF_FILES, "README.md"):
        (local / name).write_bytes(storage.read_bytes(f"{run_dir}/export/guard_best/{name}"))
    _check_hf_equals_ours(local, _params(10))
    assert not (tmp_path / "gs:").exists()
