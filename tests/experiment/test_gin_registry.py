"""Every gin file parses into an ExperimentConfig; bad gin input names the file, a bad
value names the dataclass field (and its gin scope) in one line."""

import glob
import logging
import os

import gin
import pytest

from thack_jax.data.regime_names import REGIMES
from thack_jax.experiment import gin_registry

GIN_DIR = gin_registry.GIN_DIR
EXPERIMENTS = sorted(glob.glob(os.path.join(GIN_DIR, "experiments", "*.gin")))
FRAGMENTS = sorted(glob.glob(os.path.join(GIN_DIR, "tasks", "*.gin"))) + sorted(
    glob.glob(os.path.join(GIN_DIR, "regimes", "*.gin"))
)


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_there_are_gin_files():
    assert any(p.endswith("default.gin") for p in EXPERIMENTS)
    assert len(FRAGMENTS) >= 8


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_files_parse(path):
    gin_registry.parse([os.path.relpath(path, GIN_DIR)])
    cfg = gin_registry.experiment_config()
    assert cfg.runs, path
    for run in cfg.runs:
        # The checks of config.py passed; the regime is stored as the plain string.
        assert type(run.regime) is str and run.regime in REGIMES
    for role in ("oracle", "teacher", "student"):
        cfg.model_config(role)  # Valid T5 configs.


@pytest.mark.parametrize("path", FRAGMENTS, ids=os.path.basename)
def test_fragments_parse(path):
    # Fragments reference macros set by experiment files; give them values.
    gin_registry.parse(
        [os.path.relpath(path, GIN_DIR)], ["OFFLINE_PROMPTS = 16"] if "regimes" in path else []
    )


def test_missing_file_is_named():
    with pytest.raises(gin_registry.GinConfigError, match="nope.gin"):
        gin_registry.parse(["nope.gin"])


def test_parse_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("ExperimentConfig.seed = 1\nExperimentConfig.name = (\n")
    with pytest.raises(gin_registry.GinConfigError, match=r"bad.gin.*line 3"):
        gin_registry.parse([str(bad)])
    unknown = tmp_path / "unknown.gin"
    unknown.write_text("ExperimentConfig.seed = 1\nExperimentConfig.no_such_field = 3\n")
    with pytest.raises(gin_registry.GinConfigError, match="no_such_field"):
        gin_registry.parse([str(unknown)])


def test_search_path_probes_are_not_logged_as_errors(caplog):
    # gin logs "Path not found" for each search path that lacks an included file.
    with caplog.at_level(logging.INFO):
        gin.clear_config()
        gin_registry.parse(["experiments/default.gin"])
    assert not [r for r in caplog.records if "Path not found" in r.getMessage()]
    assert not logging.getLogger().filters  # the filter is removed after parsing


@pytest.mark.parametrize(
    "binding, expected",
    [
        (
            "mixed/RunConfig.online_fraction = 1.5",
            "RunConfig.online_fraction=1.5 must be a number in [0, 1] (gin scope 'mixed')",
        ),
        (
            "offline/RunConfig.regime = 'online'",
            "RunConfig.regime='online' is not a regime; valid regimes: offline, online_teacher, "
            "online_student, mixed (gin scope 'offline')",
        ),
        ("ExperimentConfig.guard_mode = 'halt'", "ExperimentConfig.guard_mode='halt' must be one"),
        ("EvalConfig.num_samples = 0", "EvalConfig.num_samples=0 must be an integer >= 1"),
    ],
)
def test_bad_value_is_one_line_naming_the_field(binding, expected):
    gin_registry.parse(["experiments/paper_xsum_small.gin"], [binding])
    with pytest.raises(gin_registry.ConfigError) as info:
        gin_registry.experiment_config()
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)
