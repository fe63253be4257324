"""Tests of the seqio tasks: synthetic (with and without TF), TFDS tasks on mock data,
Natural Instructions from JSON fixtures, and the missing-dataset error.

XSum and WMT-14 use `tfds.testing.mock_data` (random text generated from the builders'
feature specs; it works offline). A tiny SentencePiece model is trained by the test.
"""

import json
import os

import numpy as np
import pytest

from thack_jax.data import tasks
from thack_jax.data.synthetic import (
    EOS_ID,
    FIRST_WORD_ID,
    synthetic_prompts,
    synthetic_references,
)
from thack_jax.data.vocab import sentencepiece_vocabulary


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece model with T5 special ids, trained here."""
    import sentencepiece as spm

    sentences = [
        "summarize: the cat sat on the mat",
        "translate English to German: the house is small",
        "Summarize item 0. Input: the sea is blue",
    ]
    prefix = str(tmp_path_factory.mktemp("sp") / "tiny_sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 10),
        model_prefix=prefix,
        vocab_size=50,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return prefix + ".model"


def _expected_row(vocab, text, length):
    ids = list(vocab.encode(text))[: length - 1] + [EOS_ID]
    return np.pad(np.array(ids, np.int32), (0, length - len(ids)))


def test_task_names_and_unknown_task():
    assert tasks.TASK_NAMES == ("synthetic", "xsum", "wmt14_ende", "natural_instructions")
    with pytest.raises(ValueError, match="valid task names: synthetic, xsum"):
        tasks.load_prompts("cnn_dm", split="train", num_prompts=2, max_input_length=8)


def test_task_data_names_the_bad_field():
    with pytest.raises(ValueError, match="TaskData.tfds_data_dir=3"):
        tasks.TaskData(tfds_data_dir=3)
    with pytest.raises(ValueError, match="data must be a TaskData"):
        tasks.load_prompts("synthetic", split="train", num_prompts=2, max_input_length=8, data={})


def test_text_task_needs_vocabulary():
    with pytest.raises(ValueError, match="needs a vocabulary"):
        tasks.get_task("xsum")


def test_synthetic_direct_equals_seqio_and_has_references():
    for split in ("train", "validation"):
        kw = dict(split=split, num_examples=12, max_input_length=14, max_target_length=4, seed=3)
        direct = tasks.load_examples("synthetic", **kw)
        via = tasks.load_examples("synthetic", via_seqio=True, **kw)
        np.testing.assert_array_equal(direct["inputs"], via["inputs"])
        np.testing.assert_array_equal(
            direct["inputs"], synthetic_prompts(12, split=split, seed=3, max_length=14)
        )
        # Direct: the procedural references of the prompts, same seed; seqio: empty targets.
        np.testing.assert_array_equal(
            direct["targets"], synthetic_references(direct["inputs"], seed=3, max_length=4)
        )
        assert (via["targets"] == [[EOS_ID, 0, 0, 0]] * 12).all()
    assert (direct["targets"][:, :3] >= FIRST_WORD_ID).all() and (
        direct["targets"][:, 3] == 1
    ).all()
    prompts = tasks.load_prompts("synthetic", split="train", num_prompts=5, max_input_length=14)
    np.testing.assert_array_equal(prompts, synthetic_prompts(5, seed=0, max_length=14))


def test_register_tasks_is_idempotent(sp_model, tmp_path):
    import seqio

    first = tasks.register_tasks(vocabulary=sp_model, tfds_data_dir=str(tmp_path))
    assert set(first) == {"synthetic", "xsum", "wmt14_ende"}
    assert tasks.register_tasks(vocabulary=sp_model, tfds_data_dir=str(tmp_path)) == first
    for name in first.values():
        task = seqio.TaskRegistry.get(name)
        assert set(task.output_features) == {"inputs", "targets"}
    other = tasks.register_tasks(vocabulary=sp_model, tfds_data_dir=str(tmp_path / "x"))
    assert other["xsum"] != first["xsum"] and other["synthetic"] == first["synthetic"]


@pytest.mark.parametrize(
    "task_name,tfds_name,split,in_key,out_key,prefix",
    [
        ("xsum", "xsum", "train", "document", "summary", "summarize: "),
        (
            "wmt14_ende",
            "wmt14_translate/de-en",
            "validation",
            "en",
            "de",
            "translate English to German: ",
        ),
    ],  # fmt: skip
)
def test_tfds_tasks_on_mock_data(
    sp_model, tmp_path, task_name, tfds_name, split, in_key, out_key, prefix
):
    import tensorflow_datasets as tfds

    vocab = sentencepiece_vocabulary(sp_model)
    with tfds.testing.mock_data(num_examples=6):
        raw = list(tfds.load(tfds_name, split=split).as_numpy_iterator())
        ex = tasks.load_examples(
            task_name,
            split=split,
            num_examples=5,
            max_input_length=24,
            max_target_length=6,
            seed=None,
            data=tasks.TaskData(vocabulary=sp_model, tfds_data_dir=str(tmp_path)),
        )
        shuffled = tasks.load_prompts(
            task_name,
            split=split,
            num_prompts=6,
            max_input_length=24,
            seed=1,
            data=tasks.TaskData(vocabulary=sp_model, tfds_data_dir=str(tmp_path)),
        )
    assert ex["inputs"].shape == (5, 24) and ex["targets"].shape == (5, 6)
    for i in range(5):
        text_in = prefix + raw[i][in_key].decode()
        np.testing.assert_array_equal(ex["inputs"][i], _expected_row(vocab, text_in, 24))
        text_out = raw[i][out_key].decode()
        np.testing.assert_array_equal(ex["targets"][i], _expected_row(vocab, text_out, 6))
    # Shuffling with a seed permutes the same examples.
    assert sorted(map(tuple, shuffled)) == sorted(
        tuple(_expected_row(vocab, prefix + r[in_key].decode(), 24)) for r in raw
    )


def test_missing_tfds_dataset_says_how_to_prepare(sp_model, tmp_path):
    missing = str(tmp_path / "empty_tfds")
    with pytest.raises(tasks.DatasetNotPreparedError) as e:
        tasks.load_prompts(
            "xsum", split="train", num_prompts=2, max_input_length=8,
            data=tasks.TaskData(vocabulary=sp_model, tfds_data_dir=missing),
        )  # fmt: skip
    msg = str(e.value)
    assert "xsum" in msg and missing in msg and "tfds build xsum" in msg and "manual" in msg
    assert isinstance(e.value, FileNotFoundError)


def _write_ni(directory, num_tasks=2, per_task=40):
    os.makedirs(directory, exist_ok=True)
    texts = []
    for k in range(num_tasks):
        instances = [
            {"id": f"task{k}-{i}", "input": f"the cat sat {i}", "output": [f"the sea {i}", "x"]}
            for i in range(per_task)
        ]
        instances.append({"id": "empty", "input": "no answer", "output": []})  # skipped
        task = {"Definition": [f"Summarize item {k}."], "Instances": instances}
        with open(os.path.join(directory, f"task{k:03d}_demo.json"), "w") as f:
            json.dump(task, f)
        texts += [
            (f"Summarize item {k}.\n\nInput: {x['input']}", x["output"][0]) for x in instances[:-1]
        ]
    return texts


def test_natural_instructions(sp_model, tmp_path):
    ni = str(tmp_path / "ni")
    texts = _write_ni(ni)
    train = list(tasks.iter_natural_instructions(ni, "train"))
    val = list(tasks.iter_natural_instructions(ni, "validation"))
    pairs = [(e["inputs"], e["targets"]) for e in train + val]
    assert sorted(pairs) == sorted(texts) and 0 < len(val) < len(train)
    assert not {p["inputs"] for p in train} & {p["inputs"] for p in val}

    vocab = sentencepiece_vocabulary(sp_model)
    ex = tasks.load_examples(
        "natural_instructions",
        split="validation",
        num_examples=len(val),
        max_input_length=10,  # truncates: rows must still end with EOS
        max_target_length=8,
        seed=None,
        data=tasks.TaskData(vocabulary=sp_model, natural_instructions_dir=ni),
    )
    for i, e in enumerate(val):
        np.testing.assert_array_equal(ex["inputs"][i], _expected_row(vocab, e["inputs"], 10))
        np.testing.assert_array_equal(ex["targets"][i], _expected_row(vocab, e["targets"], 8))
    with pytest.raises(ValueError, match="only"):
        tasks.load_prompts(
            "natural_instructions", split="validation", num_prompts=len(val) + 1,
            max_input_length=10, seed=None,
            data=tasks.TaskData(vocabulary=sp_model, natural_instructions_dir=ni),
        )  # fmt: skip


def test_natural_instructions_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(tasks.iter_natural_instructions(str(tmp_path / "nowhere"), "train"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "task9.json").write_text(json.dumps({"Definition": ["d"]}))
    with pytest.raises(ValueError, match="task9.json.*Instances"):
        list(tasks.iter_natural_instructions(str(bad), "train"))
    with pytest.raises(ValueError, match="natural_instructions_dir"):
        tasks.get_task("natural_instructions", vocabulary=object())
