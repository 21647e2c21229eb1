"""The issue's targets, judged from the run summaries (after ``report.compare``): PASS, MISS or N/A, with spreads.

Every target is judged on each repeat; the line carries the per-repeat values, their spread (min-max) and a status:
PASS only when every repeat meets the target, MISS otherwise (``inconclusive`` in the note when a repeat's value
is only a bound that straddles the threshold), N/A when its runs are missing - never a silent pass. A target with
fewer than two repeats says so in its note.

==========================================  ===========================================================================
dynamic: time vs best twin <= 0.77          NetSense's time to target / the best static twin's, same repeat
<trace>: NetSense >= 0.95x the best twin    speed (best twin's TTT / NetSense's), or samples/s for the CNN
<trace>: final quality vs plain DDP         mean of the last three evaluations at steps both have; accuracy within
                                            0.5 points (NetSense - DDP >= -0.5), loss within 0.02 nats (<= +0.02)
CNN 100 Mbit/s >= 0.85x the synced ideal    samples/s against the faster run of the synced ideal
recovery <= 1 s                             every 20 -> 1000 Mbit/s change of NetSense's dynamic runs
drop <= 2 steps                             every 1000 -> 20 Mbit/s change
probe cost <= 3 %                           the larger of the time and byte shares, every NetSense run
phase changes before the target >= 4        a check of the dynamic trace itself (NetSense's runs)
==========================================  ===========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["STATIC_TRACES", "evaluate_targets"]

STATIC_TRACES = ("20m", "100m", "1g", "unshaped")
DYNAMIC_TIME = 0.77
STATIC_SPEED = 0.95
SYNCED = 0.85
RECOVERY_S = 1.0
DROP_STEPS = 2
PROBE_SHARE = 0.03
CHANGES = 4
#: final quality: accuracy points below plain DDP, or nats above it
QUALITY = {"accuracy": 0.5, "loss": 0.02}


def _line(name: str, workload: str, threshold: float, sense: str, per_rep: list[Any], note: str = "",
          unit: str = "") -> dict[str, Any]:
    """A target line from per-repeat ``(low, high)`` bounds (``None``: missing). ``sense`` is ``"max"`` (the value
    must be at most the threshold) or ``"min"`` (at least)."""
    have = [b for b in per_rep if b is not None]
    out: dict[str, Any] = {"name": name, "workload": workload, "threshold": threshold, "sense": sense, "unit": unit,
                           "repeats": [list(b) if b is not None else None for b in per_rep], "note": note}
    if not have:
        out.update(status="N/A", value=None, spread=None)
        out["note"] = note or "not run"
        return out
    ok = [(b[1] <= threshold) if sense == "max" else (b[0] >= threshold) for b in have]
    fail = [(b[0] > threshold) if sense == "max" else (b[1] < threshold) for b in have]
    # a repeat's figure: exact, or the bound that was observed (a lower bound when the run stopped before the end)
    points = [b[1] if math.isfinite(b[1]) else b[0] for b in have]
    finite = [p for p in points if math.isfinite(p)]
    out["spread"] = [min(finite), max(finite)] if finite else None
    out["value"] = sum(finite) / len(finite) if finite else None
    out["one_sided"] = any(b[0] != b[1] for b in have)
    out["status"] = "PASS" if all(ok) else "MISS"
    notes = [note] if note else []
    if out["status"] == "MISS" and not all(ok[i] or fail[i] for i in range(len(have))):
        notes.append("inconclusive: a bound straddles the threshold")
    if out["status"] == "MISS" and any(ok):
        notes.append(f"{sum(ok)} of {len(have)} repeats meet it")
    if len(have) < 2:
        notes.append("one repeat only")
    out["note"] = "; ".join(notes)
    return out


def _runs(runs: Sequence[Mapping[str, Any]], workload: str, trace: str, contender: str) -> list[Mapping[str, Any]]:
    return sorted((r for r in runs if r["workload"] == workload and r["trace"] == trace
                   and r["contender"] == contender and r.get("role", "run") == "run"), key=lambda r: r["rep"])


def _exact(x: float | None) -> tuple[float, float] | None:
    return None if x is None else (x, x)


def _common_mean(evals: Sequence[Mapping[str, Any]], ref: Sequence[Mapping[str, Any]], upto: int) -> tuple:
    """Means of both runs' evaluations at the last three steps both have (after 0, at or before ``upto``)."""
    common = sorted({e["step"] for e in evals} & {e["step"] for e in ref})
    common = [c for c in common if 0 < c <= upto][-3:]
    if not common:
        return None, None, common
    pick = lambda ev: sum(e["value"] for e in ev if e["step"] in common) / len(common)
    return pick(evals), pick(ref), common


