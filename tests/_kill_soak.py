"""Kill-anywhere soak: a killed experiment resumes on the first rerun, bitwise equal.

Runs tests/_experiment_worker.py (a CI-sized experiment) uninterrupted into a reference
workdir, then, for each kill, in a fresh workdir: starts the worker, sends it a signal at a
uniformly random time in (0, reference time), waits for it to exit, runs exactly ONE rerun
(which must exit 0) and compares the rerun's workdir with the reference
(`compare_workdirs`). As a script:

    python tests/_kill_soak.py --kills=20 --seed=0 --out=/tmp/soak.json [--signal=TERM]

prints one table row per kill (time, phase the kill landed in, exit statuses, verdict) and
writes the records as JSON to --out; it exits 1 when any rerun failed or differed.
tests/experiment/test_kill_resume.py imports `soak` and `compare_workdirs`.

Before the reference, one more uninterrupted run (the warm-up) fills the JAX compilation
cache that every later attempt shares; the reference is then timed warm, like the attempts,
and the warm-up workdir must equal the reference (the comparison's own false-positive check:
two clean runs, one compiling and one loading from the cache, are bitwise equal).

What the comparison leaves out, each being wall-clock or process-specific by nature:
- `*/tensorboard/`: every event holds its wall time, the file name holds the creation
  time, host and pid, and a resumed run writes a second file (earlier events hidden by
  purge_step); the same scalars are compared in metrics.jsonl.
- `COMPLETE.json` field `wall_seconds` (a distillation run's duration; a resumed run's is
  the rerun's part only), and its rendering in report.md's `wall` column.
- report.md's absolute workdir path ("Built by ... from `<workdir>`").
- Orbax's `_CHECKPOINT_METADATA` (save timestamps), `commit_success.txt` and the OCDBT data
  files (random names): each kept checkpoint is instead restored and every array compared
  bitwise, with its batch-source position (`source/metadata`).
- per_prompt/*.npz: compared array by array (a zip member records a date).
metrics.jsonl has no wall-clock field (every key is a train/eval metric or guard value),
so its lines are compared exactly (values as JSON text); each step must occur once.
A leftover temporary (`*.tmp`, `*.tmp.<pid>`, orbax `*.orbax-checkpoint-tmp*`) is a
difference, but not the half-written saves that the rerun's restore moved to
`checkpoints_corrupt/` (the package keeps them on purpose); each record lists those.
After a SIGTERM the run saves its step off the checkpoint schedule, so keep-last-N keeps
another set of steps: with the same newest step, that is a note, not a difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import _experiment_worker
import numpy as np
from _experiment_worker import phase_at, read_events

from thack_jax.core import storage

WORKER = _experiment_worker.__file__
SKIPPED_DIRS = ("tensorboard",)
WALL_CLOCK_FIELDS = {"COMPLETE.json": ("wall_seconds",)}
# Orbax files outside the compared content (see the module docstring).
CHECKPOINT_BOOKKEEPING = ("_CHECKPOINT_METADATA", "commit_success.txt")
_TEMPORARY = re.compile(r"(\.tmp$|\.tmp\.|orbax-checkpoint-tmp)")
_QUARANTINE = "_corrupt"  # checkpoints.Checkpointer moves unreadable steps to <dir>_corrupt


# ---------------------------------------------------------------------------- comparison


def _files(root: str) -> set[str]:
    out = set()
    for folder, _, names in os.walk(root):
        out.update(os.path.relpath(os.path.join(folder, n), root) for n in names)
    return out


def temporary_files(root: str) -> list[str]:
    """Files or folders under `root` named like an interrupted write's temporary (not those
    in a checkpoint quarantine folder, where moved-aside saves are kept on purpose)."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.endswith(_QUARANTINE)]
        for name in dirs + names:
            if _TEMPORARY.search(name):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(found)


