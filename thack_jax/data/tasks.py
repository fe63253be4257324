"""seqio Tasks of the study (synthetic, XSum, WMT-14 en-de, Natural Instructions).

Every task produces the features `inputs` and `targets` (int32, EOS-terminated). TensorFlow,
seqio and TFDS are imported inside functions only, so importing this module is cheap and
works where TF is absent; `load_prompts('synthetic', ...)` never needs TF.

Tasks are registered in `seqio.TaskRegistry` on demand under a name that encodes their
configuration (vocabulary fingerprint, data directory, synthetic seed and length), so
`get_task` / `register_tasks` are idempotent and two configurations never collide.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np

from thack_jax.core import checks
from thack_jax.data import synthetic
from thack_jax.data.vocab import SyntheticVocabulary, sentencepiece_vocabulary

TASK_NAMES = ("synthetic", "xsum", "wmt14_ende", "natural_instructions")

# TFDS name, input feature, target feature, input prefix, preparation hint.
_TFDS_TASKS = {
    "xsum": (
        "xsum:1.1.0",
        "document",
        "summary",
        "summarize: ",
        "XSum needs a manual download: follow https://github.com/EdinburghNLP/XSum "
        "(XSum-Dataset/README.md) to build xsum-extracts-from-downloads.tar.gz, put it in "
        "<data_dir>/downloads/manual/, then run `tfds build xsum --data_dir={data_dir}`",
    ),
    "wmt14_ende": (
        "wmt14_translate/de-en:1.0.0",
        "en",
        "de",
        "translate English to German: ",
        "run `tfds build wmt14_translate/de-en --data_dir={data_dir}` on a machine with "
        "network access and copy the directory here",
    ),
}
NI_VALIDATION_FRACTION = 0.1


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is missing from its data directory."""


def _check_task_name(task_name: str) -> None:
    if task_name not in TASK_NAMES:
        raise ValueError(f"unknown task {task_name!r}; valid task names: {', '.join(TASK_NAMES)}")


def _short_hash(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10]


def _as_seqio_vocabulary(vocabulary, task_name: str):
    """Accepts a seqio.Vocabulary, a SyntheticVocabulary or a SentencePiece model path."""
    if vocabulary is None:
        if task_name == "synthetic":
            return SyntheticVocabulary().as_seqio()
        raise ValueError(
            f"task {task_name!r} needs a vocabulary: pass vocabulary= a SentencePiece model "
            "path or a seqio.Vocabulary"
        )
    if isinstance(vocabulary, SyntheticVocabulary):
        return vocabulary.as_seqio()
    if isinstance(vocabulary, str | os.PathLike):
        return sentencepiece_vocabulary(vocabulary)
    return vocabulary


def _vocab_key(vocab) -> str:
    inner = getattr(vocab, "vocab", None)
    if isinstance(inner, SyntheticVocabulary):
        return inner.fingerprint()
    model_file = getattr(vocab, "sentencepiece_model_file", None)
    return repr((type(vocab).__name__, model_file, vocab.vocab_size, vocab.extra_ids))


def _output_features(vocab):
    import seqio

    return {
        "inputs": seqio.Feature(vocabulary=vocab, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocab, add_eos=True),
    }


def _text_preprocessors(input_key: str, target_key: str, prefix: str):
    import seqio
    import tensorflow as tf

    def to_inputs_targets(ds):
        def fn(ex):
            return {
                "inputs": tf.strings.join([prefix, ex[input_key]]),
                "targets": ex[target_key],
            }

        return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)

    return [
        to_inputs_targets,
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos_after_trim,
    ]


