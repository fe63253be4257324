"""The names of the distillation regimes and of the model roles, each defined once.

Standard library only: `experiment/config.py` validates its dataclasses against these names
without importing jax (the batch sources of `regimes.py` / `generation.py` use them too).

The string values are a file format: they appear in gin files, `run.json`, `experiment.json`
and reports, so they never change.
"""

from __future__ import annotations

import enum


class Regime(str, enum.Enum):
    """Where the distillation batches come from (docs/data.md, "Regimes").

    A `str` subclass, so `Regime.OFFLINE == 'offline'`; configs still store the plain
    `.value` so that JSON and fingerprints hold the bare string.
    """

    OFFLINE = "offline"  # a fixed set of teacher completions, reshuffled per epoch
    ONLINE_TEACHER = "online_teacher"  # fresh teacher samples for each batch
    ONLINE_STUDENT = "online_student"  # fresh samples of the current student
    MIXED = "mixed"  # per batch: a fraction online, the rest offline

    def __str__(self) -> str:
        # Python 3.12 formats a mixed-in enum as 'Regime.OFFLINE'; paths and messages want
        # the value.
        return self.value

    @classmethod
    def parse(cls, value, what: str = "regime") -> Regime:
        """`value` ('offline', ... or a Regime) as a Regime.

        Raises:
          ValueError: naming `what`, the value and the valid regimes.
        """
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"{what}={value!r} is not a regime; valid regimes: {', '.join(REGIMES)}"
            ) from None


REGIMES = tuple(r.value for r in Regime)  # ('offline', 'online_teacher', 'online_student', 'mixed')

ROLES = ("oracle", "teacher", "student")  # the three models of the experiment
SAMPLER_ROLES = ("teacher", "student")  # who may sample the online rows


def check_choice(value, valid: tuple[str, ...], what: str) -> str:
    """Returns `value` if it is one of `valid`.

    Raises:
      ValueError: naming `what`, the value and the valid values.
    """
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{what}={value!r} must be one of {', '.join(valid)}")
    return value


def check_role(value, what: str = "role") -> str:
    """`value` if it is one of ROLES (oracle, teacher, student), else ValueError."""
    return check_choice(value, ROLES, what)


def check_sampler_role(value, what: str = "online_role") -> str:
    """`value` if it is one of SAMPLER_ROLES (teacher, student), else ValueError."""
    return check_choice(value, SAMPLER_ROLES, what)