def _metrics_rows(path: str, rel: str) -> tuple[list[str], list[str]]:
    """(lines as canonical JSON text, problems) of a metrics.jsonl; a problem is a step
    logged twice or out of order, or a line that does not parse."""
    rows, problems, steps = [], [], []
    text = storage.read_text(path)
    if text and not text.endswith("\n"):
        problems.append(f"{rel}: last line is cut short")
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{rel}:{number}: not JSON: {line[:80]!r}")
            continue
        steps.append(row.get("step"))
        rows.append(json.dumps(row, sort_keys=True))
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
        problems.append(f"{rel}: steps logged more than once: {repeated}")
    elif steps != sorted(steps):
        problems.append(f"{rel}: steps out of order: {steps}")
    return rows, problems


def _compare_metrics(ref: str, cand: str, rel: str) -> list[str]:
    ref_rows, problems = _metrics_rows(ref, f"{rel} (reference)")
    cand_rows, cand_problems = _metrics_rows(cand, rel)
    problems += cand_problems
    if ref_rows != cand_rows:
        ref_by, cand_by = ({json.loads(r)["step"]: r for r in x} for x in (ref_rows, cand_rows))
        changed = sorted(s for s in set(ref_by) | set(cand_by) if ref_by.get(s) != cand_by.get(s))
        if changed:
            problems.append(f"{rel}: lines differ at steps {changed[:12]}")
        elif not cand_problems:
            problems.append(f"{rel}: {len(cand_rows)} lines, reference {len(ref_rows)}")
    return problems


def _json_without(path: str, fields: tuple[str, ...]):
    value = storage.read_json(path)
    for field in fields:
        value.pop(field, None)
    return value


def _report_text(path: str, workdir: str) -> str:
    """report.md with the workdir path and the runs table's `wall` cells masked."""
    text = storage.read_text(path).replace(os.path.abspath(workdir), "<workdir>")
    lines, wall = text.split("\n"), None
    for i, line in enumerate(lines):
        cells = line.split("|")
        if "wall" in [c.strip() for c in cells]:
            wall = [c.strip() for c in cells].index("wall")
        elif wall is not None and line.startswith("|") and len(cells) > wall:
            if not set(cells[wall].strip()) <= set("-"):
                cells[wall] = " <wall> "
            lines[i] = "|".join(cells)
        elif not line.startswith("|"):
            wall = None
    return "\n".join(lines)