def iter_natural_instructions(directory: str, split: str) -> Iterator[dict]:
    """Examples {'inputs', 'targets'} (text) of Natural Instructions task files in `directory`.

    Each `*.json` file (or `tasks/*.json`) has "Definition" (list of str) and "Instances"
    (list of {"id"?, "input", "output": [str, ...]}). inputs = definition + "\\n\\nInput: " +
    input; targets = the first output. The split is a stable hash of (file name, instance id).
    """
    if split not in ("train", "validation"):
        raise ValueError(f"natural_instructions split must be train or validation, got {split!r}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"natural_instructions directory not found: {directory!r}")
    files = sorted(glob.glob(os.path.join(directory, "*.json")))
    files = files or sorted(glob.glob(os.path.join(directory, "tasks", "*.json")))
    if not files:
        raise FileNotFoundError(f"no Natural Instructions task *.json files in {directory!r}")
    for path in files:
        with open(path, encoding="utf-8") as f:
            task = json.load(f)
        for key in ("Definition", "Instances"):
            if key not in task:
                raise ValueError(f"{path}: missing key {key!r} of a Natural Instructions task")
        definition = task["Definition"]
        definition = "\n".join(definition) if isinstance(definition, list) else str(definition)
        stem = os.path.basename(path)
        for i, inst in enumerate(task["Instances"]):
            if "input" not in inst or "output" not in inst:
                raise ValueError(f"{path}: instance {i} lacks 'input' or 'output'")
            outputs = inst["output"]
            outputs = [outputs] if isinstance(outputs, str) else outputs
            if not outputs:
                continue
            key = f"{stem}/{inst.get('id', i)}".encode()
            bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % 10_000
            inst_split = "validation" if bucket < NI_VALIDATION_FRACTION * 10_000 else "train"
            if inst_split == split:
                yield {
                    "inputs": f"{definition}\n\nInput: {inst['input']}",
                    "targets": str(outputs[0]),
                }


def _text_source(generator_fn):
    """A seqio.FunctionDataSource over a python generator of {'inputs','targets'} text."""
    import seqio
    import tensorflow as tf

    def dataset_fn(split, shuffle_files):
        del shuffle_files  # deterministic order; Task.get_dataset shuffles if asked
        spec = {k: tf.TensorSpec((), tf.string) for k in ("inputs", "targets")}
        return tf.data.Dataset.from_generator(lambda: generator_fn(split), output_signature=spec)

    return seqio.FunctionDataSource(dataset_fn, splits=("train", "validation"))


def get_task(
    task_name: str,
    *,
    vocabulary=None,
    tfds_data_dir: str | None = None,
    natural_instructions_dir: str | None = None,
    synthetic_seed: int = 0,
    synthetic_max_length: int = 16,
):
    """The registered seqio.Task for `task_name` (registering it on first use)."""
    _check_task_name(task_name)
    if task_name == "synthetic":
        config = (synthetic_seed, synthetic_max_length)
    elif task_name == "natural_instructions":
        if natural_instructions_dir is None:
            raise ValueError("task 'natural_instructions' needs natural_instructions_dir")
        config = (os.path.abspath(natural_instructions_dir),)
    else:
        config = (tfds_data_dir,)
    vocab = _as_seqio_vocabulary(vocabulary, task_name)
    import seqio

    name = f"thack_{task_name}_{_short_hash(_vocab_key(vocab), *config)}"
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)

    tokenize = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    if task_name == "synthetic":
        inner = getattr(vocab, "vocab", None)
        words = inner.words if isinstance(inner, SyntheticVocabulary) else None
        if words != synthetic.SyntheticGrammar().words:
            raise ValueError("the synthetic task needs a SyntheticVocabulary")
        decoder = inner

        def synthetic_text(split):
            for ids in synthetic.iter_prompts(
                split=split, seed=synthetic_seed, max_length=synthetic_max_length
            ):
                yield {"inputs": decoder.decode(ids), "targets": ""}

        source, preprocessors = _text_source(synthetic_text), tokenize
    elif task_name == "natural_instructions":
        ni_dir = natural_instructions_dir
        source = _text_source(lambda split: iter_natural_instructions(ni_dir, split))
        preprocessors = tokenize
    else:
        tfds_name, in_key, out_key, prefix, _ = _TFDS_TASKS[task_name]
        # read_only: never try to download (the machines running this have no network).
        source = seqio.TfdsDataSource(
            tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, read_only=True
        )
        preprocessors = _text_preprocessors(in_key, out_key, prefix)
    return seqio.TaskRegistry.add(
        name, source=source, output_features=_output_features(vocab), preprocessors=preprocessors
    )


def register_tasks(
    *,
    vocabulary=None,
    tfds_data_dir: str | None = None,
    natural_instructions_dir: str | None = None,
    synthetic_seed: int = 0,
    synthetic_max_length: int = 16,
) -> dict[str, str]:
    """Registers every task the arguments allow; returns task name -> seqio registry name.

    The synthetic task is always registered (with its own vocabulary); the text tasks need
    a text `vocabulary`, Natural Instructions also `natural_instructions_dir`. Idempotent.
    """
    names = {}
    for task_name in TASK_NAMES:
        if task_name != "synthetic" and (
            vocabulary is None or isinstance(vocabulary, SyntheticVocabulary)
        ):
            continue
        if task_name == "natural_instructions" and natural_instructions_dir is None:
            continue
        task = get_task(
            task_name,
            vocabulary=None if task_name == "synthetic" else vocabulary,
            tfds_data_dir=tfds_data_dir,
            natural_instructions_dir=natural_instructions_dir,
            synthetic_seed=synthetic_seed,
            synthetic_max_length=synthetic_max_length,
        )
        names[task_name] = task.name
    return names


def _check_tfds_prepared(task_name: str, split: str, data_dir: str | None) -> None:
    """Raises DatasetNotPreparedError, saying how to prepare it, if the data is missing."""
    import tensorflow_datasets as tfds

    tfds_name, *_, hint = _TFDS_TASKS[task_name]
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    try:
        builder.as_dataset(split=split)
    except AssertionError as e:  # tfds: "Dataset ...: could not find data in ..."
        where = data_dir or f"{tfds.core.constants.DATA_DIR} (the TFDS default)"
        raise DatasetNotPreparedError(
            f"TFDS dataset {tfds_name!r} (task {task_name!r}) is not prepared in data_dir "
            f"{where!r}: {hint.format(data_dir=data_dir or '<data_dir>')}"
        ) from e