def evaluate_targets(runs: Sequence[Mapping[str, Any]], evals: Mapping[str, Sequence[Mapping[str, Any]]]
                     ) -> list[dict[str, Any]]:
    """Every target line for the workloads in ``runs``.

    ``evals`` maps ``"<workload>/<trace>/<contender>/<rep>"`` to a run's evaluations (NetSense's, and plain
    DDP's quality reference under ``"<workload>/quality/ddp/0"``).
    """
    out: list[dict[str, Any]] = []
    order = ("digits", "gpt", "cnn")
    workloads = sorted({r["workload"] for r in runs}, key=lambda w: (order.index(w) if w in order else len(order), w))
    for wl in workloads:
        ns_dyn = _runs(runs, wl, "dynamic", "netsense")
        if any(r["workload"] == wl and r["trace"] == "dynamic" for r in runs):
            out.append(_line(f"dynamic ({wl}): NetSense's time to target / the best twin's", wl, DYNAMIC_TIME, "max",
                             [r.get("ratios", {}).get("time_vs_best_twin") for r in ns_dyn], unit="x"))
            out.append(_line(f"dynamic ({wl}): rate changes before NetSense's target (a check of the trace)", wl,
                             CHANGES, "min", [_exact(r.get("changes_before_target")) for r in ns_dyn],
                             note="" if not ns_dyn or any(r.get("tts_s") is not None for r in ns_dyn)
                             else "NetSense did not reach the target"))
        for trace in STATIC_TRACES:
            ns = _runs(runs, wl, trace, "netsense")
            if not ns and not any(r["workload"] == wl and r["trace"] == trace and r.get("role", "run") == "run"
                                  and r["contender"] != "netsense" for r in runs):
                continue
            throughput = all(r["metric"] is None for r in runs if r["workload"] == wl)
            if throughput:
                vals = [_exact(r.get("ratios", {}).get("throughput_vs_best_twin")) for r in ns]
                out.append(_line(f"{trace} ({wl}): NetSense's samples/s / the best twin's", wl, STATIC_SPEED, "min",
                                 vals, unit="x"))
            else:
                vals = [r.get("ratios", {}).get("speed_vs_best_twin") for r in ns]
                out.append(_line(f"{trace} ({wl}): the best twin's time to target / NetSense's", wl, STATIC_SPEED,
                                 "min", vals, unit="x"))
                if ns:
                    out.append(_quality(wl, trace, ns, evals))
        ns_100 = _runs(runs, wl, "100m", "netsense")
        if ns_100 and ns_100[0]["metric"] is None:
            out.append(_line(f"100m ({wl}): NetSense's samples/s / the synced ideal's", wl, SYNCED, "min",
                             [_exact(r.get("ratios", {}).get("throughput_vs_ideal_sync")) for r in ns_100], unit="x"))
        if ns_dyn:
            changes = [r.get("sensing", {}).get("recoveries", []) for r in ns_dyn]
            rec = [[(x["seconds"], x["seconds"] if not x["censored"] else math.inf) for x in run] for run in changes]
            out.append(_sensing(f"dynamic ({wl}): recovery 20 -> 1000 Mbit/s, training seconds to an estimate "
                                f">= 75 % of it", wl, RECOVERY_S, rec, "s", changes))
            changes = [r.get("sensing", {}).get("drops", []) for r in ns_dyn]
            drops = [[(x["steps"], x["steps"] if not x["censored"] else math.inf) for x in run] for run in changes]
            out.append(_sensing(f"dynamic ({wl}): drop 1000 -> 20 Mbit/s, steps to an estimate <= 125 % of it", wl,
                                DROP_STEPS, drops, " steps", changes))
        ns_all = [r for r in runs if r["workload"] == wl and r["contender"] == "netsense" and r.get("probes")]
        if ns_all:
            shares = [_exact(max(r["probes"]["time_share"], r["probes"]["byte_share"])) for r in ns_all]
            worst = max(ns_all, key=lambda r: max(r["probes"]["time_share"], r["probes"]["byte_share"]))
            out.append(_line(f"{wl}: bandwidth probes' share of training time and bytes (the larger; every "
                             f"NetSense run)", wl, PROBE_SHARE, "max", shares,
                             note=f"worst: {worst['trace']} repeat {worst['rep']}: "
                                  f"{100 * worst['probes']['time_share']:.2f} % of the time, "
                                  f"{100 * worst['probes']['byte_share']:.2f} % of the bytes"
                                  + (f" ({100 * worst['probes']['dense_share']:.2f} % of what plain DDP would have "
                                     f"sent)" if worst["probes"].get("dense_share") is not None else ""),
                             unit="share"))
    return out


