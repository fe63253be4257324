"""The six findings of docs/method.md, decided from `report.analyse` dicts (numpy only).

Each finding is decided from numbers printed in the report, per run or per group (runs that
differ only in seed; group values are means over seeds), on one curve set against the
proxy: the golden metric (student vs oracle) in oracle mode; in field mode (no oracle) the
reference cross-entropy (`reference.REFERENCE`), which moves as the forward KL from the
data does, when the runs have it. Findings 1-5 need that curve; finding 6 (the oracle-free
detector) only the proxy, and the curve for its lags.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from thack_jax.reporting import reference

ONLINE = ("online_teacher", "online_student")
RISE_Z = 2.0  # a rise is significant above this many combined stderrs
STATUS = {True: "reproduced", False: "not reproduced", None: "not run"}
NO_ORACLE = "not measurable (field mode: no oracle)"
REFERENCE_WORD = "reference cross-entropy"


def _g(value) -> str:
    return "–" if value is None else f"{value:.4g}"


@dataclasses.dataclass(frozen=True)
class Finding:
    """title; status: True / False / None = reproduced / not / not run (or not measurable);
    text: the numbers; label: the status as the report prints it."""

    title: str
    status: bool | None
    text: str
    label: str


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a finding reads: `runs` (report.Run), their `labels` and `views` (per run, the
    dict of `golden_view` / `reference_view`), the `groups` over them (report.Group), the
    `stats` of each group label (`group_stats`) and the curve's name in the text (`word`)."""

    runs: list
    labels: list
    views: list
    groups: list
    stats: dict
    word: str


def golden_view(a: dict) -> dict:
    """The golden curve of an analysis, under the names the findings read."""
    return {
        "start": a["start_golden"],
        "min_step": a["golden_min_step"],
        "min": a["golden_min"],
        "final": a["final_golden"],
        "rise": a["golden_rise"],
        "rise_z": a["golden_rise_z"],
        "u_shape": a["u_shape"],
        "proxy_at_min": a["proxy_at_golden_min"],
        "lag": a["lag"],
        "start_proxy": a["start_proxy"],
        "final_proxy": a["final_proxy"],
        "flag_step": a["flag_step"],
    }


def reference_view(a: dict) -> dict | None:
    """The reference cross-entropy of an analysis, as `golden_view`; None without it."""
    ref = a.get("reference")
    if ref is None:
        return None
    keys = ("start", "min_step", "min", "final", "rise", "rise_z", "u_shape", "proxy_at_min")
    out = {k: ref[k] for k in keys}
    out.update(lag=ref["lag"], start_proxy=a["start_proxy"], final_proxy=a["final_proxy"])
    return dict(out, flag_step=a["flag_step"])


def group_stats(group, views: list[dict]) -> dict:
    """Means over the group's seeds, and counts of U shapes and flagged runs (views: per
    run, as `golden_view` returns)."""
    v = [views[i] for i in group.members]
    out = {k: float(np.mean([x[k] for x in v])) for k in ("rise", "rise_z", "final", "final_proxy")}
    rises = [x["rise"] for x in v]
    out.update(n=len(v), rise_min=min(rises), rise_max=max(rises))
    out["u"] = sum(bool(x["u_shape"]) for x in v)
    out["flagged"] = sum(x["flag_step"] is not None for x in v)
    return out


def _of(groups, regime):
    return [g for g in groups if g.config["regime"] == regime]


def _f1_u_shape(x: Inputs):
    # The finding is about many epochs of one completion per prompt (the paper's offline
    # set); more completions per prompt are finding 5's generation budget, which is meant
    # to weaken hacking, so those runs are reported but do not decide this finding.
    offline = [i for i, r in enumerate(x.runs) if r.config["regime"] == "offline"]
    idx = [i for i in offline if x.runs[i].config.get("completions_per_prompt", 1) == 1]
    if not idx:
        return None, "No offline run with one completion per prompt."
    u = [i for i in idx if x.views[i]["u_shape"]]
    per_run = "; ".join(
        f"{x.labels[i]}: {x.word} {_g(v['min'])} at step {v['min_step']} -> "
        f"{_g(v['final'])} (rise {v['rise_z']:.1f} se), proxy "
        f"{_g(v['proxy_at_min'])} -> {_g(v['final_proxy'])}"
        for i, v in ((i, x.views[i]) for i in idx)
    )
    text = f"{len(u)} of {len(idx)} offline runs with one completion per prompt show a U shape"
    others = len(offline) - len(idx)
    if others:
        n_u = sum(bool(x.views[i]["u_shape"]) for i in offline if i not in idx)
        text += f" ({n_u} of {others} runs with more completions per prompt do)"
    return len(u) == len(idx), f"{text}. {per_run}."


