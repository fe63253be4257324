"""Shared helpers for checkpoint import/export: flat names, dtypes, and one mismatch report.

Parameters are compared in our (t5x) namespace, `"encoder/layers_0/mlp/wi_0/kernel"`, with
our layout (kernels [in, out]). Each format module supplies `to_source(path) -> (name,
transposed)` so that every message names the tensor and shape as they appear in the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

from thack_jax.models.api import param_shapes
from thack_jax.models.config import DTYPES, T5Config

Shape = tuple[int, ...]
ToSource = Callable[[str], tuple[str, bool]]

_LAYER = re.compile(r"^(encoder|decoder)/layers_(\d+)/")
_ATTENTION = ("query", "key", "value")


class CheckpointMismatchError(ValueError):
    """A checkpoint disagrees with the config; `problems` lists every mismatch found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n  - ".join(self.problems)
        super().__init__(
            f"checkpoint {source} does not match the config ({len(self.problems)} problem(s)):"
            f"\n  - {lines}"
        )


def flatten(tree: dict, prefix: str = "", is_leaf: Callable[[dict], bool] | None = None) -> dict:
    """Nested dict -> {"a/b/c": leaf}. Empty dicts are dropped; `is_leaf(d)` keeps dict d whole."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not (is_leaf and is_leaf(value)):
            flat.update(flatten(value, name + "/", is_leaf))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict) -> dict:
    """{"a/b/c": leaf} -> nested dict."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def numpy_dtype(name: str) -> np.dtype:
    """'float32' | 'bfloat16' | 'float16' -> numpy dtype (bfloat16 from ml_dtypes)."""
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; expected one of {DTYPES}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def expected_shapes(config: T5Config) -> dict[str, Shape]:
    """Our flat parameter names -> shapes, for `config` (nothing is allocated)."""
    return {k: tuple(v.shape) for k, v in flatten(param_shapes(config)).items()}


def axis_fields(path: str) -> tuple[str, ...]:
    """The config field(s) that set each axis of the parameter `path` (our layout)."""
    leaf = path.split("/")[-2:]
    if path == "token_embedder/embedding":
        return ("vocab_size", "d_model")
    if path.endswith("logits_dense/kernel"):
        return ("d_model", "vocab_size")
    if leaf[-1] == "rel_embedding":
        return ("num_heads", "relative_attention_num_buckets")
    if leaf[-1] == "scale":
        return ("d_model",)
    if leaf[0] in _ATTENTION:
        return ("d_model", "num_heads*d_kv")
    if leaf[0] == "out":
        return ("num_heads*d_kv", "d_model")
    if leaf[0] == "wo":
        return ("d_ff", "d_model")
    if leaf[0] in ("wi", "wi_0", "wi_1"):
        return ("d_model", "d_ff")
    return ()


def _field_value(config: T5Config, field: str) -> int:
    if field == "num_heads*d_kv":
        return config.inner_dim
    return getattr(config, field)


def _source_shape(shape: Shape, transposed: bool) -> Shape:
    return tuple(reversed(shape)) if transposed else tuple(shape)


def _num_layers(paths: Iterable[str], stack: str) -> int:
    indices = [int(m.group(2)) for p in paths if (m := _LAYER.match(p)) and m.group(1) == stack]
    return max(indices) + 1 if indices else 0


def config_hints(
    config: T5Config,
    found: dict[str, Shape],
    to_source: ToSource,
    config_name: str = "config",
    field_names: dict[str, str] | None = None,
) -> list[str]:
    """Sentences naming each config field that disagrees with the weights.

    Each is like "config.json d_ff=64 but encoder.block.0.layer.1.DenseReluDense.wi_0.weight
    has shape (128, 32)": the first tensor (in sorted order) that contradicts the field.
    """
    names = field_names or {}

    def field(f: str) -> str:
        return f"{config_name} {names.get(f, f)}"

    hints: list[str] = []
    blamed: set[str] = set()
    expected = expected_shapes(config)
    for path in sorted(set(found) & set(expected)):
        got, want = found[path], expected[path]
        if got == want:
            continue
        name, transposed = to_source(path)
        fields = axis_fields(path)
        if len(got) != len(want) or not fields:
            continue
        for axis, f in enumerate(fields):
            if got[axis] != want[axis] and f not in blamed:
                blamed.add(f)
                shape = _source_shape(got, transposed)
                hints.append(f"{field(f)}={_field_value(config, f)} but {name} has shape {shape}")
    for stack, f in (("encoder", "num_encoder_layers"), ("decoder", "num_decoder_layers")):
        n = _num_layers(found, stack)
        if n and n != getattr(config, f):
            hints.append(
                f"{field(f)}={getattr(config, f)} but the checkpoint has {n} {stack} layers"
            )
    mlp_kinds = {p.split("/")[-2] for p in found if "/mlp/wi" in p}
    if config.feed_forward == "gated-gelu" and "wi" in mlp_kinds:
        hints.append(f"{field('feed_forward')}='gated-gelu' but the checkpoint has a single mlp wi")
    if config.feed_forward == "relu" and mlp_kinds & {"wi_0", "wi_1"}:
        hints.append(f"{field('feed_forward')}='relu' but the checkpoint has gated mlp wi_0/wi_1")
    has_head = "decoder/logits_dense/kernel" in found
    if config.tie_word_embeddings and has_head:
        name = to_source("decoder/logits_dense/kernel")[0]
        hints.append(f"{field('tie_word_embeddings')}=True but the checkpoint has {name}")
    if not config.tie_word_embeddings and not has_head:
        name = to_source("decoder/logits_dense/kernel")[0]
        hints.append(f"{field('tie_word_embeddings')}=False but the checkpoint has no {name}")
    return hints


def validate(
    config: T5Config,
    found: dict[str, Shape],
    source: str,
    to_source: ToSource,
    *,
    config_name: str = "config",
    field_names: dict[str, str] | None = None,
    unknown: Iterable[tuple[str, Shape]] = (),
    extra_problems: Iterable[str] = (),
) -> None:
    """Raises one CheckpointMismatchError listing every problem, or returns if there is none.

    Args:
      found: our flat names -> shapes (our layout) of the tensors the checkpoint holds.
      source: the checkpoint path, for the message.
      to_source: our name -> (name in the file, whether the file stores it transposed).
      unknown: (name in the file, shape) of tensors that map to no parameter at all.
      extra_problems: problems the caller found itself (e.g. unsupported dtypes).
    """
    expected = expected_shapes(config)
    problems = list(config_hints(config, found, to_source, config_name, field_names))
    for path in sorted(set(expected) - set(found)):
        name, transposed = to_source(path)
        shape = _source_shape(expected[path], transposed)
        problems.append(f"missing {name} (expected shape {shape})")
    unexpected = list(unknown)
    for path in set(found) - set(expected):
        name, transposed = to_source(path)
        unexpected.append((name, _source_shape(found[path], transposed)))
    for name, shape in sorted(unexpected):
        problems.append(f"unexpected {name} (shape {shape})")
    for path in sorted(set(found) & set(expected)):
        if found[path] != expected[path]:
            name, transposed = to_source(path)
            want = _source_shape(expected[path], transposed)
            got = _source_shape(found[path], transposed)
            problems.append(f"wrong shape {name}: expected {want}, found {got}")
    problems.extend(extra_problems)
    if problems:
        raise CheckpointMismatchError(source, problems)