def _npz_arrays(path: str) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _same_array(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _checkpoint_arrays(step_dir: str) -> dict:
    """{key path: numpy array} of a checkpoint step's TrainState (restored as host arrays,
    whatever the saved sharding)."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(step_dir, "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}


def _compare_checkpoints(ref: str, cand: str, rel: str, notes: list | None) -> list[str]:
    """The kept steps, and per step kept by both every state array (bitwise) and the
    source position. `notes` (a list): other kept steps with the same newest step are
    noted there instead (a SIGTERM saves its step off the schedule, so keep-last-N then
    keeps another set)."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns about absent metadata
    steps = [sorted((n for n in os.listdir(d) if n.isdigit()), key=int) for d in (ref, cand)]
    problems = []
    if steps[0] != steps[1]:
        message = f"{rel}: kept steps {steps[1]}, reference {steps[0]}"
        if notes is None or steps[0][-1:] != steps[1][-1:]:
            return [message]
        notes.append(message)
    for step in sorted(set(steps[0]) & set(steps[1]), key=int):
        where = f"{rel}/{step}"
        try:
            a = _checkpoint_arrays(os.path.join(ref, step))
            b = _checkpoint_arrays(os.path.join(cand, step))
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is a finding
            problems.append(f"{where}: not restorable ({type(e).__name__}: {str(e)[:200]})")
            continue
        if set(a) != set(b):
            problems.append(f"{where}: state paths differ: {sorted(set(a) ^ set(b))[:5]}")
        changed = sorted(k for k in set(a) & set(b) if not _same_array(a[k], b[k]))
        if changed:
            problems.append(f"{where}: state arrays differ: {changed[:5]} ({len(changed)})")
        sources = [
            _json_without(os.path.join(d, step, "source", "metadata"), ()) for d in (ref, cand)
        ]
        if sources[0] != sources[1]:
            problems.append(f"{where}: source position {sources[1]}, reference {sources[0]}")
    return problems


def _split(paths: set[str]) -> tuple[set[str], set[str]]:
    """(checkpoint folders '<...>/checkpoints', every other compared file)."""
    ckpt, files = set(), set()
    for rel in paths:
        parts = rel.split(os.sep)
        if any(p in SKIPPED_DIRS for p in parts) or any(p.endswith(_QUARANTINE) for p in parts):
            continue
        if "checkpoints" in parts:
            ckpt.add(os.sep.join(parts[: parts.index("checkpoints") + 1]))
        else:
            files.add(rel)
    return ckpt, files


def _compare_file(ref_root: str, cand_root: str, rel: str) -> list[str]:
    a, b = os.path.join(ref_root, rel), os.path.join(cand_root, rel)
    name = os.path.basename(rel)
    if name == "metrics.jsonl":
        return _compare_metrics(a, b, rel)
    if name in WALL_CLOCK_FIELDS:
        same = _json_without(a, WALL_CLOCK_FIELDS[name]) == _json_without(
            b, WALL_CLOCK_FIELDS[name]
        )
    elif name == "report.md":
        same = _report_text(a, ref_root) == _report_text(b, cand_root)
    elif name.endswith(".npz"):
        x, y = _npz_arrays(a), _npz_arrays(b)
        same = x.keys() == y.keys() and all(_same_array(x[k], y[k]) for k in x)
    else:
        same = storage.read_bytes(a) == storage.read_bytes(b)
    return [] if same else [f"{rel}: differs"]


def compare_workdirs(reference: str, candidate: str, notes: list | None = None) -> list[str]:
    """Everything in which `candidate` differs from `reference` ([]: equal), plus any
    leftover temporary file and any metrics.jsonl with a step logged twice (in either).
    With `notes` (a list, for a SIGTERMed run), a checkpoint folder that keeps other steps
    but the same newest one is noted there, not a difference."""
    ref_files, cand_files = _files(reference), _files(candidate)
    ref_ckpt, ref_other = _split(ref_files)
    cand_ckpt, cand_other = _split(cand_files)
    problems = [f"leftover temporary: {p}" for p in temporary_files(candidate)]
    problems += [f"missing: {p}" for p in sorted((ref_other - cand_other) | (ref_ckpt - cand_ckpt))]
    problems += [
        f"extra: {p}"
        for p in sorted((cand_other - ref_other) | (cand_ckpt - ref_ckpt))
        if not _TEMPORARY.search(p)
    ]
    for rel in sorted(ref_other & cand_other):
        problems += _compare_file(reference, candidate, rel)
    for rel in sorted(ref_ckpt & cand_ckpt):
        problems += _compare_checkpoints(
            os.path.join(reference, rel), os.path.join(candidate, rel), rel, notes
        )
    return problems


def quarantined(root: str) -> list[str]:
    """Checkpoint steps moved aside (unreadable or half-written) under `root`."""
    return sorted(
        os.path.relpath(os.path.join(folder, d), root)
        for folder, dirs, _ in os.walk(root)
        if folder.endswith(_QUARANTINE)
        for d in dirs
    )


# ------------------------------------------------------------------------------ attempts


@dataclasses.dataclass
class Attempt:
    """One worker process: exit status, seconds from start to exit, and the kill (if any:
    seconds after start, signal; `finished_first` when it exited before the signal)."""

    workdir: str
    returncode: int
    seconds: float
    started: float  # unix time
    kill_after: float | None = None
    finished_first: bool = False
    needed_sigkill: bool = False  # a TERMed worker still alive after the grace period


def run_worker(workdir: str, log: str, cache_dir: str | None, kill=None, timeout=1800.0):
    """Runs the worker into `workdir`, its stdout and stderr into `log`. kill: (signal
    name, seconds after start) or None. Returns an Attempt."""
    cmd = [sys.executable, WORKER, "--workdir", workdir]
    if cache_dir:
        cmd += ["--cache_dir", cache_dir]
    with open(log, "w") as out:
        started = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        attempt = Attempt(workdir, 0, 0.0, started)
        if kill is not None:
            name, after = kill
            attempt.kill_after = after
            try:
                proc.wait(timeout=after)
                attempt.finished_first = True
            except subprocess.TimeoutExpired:
                proc.send_signal(getattr(signal, f"SIG{name}"))
                timeout = 120.0 if name == "TERM" else timeout  # TERM: a grace period
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            attempt.needed_sigkill = True
    attempt.returncode, attempt.seconds = proc.returncode, time.time() - started
    return attempt


# --------------------------------------------------------------------------------- soak


@dataclasses.dataclass(frozen=True)
class SoakConfig:
    """signals: one per kill ('KILL' or 'TERM'). root: where workdirs and logs go.
    cache_dir: the shared JAX compilation cache ('': <root>/jax_cache, None: none).
    keep: keep the workdirs of passing kills too (failing ones are always kept)."""

    root: str
    signals: tuple[str, ...]
    seed: int = 0
    cache_dir: str | None = ""
    keep: bool = False
    verbose: bool = True


def _say(cfg: SoakConfig, text: str) -> None:
    if cfg.verbose:
        print(text, flush=True)


def _clean_run(cfg: SoakConfig, name: str, cache: str | None) -> Attempt:
    workdir = os.path.join(cfg.root, name)
    attempt = run_worker(workdir, workdir + ".log", cache)
    if attempt.returncode != 0:
        tail = open(workdir + ".log", errors="replace").read()[-3000:]
        raise RuntimeError(f"uninterrupted run {workdir} exited {attempt.returncode}:\n{tail}")
    _say(cfg, f"{name}: {attempt.seconds:.1f} s")
    return attempt


def one_kill(cfg: SoakConfig, index: int, kill: tuple[str, float], reference: Attempt, cache):
    """Kill `index`: a run stopped by SIG<name> `after` seconds in (kill = (name, after)),
    then one rerun, then the comparison with the reference. Returns its record."""
    (name, after), limit = kill, 10 * reference.seconds + 120  # a hung attempt fails
    workdir = os.path.join(cfg.root, f"kill_{index:02d}")
    first = run_worker(workdir, workdir + ".first.log", cache, kill=kill, timeout=limit)
    phase = phase_at(read_events(workdir + ".first.log"), first.started + after)
    if first.finished_first:
        phase = "none (finished before the signal)"
    in_flight = sorted(
        os.path.relpath(os.path.join(folder, d), workdir)
        for folder, dirs, _ in os.walk(workdir)
        for d in dirs
        if "orbax-checkpoint-tmp" in d and "checkpoints" == os.path.basename(folder)
    )
    rerun = run_worker(workdir, workdir + ".rerun.log", cache, timeout=limit)
    notes = [] if name == "TERM" else None
    differences = []
    if rerun.returncode == 0:
        differences = compare_workdirs(reference.workdir, workdir, notes)
    record = {
        "kill": index,
        "signal": name,
        "kill_after_s": round(after, 2),
        "phase": phase,
        "checkpoint_writes_in_flight": in_flight,
        "first_exit": first.returncode,
        "first_needed_sigkill": first.needed_sigkill,
        "rerun_exit": rerun.returncode,
        "rerun_needed_sigkill": rerun.needed_sigkill,
        "rerun_s": round(rerun.seconds, 1),
        "quarantined": quarantined(workdir),
        "notes": notes or [],
        "equal": rerun.returncode == 0 and not differences,
        "differences": differences[:30],
        "workdir": workdir,
    }
    if rerun.returncode != 0:
        record["rerun_log_tail"] = open(workdir + ".rerun.log", errors="replace").read()[-4000:]
    if record["equal"] and not cfg.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        record["workdir"] = None
    return record


def soak(cfg: SoakConfig) -> dict:
    """The warm-up and reference runs, then every kill (times drawn with `cfg.seed`).
    Returns {'reference_s', 'warmup_s', 'baseline_differences', 'kills': [record...],
    'failures', 'total_s'}."""
    start = time.time()
    os.makedirs(cfg.root, exist_ok=True)
    cache = os.path.join(cfg.root, "jax_cache") if cfg.cache_dir == "" else cfg.cache_dir
    warm = _clean_run(cfg, "warmup", cache)
    ref = _clean_run(cfg, "reference", cache)
    baseline = compare_workdirs(ref.workdir, warm.workdir)
    if not cfg.keep:
        shutil.rmtree(warm.workdir, ignore_errors=True)
    rng = np.random.default_rng(cfg.seed)
    records = []
    for index, name in enumerate(cfg.signals):
        after = float(rng.uniform(0.0, ref.seconds))
        record = one_kill(cfg, index, (name, after), ref, cache)
        records.append(record)
        _say(cfg, format_table([record], header=index == 0))
    return {
        "seed": cfg.seed,
        "cache_dir": cache,
        "warmup_s": round(warm.seconds, 1),
        "reference_s": round(ref.seconds, 1),
        "reference": ref.workdir,
        "baseline_differences": baseline,
        "kills": records,
        "failures": [r["kill"] for r in records if not r["equal"]],
        "total_s": round(time.time() - start, 1),
    }


def format_table(records: list[dict], header: bool = True) -> str:
    rows = []
    if header:
        rows += [
            "| kill | signal | at (s) | phase | 1st exit | rerun exit | rerun (s) | equal |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for r in records:
        phase = r["phase"] + (" [ckpt write in flight]" if r["checkpoint_writes_in_flight"] else "")
        verdict = "yes" if r["equal"] else "NO: " + "; ".join(r["differences"][:3])
        rows.append(
            f"| {r['kill']} | {r['signal']} | {r['kill_after_s']:.1f} | {phase} "
            f"| {r['first_exit']} | {r['rerun_exit']} | {r['rerun_s']:.1f} | {verdict} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", default="KILL", choices=("KILL", "TERM"))
    parser.add_argument("--out", default="")
    parser.add_argument("--root", default="", help="workdirs and logs (default: a new temp dir)")
    parser.add_argument("--cache_dir", default="", help="shared JAX compilation cache")
    parser.add_argument("--no_cache", action="store_true", help="compile in every attempt")
    parser.add_argument("--keep", action="store_true", help="keep passing workdirs too")
    args = parser.parse_args(argv)
    cfg = SoakConfig(
        root=args.root or tempfile.mkdtemp(prefix="kill_soak_"),
        signals=(args.signal,) * args.kills,
        seed=args.seed,
        cache_dir=None if args.no_cache else args.cache_dir,
        keep=args.keep,
    )
    print(f"kill soak in {cfg.root}: {args.kills} x SIG{args.signal}, seed {args.seed}", flush=True)
    result = soak(cfg)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print()
    print(format_table(result["kills"]))
    print(
        f"\nwarm-up {result['warmup_s']} s, reference {result['reference_s']} s, total "
        f"{result['total_s']} s; baseline differences: {result['baseline_differences'] or 'none'}"
    )
    print(f"failures: {result['failures'] or 'none'}")
    return 1 if result["failures"] or result["baseline_differences"] else 0


if __name__ == "__main__":
    sys.exit(main())
