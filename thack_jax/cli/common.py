"""What the entry points share: the gin flags (one convention, one help text), the
one-line error convention with `--verbose` for the traceback, and quiet library logs.

Every entry point runs its `main` through `run(main, tool)`: an expected error (a bad
flag value, a configuration the dataclasses refuse, a missing or damaged file, a workdir
made under another configuration) prints one line `<tool>: error: <message>` and exits
with status 1; `--verbose` re-raises it with its traceback instead. absl's (and orbax's)
INFO lines are hidden unless `--verbosity` is given.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS

GIN_FILE_HELP = (
    "Gin file. Looked up in --gin_search_paths, then in the package's "
    "gin_configs/ (experiments/default.gin, or gin_configs/experiments/default.gin), then "
    "relative to the current folder; an absolute path is used as is."
)
GIN_BINDINGS_HELP = (
    "Gin binding, applied after the files, e.g. "
    "'distill/TrainConfig.num_steps = 3000' or 'ExperimentConfig.seed = 1'."
)
GIN_SEARCH_HELP = "Folder searched first for gin files and their includes."

# The errors a user can cause and fix: the message names the file, key or value. Anything
# else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, TypeError, KeyError, OSError, json.JSONDecodeError)

flags.DEFINE_bool("verbose", False, "Show the traceback of an error instead of one line.")


def define_gin_flags() -> None:
    """--gin_file, --gin_bindings, --gin_search_paths (once per process)."""
    if "gin_file" in FLAGS:
        return
    flags.DEFINE_multi_string("gin_file", [], GIN_FILE_HELP)
    flags.DEFINE_multi_string("gin_bindings", [], GIN_BINDINGS_HELP)
    flags.DEFINE_multi_string("gin_search_paths", [], GIN_SEARCH_HELP)


def experiment_config(tool: str):
    """The ExperimentConfig of --gin_file / --gin_bindings / --gin_search_paths. It needs
    neither jax nor the devices, so a typo fails in a second, on every host alike.

    Raises:
      SystemExit: one line `<tool>: error: ...` naming the file, line, field or value.
    """
    from thack_jax.experiment import gin_registry

    if not FLAGS.gin_file:
        raise app.UsageError("--gin_file is required, e.g. --gin_file=experiments/default.gin")
    try:
        gin_registry.parse(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
        return gin_registry.experiment_config()
    except (gin_registry.GinConfigError, gin_registry.ConfigError) as e:
        _fail(tool, e)


def parse_own_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
    """Parses `argv` (argv[0] the program) into a tool's own FlagValues, every flag not in
    argv back at its default: the benchmarks each define theirs on their own FlagValues, so
    several can be imported, and each parsed again, in one process.

    Raises:
      flags.Error: an unknown flag, a bad value, or a positional argument.
    """
    flag_values.unparse_flags()
    rest = flag_values(list(argv))
    if len(rest) > 1:
        raise flags.Error(f"unexpected arguments {rest[1:]}")


def quiet_library_logs() -> None:
    """orbax and absl log every checkpoint read and write at INFO (dozens of lines per
    evaluation), drowning the progress lines; --verbosity=0 brings them back."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _fail(tool: str, error: BaseException):
    if FLAGS.verbose:
        raise error
    message = str(error) or type(error).__name__
    if isinstance(error, KeyError):  # str(KeyError) is the key's repr alone.
        message = f"missing key {message}"
    print(f"{tool}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(main, tool: str, expected: tuple[type[BaseException], ...] = EXPECTED_ERRORS) -> None:
    """absl's app.run of `main`, with the one-line convention for `expected` errors."""

    def wrapped(argv):
        quiet_library_logs()
        try:
            return main(argv)
        except expected as e:
            _fail(tool, e)

    app.run(wrapped)