def _f2_online_monotone(x: Inputs):
    idx = [i for i, r in enumerate(x.runs) if r.config["regime"] in ONLINE]
    if not idx:
        return None, "No online_teacher or online_student run."
    ok, parts = 0, []
    for i in idx:
        v = x.views[i]
        good = (
            v["rise_z"] <= RISE_Z
            and v["final"] < v["start"]
            and v["final_proxy"] < v["start_proxy"]
        )
        ok += good
        parts.append(
            f"{x.labels[i]}: {x.word} {_g(v['start'])} -> {_g(v['final'])}, rise "
            f"after its minimum {v['rise_z']:.1f} se; proxy {_g(v['start_proxy'])} -> "
            f"{_g(v['final_proxy'])}{'' if good else ' (fails)'}"
        )
    text = (
        f"{ok} of {len(idx)} online runs end below their start on both metrics with no "
        f"significant {x.word} rise (<= {RISE_Z:g} se). " + "; ".join(parts) + "."
    )
    return ok == len(idx), text


def _offline_reference(group, offline):
    """Offline groups with the mixed group's offline data, else all of its experiment's."""
    same = [o for o in offline if o.experiment == group.experiment]
    match = [
        o
        for o in same
        if all(o.config[k] == group.config[k] for k in ("num_prompts", "completions_per_prompt"))
    ]
    return match or same


def _f3_mixed(x: Inputs):
    mixed, offline = _of(x.groups, "mixed"), _of(x.groups, "offline")
    pairs = [(g, _offline_reference(g, offline)) for g in mixed]
    pairs = [(g, ref) for g, ref in pairs if ref]
    if not pairs:
        return None, "Needs a mixed run and an offline run of the same experiment."
    ok, parts = 0, []
    for g, ref in pairs:
        ref_rise = float(np.mean([x.stats[o.label]["rise"] for o in ref]))
        s = x.stats[g.label]
        ok += s["rise"] < ref_rise
        parts.append(
            f"{g.label}: {x.word} rise {_g(s['rise'])} ({s['rise_z']:.1f} se) vs "
            f"{_g(ref_rise)} for {', '.join(o.label for o in ref)}"
        )
    text = f"{ok} of {len(pairs)} mixed groups rise less than offline. " + "; ".join(parts) + "."
    return ok == len(pairs), text


def _ordered_sets(groups, bucket_key, order_key):
    """Offline groups bucketed by `bucket_key`, each bucket with >= 2 values of `order_key`,
    sorted by it."""
    buckets = {}
    for g in _of(groups, "offline"):
        buckets.setdefault((g.experiment, bucket_key(g.config)), []).append(g)
    return [
        sorted(b, key=lambda g: order_key(g.config))
        for b in buckets.values()
        if len({order_key(g.config) for g in b}) >= 2
    ]


def _f4_prompt_diversity(x: Inputs):
    sets = _ordered_sets(
        x.groups,
        lambda c: c["num_prompts"] * c["completions_per_prompt"],
        lambda c: -c["num_prompts"],
    )
    if not sets:
        return (
            None,
            "Needs offline groups of equal size (prompts x completions) with fewer prompts.",
        )
    ok, parts = 0, []
    for s in sets:
        rises = [x.stats[g.label]["rise"] for g in s]
        ok += bool(np.all(np.diff(rises) > 0))
        parts.append(", ".join(f"{g.label}: rise {_g(r)}" for g, r in zip(s, rises, strict=True)))
    text = (
        f"{x.word[0].upper()}{x.word[1:]} rise grows as the prompts get fewer in {ok} of "
        f"{len(sets)} sets of equal size. " + "; ".join(parts) + "."
    )
    return ok == len(sets), text


def _f5_completions(x: Inputs):
    sets = _ordered_sets(
        x.groups, lambda c: c["num_prompts"], lambda c: c["completions_per_prompt"]
    )
    if not sets:
        return None, "Needs offline groups with the same prompts and more completions per prompt."
    ok, parts = 0, []
    for s in sets:
        curve = [x.stats[g.label]["final"] for g in s]
        proxy = [x.stats[g.label]["final_proxy"] for g in s]
        ok += bool(np.all(np.diff(curve) < 0) and np.all(np.diff(proxy) < 0))
        parts.append(
            ", ".join(
                f"{g.label}: final proxy {_g(p)}, {x.word} {_g(q)}"
                for g, p, q in zip(s, proxy, curve, strict=True)
            )
        )
    text = (
        f"Both final metrics fall with more completions per prompt in {ok} of {len(sets)} "
        "sets. " + "; ".join(parts) + "."
    )
    return ok == len(sets), text


