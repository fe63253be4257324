"""The real tasks (XSum, WMT-14 en-de) through every stage of the experiment, with tiny
models: real TFDS files (written by the test from its own small corpus, in the builders'
own format and directories), a SentencePiece model trained on that corpus, and the
experiment run in-process. Each parametrization is one (task, mode); field mode only needs
a line in TASK_MODES (`real_task_config` gives it its settings).
"""

import json
import math
import os

import numpy as np
import pytest
from _experiment_common import TINY, tiny_config

from thack_jax.experiment import runner
from thack_jax.experiment.config import ModelSpec, RunConfig
from thack_jax.training.metrics_io import read_metrics

# TFDS name and (input, target) features of each task (thack_jax/data/tasks.py).
TFDS_NAMES = {"xsum": "xsum:1.1.0", "wmt14_ende": "wmt14_translate/de-en:1.0.0"}
PREFIXES = {"xsum": "summarize: ", "wmt14_ende": "translate English to German: "}
INPUT_KEYS = {"xsum": "document", "wmt14_ende": "en"}
TARGET_KEYS = {"xsum": "summary", "wmt14_ende": "de"}
NUM_TRAIN, NUM_VALIDATION = 64, 16
# The stages each mode runs (runner.MODE_STAGES) and the metric groups its runs log.
STAGE_DIRS = {
    "oracle": ("oracle", "oracle_data", "teacher", "student_init"),
    "field": ("reference_data", "teacher", "student_init"),
}
METRIC_PREFIXES = {"oracle": ("golden/", "proxy/"), "field": ("proxy/", "reference/")}
# Field mode is one more line, e.g. ("xsum", "field"): real_task_config adds its settings.
TASK_MODES = [
    ("xsum", "oracle"),
    ("wmt14_ende", "oracle"),
    ("xsum", "field"),
    ("wmt14_ende", "field"),
]

# A tiny parallel corpus: English words and their German counterparts.
_LEXICON = {
    "the": "der", "small": "kleine", "old": "alte", "red": "rote", "dog": "Hund",
    "man": "Mann", "house": "Haus", "car": "Wagen", "sees": "sieht", "finds": "findet",
    "buys": "kauft", "near": "bei", "in": "im", "town": "Stadt", "park": "Park",
    "today": "heute", "again": "wieder",
}  # fmt: skip
_SUBJECTS, _ADJS = ("dog", "man"), ("small", "old", "red")
_OBJECTS, _VERBS = ("house", "car", "dog"), ("sees", "finds", "buys")
_PLACES, _TIMES = ("town", "park"), ("today", "again")


def _sentence(rng) -> tuple[str, str]:
    """One English sentence and its word-by-word German counterpart."""
    words = ["the", rng.choice(_ADJS), rng.choice(_SUBJECTS), rng.choice(_VERBS), "the"]
    words += [rng.choice(_OBJECTS), rng.choice(("near", "in")), "the", rng.choice(_PLACES)]
    if rng.random() < 0.5:
        words.append(rng.choice(_TIMES))
    return " ".join(words), " ".join(_LEXICON[w] for w in words)


def _corpus(seed: int, n: int) -> dict[str, list[dict]]:
    """{task: n examples} as TFDS features: XSum documents of three sentences summarised
    by a shortened first one; WMT-14 sentence pairs."""
    rng = np.random.default_rng(seed)
    xsum, wmt = [], []
    for _ in range(n):
        english = [_sentence(rng)[0] for _ in range(3)]
        xsum.append({"document": ". ".join(english) + ".", "summary": english[0][:30]})
        en, de = _sentence(rng)
        wmt.append({"en": en, "de": de})
    return {"xsum": xsum, "wmt14_ende": wmt}


