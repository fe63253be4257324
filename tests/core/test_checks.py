"""core/checks.py: one message format, bools are not integers, NaN/inf are not numbers."""

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest

from thack_jax.core import checks


@dataclasses.dataclass
class Cfg:
    n: object = 1
    x: object = 0.5
    name: object = "adamw"
    path: object = None


def test_integer_accepts_python_and_numpy_ints_and_refuses_bools():
    checks.integer(Cfg(n=3), "n", 1)
    checks.integer(Cfg(n=np.int32(3)), "n", 1)
    checks.integer(Cfg(n=-5), "n")  # no minimum
    with pytest.raises(checks.FieldTypeError, match=r"^Cfg.n=True must be an integer >= 0$"):
        checks.integer(Cfg(n=True), "n", 0)
    with pytest.raises(TypeError, match=r"^Cfg.n=2.0 must be an integer$"):
        checks.integer(Cfg(n=2.0), "n")


def test_integer_below_minimum_is_a_value_error_not_a_type_error():
    with pytest.raises(ValueError, match=r"^Cfg.n=0 must be an integer >= 1$") as info:
        checks.integer(Cfg(n=0), "n", 1)
    assert not isinstance(info.value, TypeError)


def test_value_override_names_an_element():
    with pytest.raises(ValueError, match=r"^Cfg.steps\[2\]=-1 must be an integer >= 0$"):
        checks.integer(Cfg(), "steps[2]", 0, value=-1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, True, "1"])
def test_number_checks_refuse_nan_inf_bools_and_strings(bad):
    with pytest.raises(ValueError, match=r"^Cfg.x=.* must be a number > 0$"):
        checks.positive(Cfg(x=bad), "x")
    with pytest.raises(ValueError, match=r"^Cfg.x=.* must be a number in \[0, 1\]$"):
        checks.number(Cfg(x=bad), "x", 0, 1)


def test_number_bounds_are_inclusive():
    for ok in (0, 0.0, 1, np.float32(0.25)):
        checks.number(Cfg(x=ok), "x", 0, 1)
    with pytest.raises(ValueError, match=r"^Cfg.x=1.5 must be a number in \[0, 1\]$"):
        checks.number(Cfg(x=1.5), "x", 0, 1)
    with pytest.raises(ValueError, match=r"^Cfg.x=-0.1 must be a number >= 0$"):
        checks.number(Cfg(x=-0.1), "x", 0)
    with pytest.raises(ValueError, match=r"^Cfg.x=0.0 must be a number > 0$"):
        checks.positive(Cfg(x=0.0), "x")


def test_choice_lists_the_valid_names():
    checks.choice(Cfg(name="adamw"), "name", ("adafactor", "adamw"))
    with pytest.raises(ValueError, match=r"^Cfg.name='sgd' must be one of adafactor, adamw$"):
        checks.choice(Cfg(name="sgd"), "name", ("adafactor", "adamw"))
    with pytest.raises(ValueError, match="must be one of"):
        checks.choice(Cfg(name=["adamw"]), "name", ("adafactor", "adamw"))  # unhashable


def test_text_refuses_empty_and_non_strings():
    checks.text(Cfg(name="m"), "name")
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match=r"^Cfg.name=.* must be a non-empty string$"):
            checks.text(Cfg(name=bad), "name")


def test_instance_names_the_class_and_the_hint():
    checks.instance(Cfg(path="a"), "path", (str, bytes))
    with pytest.raises(
        TypeError, match=r"^Cfg.path=3 must be of type Cfg \(in gin: @Cfg\(\)\)$"
    ) as info:
        checks.instance(Cfg(path=3), "path", Cfg, "in gin: @Cfg()")
    assert isinstance(info.value, ValueError)  # gin_registry catches ValueError
    with pytest.raises(TypeError, match=r"must be of type str or bytes$"):
        checks.instance(Cfg(path=3), "path", (str, bytes))


def test_optional_lets_none_through_and_says_so():
    checks.optional(checks.positive, Cfg(x=None), "x")
    checks.optional(checks.integer, Cfg(n=None), "n", 0)
    with pytest.raises(ValueError, match=r"^Cfg.x=-1 must be a number > 0 or None$"):
        checks.optional(checks.positive, Cfg(x=-1), "x")
    with pytest.raises(TypeError, match=r"^Cfg.n=True must be an integer >= 0 or None$"):
        checks.optional(checks.integer, Cfg(n=True), "n", 0)


def test_core_imports_only_the_standard_library():
    code = (
        "import sys; import thack_jax.core.checks; "
        "print([m for m in ('numpy', 'jax', 'flax', 'scipy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
