"""`benchmark.py table`: the roofline byte count, and the whole table at the tiny size
(every row present, every ratio finite and positive). Nothing is timed against a bound."""

from __future__ import annotations

import math
import os

import pytest

from thack_jax import models
from thack_jax.cli import bench_limits, bench_table, benchmark

TINY_TABLE = [
    "--size=tiny",
    "--repeats=1",
    "--decode_batch=1,2",
    "--batch=4",
    "--input_len=8",
    "--target_len=8",
    "--new_tokens=4",
    "--eval_prompts=4",
    "--bandwidth_mib=16",
    "--matmul_size=128",
]


def test_decode_step_bytes_of_the_tiny_config_is_the_hand_count():
    # tiny: V 128, D 32, H 4 x d_kv 8 (I 32), F 64, gated-gelu, 2 decoder layers, 8 buckets.
    per_layer = 6 * 32 * 32 + 3 * 32 * 64 + 3 * 32  # 6 attention kernels, MLP, 3 norms
    weights = 2 * per_layer + 32 + 4 * 8 + 128 * 32  # + final norm, relpos table, logits
    assert weights == 28_928
    batch, prompt_len, new_tokens = 2, 8, 4
    cache = 2 * 2 * batch * 32 * (new_tokens + 1) / 2  # layers x (K, V) x B x I x mean len
    cross = 2 * 2 * batch * 32 * prompt_len
    assert (cache, cross) == (640, 2048)
    expected = 4 * (weights + cache + cross)  # float32
    assert expected == 126_464
    config = models.get_config("tiny")
    assert bench_limits.decode_step_bytes(config, batch, prompt_len, new_tokens) == expected


def test_decode_step_bytes_counts_the_relu_mlp_and_bfloat16_parameters():
    config = models.get_config("tiny", feed_forward="relu", param_dtype="bfloat16")
    weights = 2 * (6 * 32 * 32 + 2 * 32 * 64 + 3 * 32) + 32 + 4 * 8 + 128 * 32
    expected = 2 * weights + 4 * (2 * 2 * 1 * 32 * 1 + 2 * 2 * 1 * 32 * 3)
    assert bench_limits.decode_step_bytes(config, 1, 3, 1) == expected


def test_the_layer_kernels_are_the_decode_steps_per_layer_reads():
    config = models.get_config("tiny")
    shapes = bench_limits.layer_kernel_shapes(config)
    assert len(shapes) == config.num_decoder_layers * 9  # q k v o, cross q o, wi_0 wi_1 wo
    per_layer = sum(i * o for i, o in shapes) // config.num_decoder_layers
    d, inner, f = config.d_model, config.inner_dim, config.d_ff
    assert per_layer == 6 * d * inner + 3 * d * f  # decode_step_bytes' layer weights
    assert bench_limits.gemv_chain_bandwidth(config, 1) > 0


def test_the_load_warning_appears_only_above_max_load():
    assert any(line.startswith("WARNING") for line in bench_limits.load_line("at start", -1.0))
    assert len(bench_limits.load_line("at start", 1e9)) == 1


def test_the_end_load_allows_for_the_benchmarks_own_threads():
    load = os.getloadavg()[0]
    lines = bench_limits.load_line("at end", load - 0.5, own_threads=1)
    assert "own ~1 busy threads" in lines[0]
    assert len(lines) == 1  # load <= (load - 0.5) + 1: the own threads are not other jobs
    above = bench_limits.load_line("at end", load - 1.5, own_threads=1)
    assert above[1].startswith("WARNING") and "+ 1 own threads" in above[1]


def test_a_skipped_baseline_is_a_row_without_a_ratio():
    assert bench_table.row("x, tokens/s", 3.0, None) == "| x, tokens/s | 3 | skipped | - |"
    assert bench_table.row("x", 1.0, 4.0, "%") == "| x | 1 | 4 | 25.0% |"


def _table(out: str) -> list[list[str]]:
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0] == bench_table.HEADER[0], out
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def _ratio(cell: str) -> float:
    return float(cell[:-1]) / (100 if cell.endswith("%") else 1)


@pytest.mark.slow  # ~1-2.5 min on 2 cores: a dozen small compilations, the baselines ~10 s
def test_the_tiny_table_has_every_row_with_finite_positive_ratios(capsys):
    assert benchmark.main(["benchmark.py", "table", *TINY_TABLE]) == 0
    out, err = capsys.readouterr()
    rows = _table(out)
    figures = [r[0] for r in rows]
    expected_starts = [
        "memory read bandwidth, GB/s",
        "f32 matmul peak, GFLOP/s",
        "decoder layers' matmuls at batch 1 (",
        "sampler batch 1, tokens/s: ours vs HF generate (",
        "sampler batch 1, tokens/s: ours vs memory roofline (",
        "sampler batch 2, tokens/s: ours vs HF generate (",
        "sampler batch 2, tokens/s: ours vs memory roofline (",
        "train step, tokens/s: ours vs PyTorch + transformers (",
        "train step, model GFLOP/s: ours vs f32 matmul peak",
        "online-teacher step, s: vs offline step (s)",
        "online-student step, s: vs offline step (s)",
        "evaluator, s per checkpoint (4 x 2, in 8, out 4): vs offline step (s)",
        "evaluator, s per checkpoint: vs the same without the reference cache "
        "(reference_cache_mib=0, 7 decoder passes), s",
        "evaluator: drawing the student's samples, s: share of a checkpoint",
        "evaluator: scoring (each model on each sample set), s: share of a checkpoint",
        "evaluator setup (reference samples, once per run), s: vs a checkpoint (s)",
    ]
    assert len(figures) == len(expected_starts), out
    for figure, start in zip(figures, expected_starts, strict=True):
        assert figure.startswith(start), (figure, start)
    for figure, ours, reference, ratio in rows:
        assert float(ours) > 0 and math.isfinite(float(ours)), figure
        if figure.startswith(("memory", "f32")):
            assert (reference, ratio) == ("-", "-")
            continue
        value = _ratio(ratio)
        assert math.isfinite(value) and value > 0, (figure, ratio)
        # The cells are rounded (4 significant digits, ratios to 0.01x or 0.1%).
        assert value == pytest.approx(float(ours) / float(reference), rel=0.02, abs=0.01)
    assert "measuring sampler batch 2 ..." in err
    assert out.count("load average") == 2
    assert any(line.startswith("Model name") for line in out.splitlines())


def test_the_defaults_are_the_published_shape_and_flags_parse_again_from_them():
    args = bench_table.parse_args(["prog", "--decode_batch=1,2", "--skip_hf", "--size=tiny"])
    assert (args.decode_batch, args.skip_hf, args.size) == ([1, 2], True, "tiny")
    args = bench_table.parse_args(["prog"])
    shape = (args.size, args.repeats, args.decode_batch, args.batch, args.input_len)
    assert shape == ("small", 3, [1, 32], 32, 64)
    assert (args.target_len, args.new_tokens, args.eval_prompts) == (64, 64, 32)
    assert (args.bandwidth_mib, args.max_load, args.skip_hf, args.skip_torch) == (
        1024,
        0.5,
        False,
        False,
    )