def _sensing(name: str, wl: str, threshold: float, per_run: list[list[tuple[float, float]]], unit: str,
             records: list[list[dict[str, Any]]] | None = None) -> dict:
    """One line over every change of every run: each change is judged; repeats are the runs (worst change each).
    ``records`` (the changes as measured) add which mode ran at the changes that missed."""
    per_rep = [max(run, key=lambda b: (b[1], b[0])) if run else None for run in per_run]
    line = _line(name, wl, threshold, "max", per_rep, unit=unit.strip())
    every = [b for run in per_run for b in run]
    if every:
        censored = sum(1 for b in every if b[1] == math.inf)
        met = sum(1 for b in every if b[1] <= threshold)
        line["changes"] = [list(b) for b in every]
        missed: dict[str, int] = {}
        for run_bounds, run_records in zip(per_run, records or [[] for _ in per_run]):
            for b, rec in zip(run_bounds, run_records):
                if b[1] > threshold:
                    mode = str(rec.get("mode") or "?").split("(")[0]
                    missed[mode] = missed.get(mode, 0) + 1
        modes = ", ".join(f"{m} at {n}" for m, n in sorted(missed.items(), key=lambda kv: -kv[1]))
        line["note"] = "; ".join(x for x in (f"{met} of {len(every)} changes met it" + (
            f", {censored} not within their phase" if censored else "") + (
            f" (the mode running at the changes that missed: {modes})" if modes else ""), line["note"]) if x)
    elif per_run:
        line["note"] = "no such change within the runs"
    return line


def _quality(wl: str, trace: str, ns: Sequence[Mapping[str, Any]], evals: Mapping[str, Sequence]) -> dict[str, Any]:
    """NetSense's final quality against plain DDP's quality reference at the same steps, per repeat."""
    metric = ns[0]["metric"] if ns else None
    tol = QUALITY.get(metric or "", 0.0)
    ref = evals.get(f"{wl}/quality/ddp/0")
    per_rep, notes = [], []
    for r in ns:
        mine = evals.get(f"{wl}/{trace}/netsense/{r['rep']}")
        if not mine or not ref:
            per_rep.append(None)
            continue
        a, b, common = _common_mean(mine, ref, r["steps"])
        if a is None:
            per_rep.append(None)
            continue
        diff = 100 * (a - b) if metric == "accuracy" else a - b
        per_rep.append((diff, diff))
        notes.append(f"repeat {r['rep']}: steps {','.join(map(str, common))}: "
                     + (f"{100 * a:.2f} vs {100 * b:.2f} %" if metric == "accuracy" else f"{a:.3f} vs {b:.3f} nats"))
    if metric == "accuracy":
        return _line(f"{trace} ({wl}): final accuracy, NetSense - plain DDP (points)", wl, -tol, "min", per_rep,
                     note="; ".join(notes), unit="points")
    return _line(f"{trace} ({wl}): final validation loss, NetSense - plain DDP (nats)", wl, tol, "max", per_rep,
                 note="; ".join(notes) if ref else "plain DDP's quality reference not run", unit="nats")