def _f6_detector(x: Inputs):
    """Views may be None here (a field-mode run without reference metrics: no lag)."""

    def flagged(regimes):
        idx = [i for i, r in enumerate(x.runs) if r.config["regime"] in regimes]
        hit = [i for i in idx if x.views[i]["flag_step"] is not None]
        return idx, hit

    off, off_hit = flagged(("offline",))
    on, on_hit = flagged(ONLINE)
    if not off or not on:
        return None, "Needs offline and online runs."

    def flag(i):
        v = x.views[i]
        lag = f" (lag {_g(v['lag'])})" if "lag" in v else ""
        return f"{x.labels[i]}: step {v['flag_step']}{lag}"

    flags = "; ".join(flag(i) for i in off_hit + on_hit)
    lags = [x.views[i]["lag"] for i in off_hit if x.views[i].get("lag") is not None]
    median_lag = (
        f" Median lag after the {x.word} minimum: {_g(float(np.median(lags)))} steps."
        if lags
        else ""
    )
    text = (
        f"Flagged: {len(off_hit)} of {len(off)} offline runs, {len(on_hit)} of {len(on)} "
        f"online runs.{median_lag} {flags or 'No flags'}."
    )
    return len(off_hit) == len(off) and not on_hit, text


# {curve}: "golden", or in field mode "reference cross-entropy".
FINDINGS = (
    ("Offline, many epochs: proxy falls, {curve} falls then rises (U shape)", _f1_u_shape),
    ("Online teacher and online student: both metrics fall monotonically", _f2_online_monotone),
    ("A small online fraction (about 10%) stabilises the {curve} metric", _f3_mixed),
    ("Fewer unique prompts (same data size) make hacking stronger", _f4_prompt_diversity),
    ("More generations per prompt make both metrics better", _f5_completions),
    ("The proxy's power-law deviation flags hacking without the oracle", _f6_detector),
)


def _inputs(runs, labels, views, groups, word) -> Inputs:
    """Inputs over the runs whose view is not None (groups re-indexed, empty ones dropped)."""
    keep = [i for i, v in enumerate(views) if v is not None]
    new = {old: k for k, old in enumerate(keep)}
    kept = [dataclasses.replace(g, members=[new[i] for i in g.members if i in new]) for g in groups]
    kept = [g for g in kept if g.members]
    views = [views[i] for i in keep]
    stats = {g.label: group_stats(g, views) for g in kept}
    return Inputs([runs[i] for i in keep], [labels[i] for i in keep], views, kept, stats, word)


def _field_findings(runs, labels, analyses, groups) -> list[Finding]:
    """Field mode: findings 1-5 on the reference cross-entropy of the runs that have it
    (else not measurable); finding 6 on every run, with lags where there is a reference."""
    views = [reference_view(a) for a in analyses]
    x = _inputs(runs, labels, views, groups, REFERENCE_WORD)
    out = []
    for title, decide in FINDINGS[:-1]:
        title = title.format(curve=REFERENCE_WORD)
        if not x.runs:
            text = (
                "It needs the oracle (field mode has none) or the reference cross-entropy "
                f"(`{reference.REFERENCE}`), which these runs did not log."
            )
            out.append(Finding(title, None, text, NO_ORACLE))
            continue
        status, text = decide(x)
        head = "Field mode: no oracle to measure it against; decided on the reference cross-entropy"
        left_out = len(runs) - len(x.runs)
        head += f" ({left_out} runs without it left out). " if left_out else ". "
        out.append(Finding(title, status, head + text, f"{STATUS[status]} on the {REFERENCE_WORD}"))
    flags = [
        v if v is not None else {"flag_step": a["flag_step"]}
        for v, a in zip(views, analyses, strict=True)
    ]
    title, decide = FINDINGS[-1]
    status, text = decide(Inputs(runs, labels, flags, groups, {}, REFERENCE_WORD))
    return out + [Finding(title, status, text, STATUS[status])]


def findings(runs, labels, analyses, groups) -> list[Finding]:
    """One Finding per entry of FINDINGS, decided on the golden metric when every run has an
    oracle (`reference.report_mode`), else as `_field_findings`."""
    if reference.report_mode(analyses) == "field":
        return _field_findings(runs, labels, analyses, groups)
    x = _inputs(runs, labels, [golden_view(a) for a in analyses], groups, "golden")
    out = []
    for title, decide in FINDINGS:
        status, text = decide(x)
        out.append(Finding(title.format(curve="golden"), status, text, STATUS[status]))
    return out
