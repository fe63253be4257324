"""The reference levels of an oracle-mode experiment: what a golden curve is compared with.

Three constants, computed once with the inline evaluator (same prompts, settings and
oracle samples: common random numbers with every evaluation of the runs):
    teacher       golden/<div> of the teacher scored as if it were the student (teacher vs
                  oracle); a student whose golden ends below it is better than its teacher
    student_init  golden/<div> of the initial student (student_init/model, before
                  distillation): where every run starts
    oracle_entropy  -E_{y ~ oracle} log p_oracle(y | x), nats per response, from the
                  evaluator's cached oracle samples: the scale of the golden divergences

File `reference_levels.json` at the workdir root (written once by process 0; a rerun reads
it, see `ensure`):
    {"format": FORMAT, "teacher": {<div>: {"value", "stderr"}}, "student_init": {...},
     "oracle_entropy": {"value", "stderr", "per_token", "per_token_stderr"}}
Field mode (no oracle) has no golden levels and the teacher's proxy is 0 by definition:
no file is written. The levels only evaluate (fixed keys of the evaluator); they consume no
random stream of the runs.
"""

from __future__ import annotations

import copy

import jax

from thack_jax.core import storage
from thack_jax.evaluation.evaluator import DIVERGENCES, Evaluator
from thack_jax.experiment import stages as stage_work
from thack_jax.experiment.config import ExperimentMismatchError

FILE = "reference_levels.json"
FORMAT = "thack_jax.reference_levels/1"
MODELS = ("teacher", "student_init")


def as_student(evaluator: Evaluator, config) -> Evaluator:
    """The evaluator scoring students of `config` (e.g. the teacher's): a shallow copy, so
    the oracle's and the teacher's cached samples are shared, not drawn again."""
    other = copy.copy(evaluator)
    other.student_config = config
    return other


def golden_levels(evaluator: Evaluator, model: tuple) -> dict:
    """{<div>: {"value", "stderr"}} of golden/<div> of `model` = (config, params) scored as
    the student."""
    estimates = as_student(evaluator, model[0]).estimates(model[1])
    return {
        div: {
            "value": estimates[f"golden/{div}"].value,
            "stderr": estimates[f"golden/{div}"].stderr,
        }
        for div in DIVERGENCES
    }


def compute(ctx: stage_work.StageContext, evaluator: Evaluator) -> dict:
    """The levels record of the experiment (see the module doc); oracle mode only."""
    record = {"format": FORMAT}
    for role in MODELS:
        record[role] = golden_levels(evaluator, ctx.load_model(role))
    entropy = evaluator.reference_entropy("oracle")
    record["oracle_entropy"] = {
        name: float(getattr(entropy, name))
        for name in ("value", "stderr", "per_token", "per_token_stderr")
    }
    return record


def ensure(ctx: stage_work.StageContext, evaluator: Evaluator) -> dict | None:
    """The levels: read from <workdir>/reference_levels.json when it exists, else computed
    and written (process 0); None in field mode (nothing is computed or written).

    A stored file is trusted, not recomputed: the models it measured are the shared stages'
    outputs, which the workdir's configuration checks already pin, and a resume on other
    hardware (another device count or platform) must not be refused over float
    reassociation in a constant of the report."""
    if ctx.cfg.mode != "oracle":
        return None
    path = ctx.path(FILE)
    if storage.exists(path):
        record = storage.read_json(path)
        if record.get("format") != FORMAT or not all(k in record for k in MODELS):
            raise ExperimentMismatchError(
                f"{path} is not a {FORMAT} record (format {record.get('format')!r}, keys "
                f"{sorted(record)}); remove it to recompute the levels"
            )
        return record
    record = compute(ctx, evaluator)
    if jax.process_index() == 0:
        stage_work.write_json(path, record)
    return record
