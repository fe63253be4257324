"""The one place that registers library callables with gin (entry points import this).

Library code never imports gin; gin files bind the dataclasses of experiment/config.py,
which check their fields when `experiment_config()` builds them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tokenize

import gin

from thack_jax.experiment import config as ec

ExperimentConfig = gin.external_configurable(ec.ExperimentConfig, module="thack_jax")
ModelSpec = gin.external_configurable(ec.ModelSpec, module="thack_jax")
TrainConfig = gin.external_configurable(ec.TrainConfig, module="thack_jax")
RunConfig = gin.external_configurable(ec.RunConfig, module="thack_jax")
EvalConfig = gin.external_configurable(ec.EvalConfig, module="thack_jax")

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIN_DIR = os.path.join(_REPO, "gin_configs")


class GinConfigError(ValueError):
    """A gin file is missing or does not parse; the message names the file and line."""


class ConfigError(ValueError):
    """The parsed gin files bind an invalid configuration. One line: the dataclass check's
    message (dataclass, field, value, what is allowed) and the gin scope it was bound in."""


def parse(gin_files, gin_bindings=(), search_paths=()) -> None:
    """Parses gin files (searched in `search_paths`, then the package's gin_configs/)."""
    for path in (*search_paths, GIN_DIR):
        gin.add_config_file_search_path(path)
    for name in gin_files:
        if not any(os.path.exists(os.path.join(p, name)) for p in ("", *search_paths, GIN_DIR)):
            raise GinConfigError(
                f"gin file {name!r} not found (looked in ., {', '.join([*search_paths, GIN_DIR])})"
            )
    with _quiet_path_probes():
        _parse(gin_files, gin_bindings)


class _DropPathProbes(logging.Filter):
    """gin tries each search path in turn and logs every miss at ERROR ("Path not found"),
    even when a later path has the file: noise that reads like a failure. A file missing
    from every path is still an error (GinConfigError above, or gin's own for includes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.getMessage().startswith("Path not found")
            and record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
        )


@contextlib.contextmanager
def _quiet_path_probes():
    root, drop = logging.getLogger(), _DropPathProbes()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _parse(gin_files, gin_bindings) -> None:
    for name in gin_files:
        try:
            gin.parse_config_file(name)
        except tokenize.TokenError as e:  # Unbalanced brackets: tokenizer gives (line, col).
            line = e.args[1][0] if len(e.args) > 1 else "?"
            raise GinConfigError(f"gin file {name!r}, line {line}: {e.args[0]}") from e
        except Exception as e:  # gin raises many types (SyntaxError, ValueError, ...).
            raise GinConfigError(f"gin file {name!r}: {type(e).__name__}: {e}") from e
    try:
        gin.parse_config(list(gin_bindings))
    except Exception as e:
        raise GinConfigError(f"gin bindings {list(gin_bindings)}: {type(e).__name__}: {e}") from e


_GIN_SCOPE = re.compile(r"in scope '([^']+)'")


def experiment_config() -> ec.ExperimentConfig:
    """The ExperimentConfig bound by the parsed gin files.

    Raises:
      ConfigError: a dataclass refused a value (the `__post_init__` checks of config.py).
    """
    try:
        return ExperimentConfig()
    except (ValueError, TypeError) as e:
        raise ConfigError(_one_line(e)) from e


def _one_line(error: Exception) -> str:
    """gin appends "In call to configurable 'X' (<class ...>) in scope 's'" lines to the
    dataclass's message; keep its first line and the innermost scope (which RunConfig)."""
    text = str(error) or type(error).__name__
    first = text.splitlines()[0]
    scopes = _GIN_SCOPE.findall(text)
    return f"{first} (gin scope {scopes[0]!r})" if scopes else first