def _write_tfds(task: str, data_dir: str, splits: dict[str, list[dict]]) -> None:
    """The task's dataset as a prepared TFDS dataset in data_dir (dataset_info.json,
    features.json, tfrecord shards under <name>/<config>/<version>/), written from the
    builder's own DatasetInfo: what `tfds build` leaves, read back by tfds.builder."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import sequential_writer

    builder = tfds.builder(TFDS_NAMES[task], data_dir=data_dir)
    os.makedirs(builder.info.data_dir, exist_ok=True)
    writer = sequential_writer.SequentialWriter(builder.info, max_examples_per_shard=1000)
    writer.initialize_splits(list(splits))
    writer.add_examples(splits)
    writer.close_all()


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """{'sp_model', 'vocab_size', 'data_dir', 'validation'}: the SentencePiece model path, its
    vocab size, the TFDS data_dir of both tasks and their validation examples."""
    import sentencepiece as spm

    from thack_jax.data.vocab import sentencepiece_vocabulary

    root = tmp_path_factory.mktemp("real_tasks")
    train, validation = _corpus(0, NUM_TRAIN), _corpus(1, NUM_VALIDATION)
    data_dir = str(root / "tfds")
    for task in TFDS_NAMES:
        _write_tfds(task, data_dir, {"train": train[task], "validation": validation[task]})
    texts = [  # the encoder's inputs and the targets, as the tasks tokenize them
        text
        for task, rows in train.items()
        for ex in rows
        for text in (PREFIXES[task] + ex[INPUT_KEYS[task]], ex[TARGET_KEYS[task]])
    ]
    prefix = str(root / "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=prefix,
        model_type="bpe",  # whole-word pieces on this tiny corpus (unigram: 73 pieces)
        vocab_size=128,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    vocab_size = sentencepiece_vocabulary(prefix + ".model").vocab_size  # extra_ids 0
    return {
        "sp_model": prefix + ".model",
        "vocab_size": vocab_size,
        "data_dir": data_dir,
        "validation": validation,
    }


def real_task_config(task: str, sp_model: str, data_dir: str, **overrides):
    """The tiny experiment of tests/_experiment_common.py on a real task: the models'
    vocabulary is the SentencePiece model's (`vocab_size=` in overrides, required), lengths
    16 / 8, runs offline and online_teacher. mode='field' also gets field mode's settings
    (no oracle logit scale; the SFTs read 64 reference examples)."""
    tiny = {**TINY, "vocab_size": overrides.pop("vocab_size")}
    models = {
        role: ModelSpec(overrides=tiny, init_seed=seed)
        for role, seed in (("oracle", 0), ("teacher", 1), ("student", 2))
    }
    if overrides.get("mode") == "field":
        overrides = {"oracle_logit_scale": 1.0, "reference_examples": NUM_TRAIN, **overrides}
    base = dict(
        name=f"real_{task}",
        task=task,
        task_options={"sentencepiece_model": sp_model, "tfds_data_dir": data_dir},
        max_input_length=16,
        max_target_length=8,
        oracle_data_prompts=32,
        distill_prompt_pool=32,
        runs=(
            RunConfig(name="offline", regime="offline", num_prompts=16),
            RunConfig(name="online_teacher", regime="online_teacher"),
        ),
        **models,
    )
    return tiny_config(**{**base, **overrides})


def _finite_metrics(metrics_path: str, prefixes: tuple[str, ...]) -> list[dict]:
    rows = read_metrics(metrics_path)
    evals = [r for r in rows if any(k.startswith(prefixes) for k in r)]
    assert evals, f"{metrics_path}: no {prefixes} metrics"
    for prefix in prefixes:
        for row in evals:
            values = {k: v for k, v in row.items() if k.startswith(prefix)}
            assert values, f"{metrics_path} step {row['step']}: no {prefix} metric"
            assert all(math.isfinite(v) for v in values.values()), (row["step"], values)
    return evals


@pytest.mark.slow
@pytest.mark.parametrize("task,mode", TASK_MODES)
def test_real_task_through_every_stage(task_files, tmp_path, task, mode):
    from thack_jax.data.vocab import sentencepiece_vocabulary

    files, extra = task_files, {} if mode == "oracle" else {"mode": mode}
    cfg = real_task_config(
        task, files["sp_model"], files["data_dir"], vocab_size=files["vocab_size"], **extra
    )
    workdir = str(tmp_path / "wd")
    runner.Experiment(cfg, workdir, progress=False).run()

    for stage in STAGE_DIRS[mode]:
        marker = os.path.join(workdir, stage, "COMPLETE.json")
        assert os.path.exists(marker), stage
        assert json.load(open(marker))["outputs"], stage
    # The evaluation prompts are the task's validation inputs, read from the TFDS files.
    eval_prompts = np.load(os.path.join(workdir, "eval_prompts.npy"))
    assert eval_prompts.shape == (cfg.evaluation.num_prompts, 16)
    assert (eval_prompts == 1).sum(axis=1).tolist() == [1] * len(eval_prompts)  # one EOS
    assert eval_prompts.max() < files["vocab_size"]
    vocab = sentencepiece_vocabulary(files["sp_model"])
    written = [PREFIXES[task] + ex[INPUT_KEYS[task]] for ex in files["validation"][task]]
    for row in eval_prompts:  # cut to 15 pieces: a prefix of one written input
        text = vocab.decode(row[: list(row).index(1)].tolist())
        assert any(w.startswith(text) for w in written), text
    assert len({tuple(r) for r in eval_prompts}) > 1
    for run in cfg.runs:
        run_dir = os.path.join(workdir, "runs", run.name)
        assert os.path.exists(os.path.join(run_dir, "COMPLETE.json")), run.name
        rows = read_metrics(os.path.join(run_dir, "train", "metrics.jsonl"))
        train_steps = [r["step"] for r in rows if "train/loss" in r]
        assert train_steps == list(range(1, cfg.distill.num_steps + 1)), run.name
        evals = _finite_metrics(
            os.path.join(run_dir, "train", "metrics.jsonl"), METRIC_PREFIXES[mode]
        )
        assert [r["step"] for r in evals] == [0, 3, 6], run.name
    report = open(os.path.join(workdir, "report.md")).read()
    assert "offline" in report and "online_teacher" in report
