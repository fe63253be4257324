"""The evaluator: proxy (student vs teacher) and golden (student vs oracle) divergences,
and the student's cross-entropy on reference responses.

`Evaluator` measures sequence-level forward KL, reverse KL and Jensen-Shannon between the
student and each reference model (teacher: `proxy/...`, oracle: `golden/...`; without an
oracle, field mode, only `proxy/...`) on fixed held-out prompts, with the estimators of
`divergences.py`; given one reference response per prompt, also `reference/...`
(references.py: the student's cross-entropy on them, whose changes are the golden forward
KL's, without an oracle). It is called inline by the trainer
(`Evaluator.evaluate(student_params)` every N steps) or by a separate process that watches
a training workdir (`watcher.watch`, used by `launch/eval.py`).

Determinism (common random numbers): the oracle's and the teacher's samples are drawn once,
at construction, and reused for every checkpoint; the student's samples use the same fixed
key at every call. Two checkpoints are therefore compared on the same reference responses,
and with the same random numbers for their own responses, so a curve over training is
smooth and differences between checkpoints are not sampling noise. Sample j of prompt i
draws with the row id i * n + j of its stream's one key (`sampling.sample(first_row=...)`),
so the samples, and every estimate, do not depend on `EvalSettings.batch_size`.

Cost per `evaluate`: one student sampling pass, then per batch one jitted function
(`batch_scoring.score_fn`) that runs the student's encoder and decodes (teacher forcing)
the student on its own, the oracle's and the teacher's responses, and each reference on
the student's responses (5 decoder passes, 1 encoder pass; 3 and 1 without an oracle; one
more student decoder pass over the references). The reference models' encoder outputs and
their log-probs of their own samples are computed once, at construction (2 more decoder
passes and 2 encoder passes per checkpoint when `EvalSettings.reference_cache_mib` cannot
hold the log-probs).
Prompts are processed `batch_size` at a time (the last batch padded with copies of prompt
0, results dropped), so every jitted function compiles once per shape. See docs/evaluation.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from thack_jax import models
from thack_jax.decoding import sampling
from thack_jax.evaluation import batch_scoring, divergences, sanity
from thack_jax.evaluation import references as refs_lib
from thack_jax.evaluation.batch_scoring import REFERENCES, Side, reference_fn, score_fn
from thack_jax.evaluation.sanity import DegenerateEvaluationError  # noqa: F401 (re-export)
from thack_jax.evaluation.settings import ESTIMATORS, EvalSettings  # noqa: F401 (re-export)
from thack_jax.models.config import T5Config
from thack_jax.parallel import partitioning

DIVERGENCES = ("forward_kl", "reverse_kl", "js")
# The sample stream of each model (its key: fold_in(fold_in(key(seed), stream), 0)); fixed
# per role, so the teacher's and the student's samples are the same with or without oracle.
STREAMS = {"oracle": 0, "teacher": 1, "student": 2}


def metrics_of(estimates: dict[str, divergences.Estimate]) -> dict[str, float]:
    """The metric lines of `Evaluator.evaluate` from `Evaluator.estimates`."""
    metrics = {}
    for key, est in estimates.items():
        metrics[key] = est.value
        metrics[f"{key}_stderr"] = est.stderr
        metrics[f"{key}_per_token"] = est.per_token
        metrics[f"{key}_per_token_stderr"] = est.per_token_stderr
    return metrics


class Evaluator:
    """Sequence-level proxy and golden divergences of a student on held-out prompts, and its
    cross-entropy on reference responses.

    Args:
      oracle: (config, params) of the oracle, or None (field mode: no oracle; only the
        `proxy/...` and `reference/...` metrics, nothing is sampled from or scored by it).
      teacher: (config, params) of the teacher (frozen).
      student_config: the student's T5Config (its params come with each `evaluate`).
      prompts: [N, Lx] int held-out prompts (pad 0), fixed by the caller's seed.
      settings: an `EvalSettings` (samples, length cap, seed, batch size, estimator).
      mesh: shard rows over its data axes (and parameters by the logical rules); None = the
        default device.
      train_prompts: optional [M, Lx'] prompts used for training; any shared row is an error.
      references: optional int [N, Ly_ref], one reference response per prompt (tokens, EOS
        1, pad 0; no EOS: cut at Ly_ref; checked by `references.check_references`). Adds
        `reference/cross_entropy` (the student's NLL of them, nats per response:
        KL(data || student) + H(data), so its changes are the golden forward KL's, measured
        without an oracle) and the constant levels `reference/teacher_cross_entropy` (and
        `reference/oracle_cross_entropy`), computed once here. With oracle samples as
        references, reference/cross_entropy - reference/oracle_cross_entropy is a plain,
        paired estimate of golden/forward_kl. See references.py.
      references_sampled: the references are model samples (the oracle's): a row of pad
        ids is a response, not a missing one (`references.check_references`).
    """

    def __init__(
        self,
        oracle: tuple[T5Config, dict] | None,
        teacher: tuple[T5Config, dict],
        student_config: T5Config,
        prompts,
        settings: EvalSettings,
        *,
        mesh: jax.sharding.Mesh | None = None,
        train_prompts=None,
        references=None,
        references_sampled: bool = False,
    ):
        if not isinstance(settings, EvalSettings):
            raise TypeError(f"settings must be an EvalSettings, got {type(settings).__name__}")
        prompts = np.asarray(prompts)
        if prompts.ndim != 2 or prompts.shape[0] < 1 or prompts.shape[1] < 1:
            raise ValueError(
                f"prompts must be [num_prompts, length] (both >= 1), got {prompts.shape}"
            )
        if not np.issubdtype(prompts.dtype, np.integer):
            raise ValueError(f"prompts must be integer token ids, got dtype {prompts.dtype}")
        models_given = {"oracle": oracle, "teacher": teacher}
        roles = {r: m[0] for r, m in models_given.items() if m is not None}
        roles["student"] = student_config
        for a, b in (("oracle", "student"), ("teacher", "student"), ("oracle", "teacher")):
            if a in roles and roles[a].vocab_size != roles[b].vocab_size:
                raise ValueError(
                    f"the {a} has vocab_size {roles[a].vocab_size} but the {b} has "
                    f"{roles[b].vocab_size}; divergences need one shared vocabulary"
                )
        if train_prompts is not None:
            refs_lib.check_no_overlap(prompts, train_prompts)
        self._references = None  # (tokens, mask) [N, Ly_ref], checked before any pass
        if references is not None:
            lengths = {role: c.max_target_length for role, c in roles.items()}
            self._references = refs_lib.check_references(
                references,
                prompts.shape[0],
                lengths,
                student_config.vocab_size,
                sampled=references_sampled,
            )
            tokens, mask = (refs_lib.batches_of(x, settings.batch_size) for x in self._references)
            self._reference_batches = list(zip(tokens, mask, strict=True))
        self.student_config = student_config
        self.settings = settings
        self.num_samples = settings.num_samples
        self.max_decode_len = settings.max_decode_len
        self.sampling = settings.sampling
        self.seed = settings.seed
        self.batch_size = settings.batch_size
        self.mesh = mesh
        self.estimator = settings.estimator
        self.num_prompts = prompts.shape[0]
        self.mode = "field" if oracle is None else "oracle"
        self._batches = refs_lib.batches_of(prompts.astype(np.int32), self.batch_size)
        self._key = jax.random.key(self.seed)
        self._shardings = {}  # config -> its params' shardings on the mesh
        self._refs = {
            role: (model[0], self.place_params(*model))
            for role, model in models_given.items()
            if model is not None
        }
        # Drawn once: every checkpoint is scored on the same reference responses.
        self._ref_samples = {
            role: self._sample(config, params, STREAMS[role])
            for role, (config, params) in self._refs.items()
        }
        self._fixed = self._fixed_passes()  # per batch: {role: Fixed}, or None
        self._reference_levels = {}
        if references is not None:  # the levels of the reference models, once
            self._reference_levels = {
                refs_lib.level_key(role): self._reference_level(role)
                for role in ("oracle", "teacher")
                if role in self._refs
            }

    @property
    def reference_roles(self) -> tuple[str, ...]:
        """The reference models scored: ('oracle', 'teacher'), or ('teacher',) in field mode."""
        return tuple(self._refs)

    # ------------------------------------------------------------------------ placement

    def param_shardings(self, config: T5Config):
        """Shardings of a params tree of `config` on the mesh (None without a mesh).

        Cached per config: `models.param_axes` / `param_shapes` trace the model's init, which
        cost as much as the tiny default's whole evaluation when done at every checkpoint."""
        if self.mesh is None:
            return None
        if config not in self._shardings:
            self._shardings[config] = partitioning.param_shardings(
                self.mesh, models.param_axes(config), models.param_shapes(config)
            )
        return self._shardings[config]

    def place_params(self, config: T5Config, params: dict) -> dict:
        """Puts params on the mesh, or (no mesh) commits them to the first device: the jitted
        functions are keyed on argument placement, so every call must use the same one."""
        shardings = self.param_shardings(config)
        if shardings is None:
            shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.device_put(params, shardings)

    def _put(self, x: np.ndarray, axes: tuple):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, partitioning.logical_to_sharding(self.mesh, axes, x.shape))

    # ------------------------------------------------------------------------ the passes

    def _sample(self, config, params, stream: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Responses of one model for every batch: [(tokens [B*n, L], mask [B*n, L])].

        One key per stream for all batches, and batch b's rows start at global row
        b * B * n: sample j of prompt i draws with the row id i * n + j whatever the batch
        size, so (padded rows dropped) samples and estimates do not depend on it. The key
        is the one batch 0 had when each batch drew with fold_in(key, b), so a
        single-batch evaluation keeps its numbers bitwise.
        """
        key = jax.random.fold_in(jax.random.fold_in(self._key, stream), 0)
        out = []
        for b, inputs in enumerate(self._batches):
            s = sampling.sample(
                config,
                params,
                self._put(inputs, ("batch", "length")),
                key,
                self.sampling,
                mesh=self.mesh,
                first_row=b * self.batch_size * self.num_samples,
            )
            out.append((partitioning.to_host(s.tokens), partitioning.to_host(s.mask)))
        return out

    def _fixed_passes(self) -> list[dict | None]:
        """Per batch, what no checkpoint changes of each reference model (`Fixed`): its
        encoder output, and its log-probs of its own samples while they fit in
        `settings.reference_cache_mib` (references in `_refs` order: the oracle first)."""
        budget = self.settings.reference_cache_mib * 2**20
        if budget == 0:
            return [None] * len(self._batches)
        rows = self.batch_size * self.num_samples
        own = {}
        for role, (config, _) in self._refs.items():
            need = batch_scoring.fixed_bytes(config, rows, self.max_decode_len) * len(self._batches)
            own[role] = need <= budget
            budget -= need if own[role] else 0
        out = []
        for b, inputs in enumerate(self._batches):
            placed = self._put(inputs, ("batch", "length"))
            fixed = {}
            for role, (config, params) in self._refs.items():
                fn = batch_scoring.fixed_fn(config, self.num_samples, self.mesh, own[role])
                tokens = self._put(self._ref_samples[role][b][0], ("batch", "length"))
                fixed[role] = fn(params, placed, tokens)
            out.append(fixed)
        return out

    def _reference_level(self, role: str) -> divergences.Estimate:
        """The cross-entropy of reference model `role` on the reference responses (once)."""
        config, params = self._refs[role]
        fn = reference_fn(config, self.mesh)
        parts = []
        for inputs, refs in zip(self._batches, self._reference_batches, strict=True):
            placed = tuple(self._put(x, ("batch", "length")) for x in refs)
            lp = fn(params, self._put(inputs, ("batch", "length")), placed)
            parts.append(partitioning.to_host(lp))
        key = refs_lib.level_key(role)
        return self._reference_estimate(key, np.concatenate(parts), step=None)

    def _reference_estimate(self, key: str, logprobs, step) -> divergences.Estimate:
        """The cross-entropy Estimate of log-probs [>= N, Ly_ref] of the references (padded
        rows dropped); DegenerateEvaluationError when it is not finite."""
        mask = self._references[1]
        try:
            est = refs_lib.cross_entropy(logprobs[: self.num_prompts], mask)
        except divergences.NonFiniteValuesError as e:
            raise DegenerateEvaluationError(key, step, str(e)) from e
        self._check_estimate(key, est, None, None, step)
        return est

    def _score(self, student, student_samples):
        """({reference role: (side of its samples, side of the student's samples)}, the
        student's log-probs of the references [N, Ly_ref] or None), real rows only; in each
        side a = the model that sampled."""
        params = {role: p for role, (_, p) in self._refs.items()} | {"student": student[1]}
        configs = {role: c for role, (c, _) in self._refs.items()} | {"student": student[0]}
        fn = score_fn(tuple(sorted(configs.items())), self.num_samples, self.mesh)
        sets = dict(self._ref_samples, student=student_samples)
        parts = {role: ([], []) for role in self._refs}
        ref_parts = []
        for b, inputs in enumerate(self._batches):
            samples = {
                role: tuple(self._put(x, ("batch", "length")) for x in batches[b])
                for role, batches in sets.items()
            }
            refs = None
            if self._references is not None:
                refs = tuple(self._put(x, ("batch", "length")) for x in self._reference_batches[b])
            placed = self._put(inputs, ("batch", "length"))
            result, ref_lp = fn(params, placed, samples, refs, self._fixed[b])
            if ref_lp is not None:
                ref_parts.append(partitioning.to_host(ref_lp))
            for role, (p_side, q_side) in result.items():
                parts[role][0].append(
                    [partitioning.to_host(x) for x in p_side] + [sets[role][b][1]]
                )
                parts[role][1].append(
                    [partitioning.to_host(x) for x in q_side] + [student_samples[b][1]]
                )
        rows = self.num_prompts * self.num_samples

        def side(batches) -> Side:
            return Side(*(np.concatenate(col)[:rows] for col in zip(*batches, strict=True)))

        sides = {role: (side(p), side(q)) for role, (p, q) in parts.items()}
        return sides, (np.concatenate(ref_parts) if ref_parts else None)

    def evaluate(self, student_params: dict, *, step: int | None = None) -> dict[str, float]:
        """Divergences of the student (params of `student_config`) from the reference models.

        Returns {'<prefix>/<div>', '<prefix>/<div>_stderr', '<prefix>/<div>_per_token',
        '<prefix>/<div>_per_token_stderr'} for prefix in (proxy, golden) (proxy only without
        an oracle) and div in (forward_kl, reverse_kl, js): nats per response (per token for
        `_per_token`); with references also the same 4 of 'reference/cross_entropy' and
        'reference/<teacher|oracle>_cross_entropy' (the constant levels).
        `step` names the step in a DegenerateEvaluationError (see `estimates`).
        """
        return metrics_of(self.estimates(student_params, step=step))

    def estimates(
        self, student_params: dict, *, step: int | None = None
    ) -> dict[str, divergences.Estimate]:
        """'<prefix>/<div>' -> the full `divergences.Estimate` (with its per-prompt values
        [num_prompts], which a bootstrap over prompts resamples; see `noise.py`).

        Raises DegenerateEvaluationError for a non-finite estimate, or one exactly 0 with
        stderr exactly 0 while the student's parameters differ from the reference's (a model
        against itself may give 0; parameters are compared only when such a 0 occurs).
        """
        student = (self.student_config, self.place_params(self.student_config, student_params))
        # Common random numbers: the same key at every call (stream 2).
        student_samples = self._sample(*student, stream=STREAMS["student"])
        sides, ref_logprobs = self._score(student, student_samples)
        ids = np.repeat(np.arange(self.num_prompts), self.num_samples)
        out = {}
        for prefix, role in REFERENCES.items():
            if role not in sides:
                continue  # field mode: no oracle
            p_side, q_side = sides[role]  # y ~ reference, y ~ student
            for div, compute in self._estimators(p_side, q_side, ids).items():
                key = f"{prefix}/{div}"
                try:
                    out[key] = compute()
                except divergences.NonFiniteValuesError as e:
                    raise DegenerateEvaluationError(key, step, str(e)) from e
                self._check_estimate(key, out[key], role, student, step)
        if ref_logprobs is not None:
            key = refs_lib.STUDENT_KEY
            out[key] = self._reference_estimate(key, ref_logprobs, step)
            out |= self._reference_levels
        return out

    def _estimators(self, p: Side, q: Side, ids) -> dict:
        """div -> a thunk computing its Estimate. p: reference samples (a = reference, b =
        student); q: student samples (a = student)."""
        if self.estimator == "rao_blackwell":
            return {
                "forward_kl": lambda: divergences.rao_blackwell_kl(p.kl, p.mask, ids),
                "reverse_kl": lambda: divergences.rao_blackwell_kl(q.kl, q.mask, ids),
                "js": lambda: divergences.rao_blackwell_js(p.mix, p.mask, ids, q.mix, q.mask, ids),
            }
        p_len, q_len = p.mask.sum(1), q.mask.sum(1)
        p_a, p_b, q_a, q_b = (x.sum(1) for x in (p.a_tok, p.b_tok, q.a_tok, q.b_tok))
        return {
            "forward_kl": lambda: divergences.plain_kl(p_a, p_b, p_len, ids),
            "reverse_kl": lambda: divergences.plain_kl(q_a, q_b, q_len, ids),
            "js": lambda: divergences.plain_js(p_a, p_b, p_len, ids, q_b, q_a, q_len, ids),
        }

    def _check_estimate(self, key: str, est, role: str | None, student, step) -> None:
        """`sanity.check_estimate` against `role`'s parameters (None: finiteness only)."""
        ref = None if role is None else self._refs[role][1]
        mine = None if student is None else student[1]
        sanity.check_estimate(sanity.Checked(key, est, role, step), ref, mine, self.mesh)

    def reference_entropy(self, role: str = "oracle") -> divergences.Estimate:
        """-E_{y ~ role} log p_role(y | x): the entropy of reference model `role` in nats per
        response (per token: ratio of sums), from its cached samples (no new draw), with the
        stderr over prompts (per_prompt [N]: the mean NLL of each prompt's n samples)."""
        tokens, mask = self.reference_samples(role)  # [N*n, L] each; refuses a missing role
        config, params = self._refs[role]
        fn = reference_fn(config, self.mesh)
        parts = []
        for inputs, batch in zip(self._batches, self._ref_samples[role], strict=True):
            rows = np.repeat(inputs, self.num_samples, axis=0)  # [B*n, Lx], prompt-major
            placed = tuple(self._put(x, ("batch", "length")) for x in batch)
            lp = fn(params, self._put(rows, ("batch", "length")), placed)
            parts.append(partitioning.to_host(lp))
        logprobs = np.where(mask, np.concatenate(parts)[: tokens.shape[0]], 0.0)
        ids = np.repeat(np.arange(self.num_prompts), self.num_samples)
        zeros = np.zeros(tokens.shape[0])
        return divergences.plain_kl(zeros, logprobs.sum(1), mask.sum(1).astype(float), ids)

    def reference_samples(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        """The cached responses of 'oracle' or 'teacher': (tokens, mask) [N*n, L], prompt-major."""
        if role not in self._ref_samples:
            raise ValueError(
                f"no samples of {role!r}: this evaluator has {sorted(self._ref_samples)}"
            )
        rows = self.num_prompts * self.num_samples
        tokens, mask = (
            np.concatenate(c)[:rows] for c in zip(*self._ref_samples[role], strict=True)
        )
        return tokens, mask
