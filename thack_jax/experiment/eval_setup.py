"""The held-out evaluation of an experiment: its prompts, references and settings, kept in
the workdir, and the inline `Evaluator` built from them.

Files at the workdir's root (each written once, by process 0, and checked at every rerun):
    eval_prompts.npy     [N, Lx] int32 held-out prompts (validation split, EvalConfig.seed)
    eval_references.npy  [N, Ly] int32 one reference response per prompt: field mode the
                         task's own (human) references; oracle mode an oracle sample of a
                         stream of its own (task_data.REFERENCE_STREAM), so the reference
                         metric can be checked against the golden one
    eval_settings.json   the evaluator's settings, what `launch/eval.py --workdir=runs/<name>`
                         reads to reproduce the inline numbers
    reference_levels.json  oracle mode: the teacher's and the initial student's golden
                         divergences and the oracle's entropy (reference_levels.py)
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from thack_jax.core import storage
from thack_jax.evaluation.evaluator import EvalSettings, Evaluator
from thack_jax.experiment import reference_levels, task_data
from thack_jax.experiment import stages as stage_work
from thack_jax.experiment.config import ExperimentMismatchError

EVAL_PROMPTS = "eval_prompts.npy"
EVAL_REFERENCES = "eval_references.npy"
EVAL_SETTINGS = "eval_settings.json"


def _cached(ctx: stage_work.StageContext, name: str, array: np.ndarray) -> np.ndarray:
    """`array`, saved as <workdir>/<name> the first time and checked against it later."""
    path = ctx.path(name)
    if storage.exists(path):
        stored = storage.load_npy(path)
        if stored.shape != array.shape or not np.array_equal(stored, array):
            raise ExperimentMismatchError(
                f"{path} differs from the configured evaluation data (stored "
                f"{stored.dtype}{list(stored.shape)}, configured {array.dtype}"
                f"{list(array.shape)}); use a new workdir"
            )
    elif jax.process_index() == 0:
        storage.save_npy(path, array)
    return array


def eval_prompts(ctx: stage_work.StageContext) -> np.ndarray:
    """The held-out prompts [N, Lx] (validation split, fixed by the eval seed)."""
    ev = ctx.cfg.evaluation
    if ctx.cfg.mode == "field":  # the inputs of the examples whose references are used
        return eval_data(ctx)[0]
    return _cached(ctx, EVAL_PROMPTS, ctx.prompts("validation", ev.num_prompts, ev.seed))


def eval_data(ctx: stage_work.StageContext) -> tuple[np.ndarray, np.ndarray]:
    """(prompts [N, Lx], references [N, Ly]) of the evaluation (see the module doc)."""
    ev = ctx.cfg.evaluation
    if ctx.cfg.mode == "field":
        prompts, references = ctx.examples("validation", ev.num_prompts, ev.seed)
        prompts = _cached(ctx, EVAL_PROMPTS, prompts)
    else:
        prompts = eval_prompts(ctx)
        oracle = ctx.load_model("oracle")
        references = task_data.oracle_references(oracle, prompts, ctx.cfg, ctx.mesh)
    return prompts, _cached(ctx, EVAL_REFERENCES, references)


def settings_of(ctx: stage_work.StageContext) -> EvalSettings:
    cfg, ev = ctx.cfg, ctx.cfg.evaluation
    return EvalSettings(
        ev.num_samples,
        cfg.max_target_length,
        seed=ev.seed,
        batch_size=ev.batch_size,
        estimator=ev.estimator,
        reference_cache_mib=ev.reference_cache_mib,
    )


def build_evaluator(ctx: stage_work.StageContext) -> Evaluator:
    """The inline evaluator (no oracle in field mode); writes eval_settings.json and (oracle
    mode) reference_levels.json, computed with it."""
    cfg, settings = ctx.cfg, settings_of(ctx)
    prompts, references = eval_data(ctx)
    record = dataclasses.asdict(settings) | {
        "mode": cfg.mode,
        "prompts": EVAL_PROMPTS,
        "references": EVAL_REFERENCES,
    }
    if jax.process_index() == 0:
        stage_work.write_json(ctx.path(EVAL_SETTINGS), record)
    evaluator = Evaluator(
        oracle=ctx.load_model("oracle") if cfg.mode == "oracle" else None,
        teacher=ctx.load_model("teacher"),
        student_config=cfg.model_config("student"),
        prompts=prompts,
        settings=settings,
        mesh=ctx.mesh,
        references=references,
        references_sampled=cfg.mode == "oracle",  # the oracle's samples (eval_data)
    )
    reference_levels.ensure(ctx, evaluator)
    return evaluator
