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


def gin_file_roots(search_paths=()) -> list[str]:
    """Where a relative gin file name is looked for, in order: the search paths, the
    package's gin_configs/ (and the folder above it, so that `gin_configs/...` works from
    any folder), then the current folder. The one convention of every entry point."""
    roots = [*search_paths, GIN_DIR, os.path.dirname(GIN_DIR), os.getcwd()]
    return list(dict.fromkeys(os.path.abspath(r) for r in roots))  # each folder once


def resolve_gin_file(name: str, search_paths=()) -> str:
    """The absolute path of gin file `name` (an absolute `name` is used as is).

    Raises:
      GinConfigError: it is in none of gin_file_roots; the message lists them.
    """
    roots = [""] if os.path.isabs(name) else gin_file_roots(search_paths)
    for root in roots:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return os.path.abspath(path)
    where = f" (looked in {', '.join(roots)})" if roots != [""] else ""
    raise GinConfigError(f"gin file {name!r} not found{where}")


def parse(gin_files, gin_bindings=(), search_paths=()) -> list[str]:
    """Parses gin files (resolve_gin_file's convention) and then the bindings. Includes
    inside the files are searched in `search_paths`, then the package's gin_configs/.
    Returns the resolved paths."""
    for path in (*search_paths, GIN_DIR):
        gin.add_config_file_search_path(path)
    resolved = [resolve_gin_file(name, search_paths) for name in gin_files]
    with _quiet_path_probes():
        _parse(resolved, gin_bindings)
    return resolved


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
            raise GinConfigError(f"gin file {name!r}: {_gin_message(e)}") from e
    for binding in gin_bindings:  # one at a time, so that the error names the binding
        try:
            gin.parse_config(binding)
        except Exception as e:
            raise GinConfigError(f"gin binding {binding!r}: {_gin_message(e)}") from e


_GIN_LOCATION = re.compile(
    r'In (?:file "(?P<file>[^"]+)", line|bindings string line) (?P<line>\d+)'
)


def _gin_message(error: Exception) -> str:
    """gin's message on one line: its first line and, when gin appended the location
    ("In file X, line N" and the offending text), where and what (an included file's
    name, when the error is in an include)."""
    lines = str(error).splitlines() or [type(error).__name__]
    text = f"{type(error).__name__}: {lines[0]}"
    for i, line in enumerate(lines):
        found = _GIN_LOCATION.search(line)
        if found:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            where = f"{found['file']}, " if found["file"] else ""
            return f"{text} ({where}line {found['line']}: {code})"
    return text


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