def _to_padded(rows: list[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskData:
    """Where a task's data and vocabulary come from (`load_examples` / `load_prompts`).

    vocabulary: a seqio vocabulary (None: the task's default; the synthetic task needs a
      SyntheticVocabulary or None). tfds_data_dir: the TFDS data directory (None: the TFDS
      default). natural_instructions_dir: the Natural Instructions task files.
    """

    vocabulary: object = None
    tfds_data_dir: str | None = None
    natural_instructions_dir: str | None = None

    def __post_init__(self):
        for name in ("tfds_data_dir", "natural_instructions_dir"):
            checks.optional(checks.instance, self, name, (str, os.PathLike))


def load_examples(
    task_name: str,
    *,
    split: str,
    num_examples: int,
    max_input_length: int,
    max_target_length: int,
    seed: int | None = 0,
    data: TaskData = TaskData(),
    via_seqio: bool = False,
) -> dict[str, np.ndarray]:
    """The first `num_examples` examples of a task as padded numpy arrays.

    Args:
      task_name: one of TASK_NAMES.
      split: 'train' or 'validation' (TFDS tasks also 'test').
      seed: synthetic task: the prompt-stream seed; other tasks: None keeps the source
        order, an int shuffles through seqio with that seed. Either way the first k rows of
        a larger request equal a request for k rows.
      data: the vocabulary and data directories (`TaskData`).
      via_seqio: synthetic task only; False (default) generates without TensorFlow, with
        `synthetic.synthetic_references(inputs, seed=seed)` as targets; True reads the
        seqio task, whose targets are empty (EOS only): it has the prompts, no references.

    Returns:
      {'inputs': int32 [N, max_input_length], 'targets': int32 [N, max_target_length]},
      each row EOS-terminated (truncated rows end with EOS), then padded with 0.
    """
    if not isinstance(data, TaskData):
        raise ValueError(f"data must be a TaskData, got {type(data).__name__}")
    vocabulary, tfds_data_dir = data.vocabulary, data.tfds_data_dir
    natural_instructions_dir = data.natural_instructions_dir
    _check_task_name(task_name)
    if task_name == "synthetic" and not via_seqio:
        inner = getattr(vocabulary, "vocab", vocabulary)  # unwrap the seqio wrapper
        if vocabulary is not None and (
            not isinstance(inner, SyntheticVocabulary)
            or inner.words != synthetic.SyntheticGrammar().words
        ):
            raise ValueError("the synthetic task needs a SyntheticVocabulary")
        inputs = synthetic.synthetic_prompts(
            num_examples, split=split, seed=seed or 0, max_length=max_input_length
        )
        # The task's procedural "human" references (synthetic.py), drawn with the same seed.
        targets = synthetic.synthetic_references(
            inputs, seed=seed or 0, max_length=max_target_length
        )
        return {"inputs": inputs, "targets": targets}

    if task_name in _TFDS_TASKS:
        _check_tfds_prepared(task_name, split, tfds_data_dir)
    task = get_task(
        task_name,
        vocabulary=vocabulary,
        tfds_data_dir=tfds_data_dir,
        natural_instructions_dir=natural_instructions_dir,
        synthetic_seed=seed or 0,
        synthetic_max_length=max_input_length,
    )
    shuffle = task_name != "synthetic" and seed is not None
    ds = task.get_dataset(
        sequence_length={"inputs": max_input_length, "targets": max_target_length},
        split=split,
        shuffle=shuffle,
        seed=seed if shuffle else None,
        num_epochs=1,
        try_in_mem_cache=False,
    )
    inputs, targets = [], []
    for ex in ds.take(num_examples).as_numpy_iterator():
        inputs.append(ex["inputs"])
        targets.append(ex["targets"])
    if len(inputs) < num_examples:
        raise ValueError(
            f"task {task_name!r} split {split!r} has only {len(inputs)} examples, "
            f"{num_examples} requested"
        )
    return {
        "inputs": _to_padded(inputs, max_input_length),
        "targets": _to_padded(targets, max_target_length),
    }


def load_prompts(
    task_name: str,
    *,
    split: str,
    num_prompts: int,
    max_input_length: int,
    seed: int | None = 0,
    data: TaskData = TaskData(),
    via_seqio: bool = False,
) -> np.ndarray:
    """Prompts [num_prompts, max_input_length] int32 of a task (see `load_examples`)."""
    return load_examples(
        task_name,
        split=split,
        num_examples=num_prompts,
        max_input_length=max_input_length,
        max_target_length=1,
        seed=seed,
        data=data,
        via_seqio=via_seqio,
    )["inputs"]
