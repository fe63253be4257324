"""Field checks for the frozen config dataclasses (standard library only).

Each `__post_init__` calls these instead of hand-writing the same test, so every refusal
reads the same way, naming the dataclass, the field and the value:

    RunConfig.online_fraction=1.5 must be a number in [0, 1]

Rules shared by all checks: a bool is never an integer or a number (True is not a count),
and NaN or +-inf never pass a number check. A value of the wrong type raises
`FieldTypeError`, which is both a TypeError and a ValueError, so callers that catch either
(gin_registry, the trainer's tests) keep working; a value of the right type outside its
range raises ValueError.

`value=` overrides getattr(obj, field), for an element of a collection field, e.g.
`integer(self, f"eval_steps[{i}]", 0, value=step)`.
"""

from __future__ import annotations

import math
import numbers

_FIELD = object()  # sentinel: read the value from obj.field


class FieldTypeError(TypeError, ValueError):
    """A config field holds a value of the wrong type."""


def where(obj, field: str, value=_FIELD) -> str:
    """'<Class>.<field>=<value!r>', the start of every message."""
    if value is _FIELD:
        value = getattr(obj, field)
    return f"{type(obj).__name__}.{field}={value!r}"


def is_integer(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite real number (int, float, numpy scalar), not a bool."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _get(obj, field: str, value):
    return getattr(obj, field) if value is _FIELD else value


def integer(obj, field: str, minimum: int | None = None, *, value=_FIELD) -> None:
    """obj.field must be an integer (not a bool), >= minimum when one is given."""
    value = _get(obj, field, value)
    what = "an integer" if minimum is None else f"an integer >= {minimum}"
    if not is_integer(value):
        raise FieldTypeError(f"{where(obj, field, value)} must be {what}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where(obj, field, value)} must be {what}")


def number(obj, field: str, low: float | None = None, high: float | None = None) -> None:
    """obj.field must be a finite number in [low, high] (None: that side unbounded)."""
    value = getattr(obj, field)
    if low is not None and high is not None:
        what = f"a number in [{low}, {high}]"
    elif low is not None:
        what = f"a number >= {low}"
    elif high is not None:
        what = f"a number <= {high}"
    else:
        what = "a finite number"
    if not is_number(value):
        raise FieldTypeError(f"{where(obj, field)} must be {what}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{where(obj, field)} must be {what}")


def positive(obj, field: str) -> None:
    """obj.field must be a finite number > 0."""
    value = getattr(obj, field)
    if not is_number(value):
        raise FieldTypeError(f"{where(obj, field)} must be a number > 0")
    if not value > 0:
        raise ValueError(f"{where(obj, field)} must be a number > 0")


def choice(obj, field: str, valid) -> None:
    """obj.field must be one of the strings `valid` (a tuple of names)."""
    value = getattr(obj, field)
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{where(obj, field)} must be one of {', '.join(valid)}")


def text(obj, field: str) -> None:
    """obj.field must be a non-empty string."""
    value = getattr(obj, field)
    if not isinstance(value, str):
        raise FieldTypeError(f"{where(obj, field)} must be a non-empty string")
    if not value:
        raise ValueError(f"{where(obj, field)} must be a non-empty string")


def instance(obj, field: str, cls, hint: str = "", *, value=_FIELD) -> None:
    """obj.field must be an instance of `cls` (a class or a tuple of classes); `hint` is
    added in parentheses, e.g. 'in gin: @ModelSpec()'."""
    value = _get(obj, field, value)
    if not isinstance(value, cls):
        classes = cls if isinstance(cls, tuple) else (cls,)
        what = " or ".join(c.__name__ for c in classes)
        extra = f" ({hint})" if hint else ""
        raise FieldTypeError(f"{where(obj, field, value)} must be of type {what}{extra}")


def optional(check, obj, field: str, *args) -> None:
    """None, or a value that passes check(obj, field, *args); the message adds 'or None'.

    e.g. optional(positive, self, "clip_norm") -> 'TrainConfig.clip_norm=-1 must be a
    number > 0 or None'.
    """
    if getattr(obj, field) is None:
        return
    try:
        check(obj, field, *args)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{e} or None") from None
