"""The decoder-only sampling benchmark (`benchmark.py sampling --family llama`): a smoke run
of the real tool at the tiny size in a subprocess (table and ratios printed; no timing is
asserted), and the pieces its numbers rest on: the left padding HF gets, the bytes a decode
step reads, the size flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from thack_jax import models
from thack_jax.cli import bench_sampling, bench_sampling_decoder

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"\d+\.\d+"


def test_smoke_run_prints_the_table_with_ratios():
    args = "--family=llama --size=llama-tiny --batch 1,2 --prompt_len 8 --new_tokens 4"
    args += " --repeats 1 --naive_steps 2 --ragged --breakdown"
    # This checkout's package, whatever the editable install points to.
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "benchmark.py"), "sampling", *args.split()],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    first = out.splitlines()[0]
    assert first.startswith("sampling benchmark: size=llama-tiny (d_model=64, layers=2, "), first
    assert "ragged prompts, prompt_len=8, new_tokens=4" in first, first
    header = (
        "| batch | ours tok/s | ours, gumbel draw tok/s | naive tok/s | HF generate tok/s "
        "| ours/naive | ours/HF |"
    )
    lines = out.splitlines()
    final = lines[lines.index(header, 1) :]  # the table printed at the end
    assert final[1] == "|---:|---:|---:|---:|---:|---:|---:|"
    cell = rf" \| ({NUMBER})"
    row = re.compile(rf"^\| (\d+){cell} \| nan{cell}{cell}{cell}x{cell}x \|$")
    matches = [row.match(line) for line in final[2:]]
    assert all(matches), final
    assert [int(m.group(1)) for m in matches] == [1, 2]
    for m in matches:
        ours, naive, hf, vs_naive, vs_hf = (float(g) for g in m.groups()[1:])
        assert min(ours, naive, hf) > 0
        # The ratios are of the printed rates (up to the printed rounding).
        assert vs_hf == pytest.approx(ours / hf, abs=0.006, rel=0.01)
        assert vs_naive == pytest.approx(ours / naive, abs=0.06, rel=0.01)
    for batch in (1, 2):
        assert f"  batch {batch}: HF best with torch.set_num_threads(" in out
        weights, kv = bench_sampling_decoder.step_bytes(
            models.get_config("llama-tiny"), batch, 8, 4
        )
        assert re.search(
            rf"  batch {batch}: a decode step reads {weights / 1e6:.1f} MB of weights \+ "
            rf"{kv / 1e6:.1f} MB of K/V cache buffer; ours over the whole call -?{NUMBER} GB/s",
            out,
        ), out
        assert re.search(rf"  batch {batch}: 1-token sample \(prefill\) {NUMBER} ms", out), out


def test_left_pad_moves_each_rows_tokens_to_the_right_end():
    right = np.array([[5, 6, 7, 0], [8, 9, 0, 0], [2, 3, 4, 5]], np.int32)
    ids, mask = bench_sampling_decoder.left_pad(right)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 8, 9], [2, 3, 4, 5]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert mask.dtype == np.int64  # torch's attention_mask dtype


def test_prompts_are_right_padded_with_full_rows_unless_ragged():
    config = models.get_config("llama-tiny")
    full = bench_sampling_decoder.prompts(config, 4, 10, ragged=False)
    assert full.shape == (4, 10) and full.dtype == np.int32 and (full >= 2).all()
    ragged = bench_sampling_decoder.prompts(config, 16, 10, ragged=True)
    lengths = (ragged != 0).sum(axis=1)
    assert lengths[0] == 10 and lengths.min() >= 5 and len(set(lengths)) > 1
    # Right padding: every row is tokens then zeros.
    np.testing.assert_array_equal(ragged != 0, np.arange(10)[None] < lengths[:, None])


@pytest.mark.parametrize("size", ["llama-tiny", "qwen2-tiny"])
def test_step_bytes_counts_the_weights_read_and_the_whole_cache_buffer(size):
    config = models.get_config(size)
    batch, prompt_len, new_tokens = 3, 5, 7
    weights, kv = bench_sampling_decoder.step_bytes(config, batch, prompt_len, new_tokens)
    total = models.count_params(config) * 4  # float32
    table = config.vocab_size * config.d_model * 4
    # A tied table is the output projection (read whole); an untied one is looked up.
    expected = total if config.tie_word_embeddings else total - table + batch * config.d_model * 4
    assert weights == expected
    assert bench_sampling_decoder.param_bytes(config) == total
    slots = prompt_len + new_tokens
    per_layer = 2 * batch * config.num_kv_heads * slots * config.head_dim * 4  # K and V
    assert kv == config.num_layers * per_layer


def test_size_flags_follow_the_family():
    args = bench_sampling.parse_args(["prog", "--family=llama"])
    assert args.size == "smollm2-135m"
    assert bench_sampling.parse_args(["prog"]).size == "small"
    assert "llama-tiny" in bench_sampling_decoder.sizes("llama")
    assert "qwen2-tiny" not in bench_sampling_decoder.sizes("llama")
    assert bench_sampling.parse_args(["prog", "--family=qwen2"]).size == "qwen2.5-0.5b"
    for argv in (["--family=llama", "--size=small"], ["--size=llama-tiny"], ["--ragged"]):
        with pytest.raises(flags.IllegalFlagValueError):
            bench_sampling.parse_args(["prog", *argv])
