"""Tests of thack_jax.data.regime_names: the regime and role names, each defined once."""

import json

import pytest

from thack_jax.data import regime_names as rn


def test_regime_values_are_the_file_format():
    # These strings are in gin files, run.json and reports: they must never change.
    assert rn.REGIMES == ("offline", "online_teacher", "online_student", "mixed")
    assert [r.value for r in rn.Regime] == list(rn.REGIMES)
    assert rn.Regime.MIXED == "mixed" and str(rn.Regime.MIXED) == "mixed"
    assert f"{rn.Regime.ONLINE_STUDENT}" == "online_student"
    assert json.dumps(rn.Regime.OFFLINE) == '"offline"'
    assert rn.ROLES == ("oracle", "teacher", "student")
    assert rn.SAMPLER_ROLES == ("teacher", "student")


def test_parse():
    assert rn.Regime.parse("online_teacher") is rn.Regime.ONLINE_TEACHER
    assert rn.Regime.parse(rn.Regime.MIXED) is rn.Regime.MIXED
    for bad in ("Offline", "online", "", None, 3):
        with pytest.raises(ValueError) as info:
            rn.Regime.parse(bad, "RunConfig.regime")
        assert f"RunConfig.regime={bad!r}" in str(info.value)
        assert "offline, online_teacher, online_student, mixed" in str(info.value)


def test_role_checks():
    assert rn.check_role("oracle") == "oracle"
    assert rn.check_sampler_role("teacher") == "teacher"
    with pytest.raises(ValueError, match="online_role='oracle' must be one of teacher, student"):
        rn.check_sampler_role("oracle")
    with pytest.raises(ValueError, match="role='judge' must be one of oracle, teacher, student"):
        rn.check_role("judge")
    with pytest.raises(ValueError, match="role=None"):
        rn.check_role(None)


def test_report_display_order_covers_every_regime():
    from thack_jax.reporting import report

    assert sorted(report.REGIMES) == sorted(rn.REGIMES)
    assert report.REGIMES[0] == "offline" and all(type(r) is str for r in report.REGIMES)


def test_sources_refuse_with_the_shared_names():
    from thack_jax.data import generation, regimes

    with pytest.raises(ValueError, match="regime='nope' is not a regime; valid regimes: offline"):
        regimes.make_source("nope", regimes.SourceConfig(batch_size=2, seed=0))
    with pytest.raises(ValueError, match="online_role='x' must be one of teacher, student"):
        store = object()  # refused before the store is read
        source = regimes.SourceConfig(batch_size=2, seed=0, online_role="x")
        regimes.make_source("mixed", source, offline_store=store)
    with pytest.raises(ValueError, match="role='oracle' must be one of teacher, student"):
        generation.OnlineSource("oracle", None, None, None, 4, 0)


def test_stdlib_only():
    # config.py imports this module while building configs: it must stay light.
    import ast
    import sys

    tree = ast.parse(open(rn.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
