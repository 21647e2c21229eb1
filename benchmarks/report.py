"""Pure maths of the shaped-link benchmark: per-run figures and ratios; ``--markdown`` writes the docs tables.

    python benchmarks/report.py --markdown benchmarks/results/results.json > docs/benchmarks.md

Nothing here runs training or touches the link: :func:`summarise_run` turns one job's result (both ranks, the trace
as applied) into figures, :func:`compare` adds the ratios; ``targets.py`` judges the targets; ``markdown.py``
writes the tables. ``tests/test_bench_smoke.py`` tests them with hand-made results.

Definitions (also in ``benchmarks/README.md``):

* **samples/s**: ``world * batch * (steps after the first WARMUP_STEPS) / training seconds of those steps``.
* **time to target (TTT)**: training seconds (wall time minus evaluation) at the first evaluation that meets the
  target (accuracy at or above it, validation loss at or below it; for a throughput workload on the dynamic trace,
  the training clock at its ``target_steps``-th step). ``None`` when the run never got there; the run's training
  time is then a lower bound of its TTT.
* **final quality**: mean of the last three evaluations after step 0 (at or before a given step).
* **best twin**: per (workload, trace, repeat), the static twin with the shortest TTT (the most samples/s for a
  throughput workload). A twin stopped before the target counts with its training time, a lower bound; a twin not
  rerun in a repeat counts with its first repeat's figure.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import adaptation
from names import REFERENCES, TWINS

__all__ = [
    "SCHEMA_VERSION", "WARMUP_STEPS", "best_twin", "compare", "final_quality", "invert", "ratio_bounds", "reached",
    "samples_per_second", "summarise_run", "time_to_target", "tts_bounds",
]

SCHEMA_VERSION = 3
WARMUP_STEPS = 3


def reached(value: float, target: float, metric: str | None) -> bool:
    """Whether an evaluation meets ``target``: accuracy at or above it, loss at or below it."""
    return value <= target if metric == "loss" else value >= target


def samples_per_second(steps: Sequence[Mapping[str, Any]], samples_per_step: int,
                       skip: int = WARMUP_STEPS) -> float | None:
    """Global samples per second over the steps after the first ``skip`` (``None`` with too few steps).

    ``steps[i]["train_s"]`` is the cumulative training clock after step ``i + 1``.
    """
    if len(steps) <= skip or skip < 0:
        return None
    t0 = steps[skip - 1]["train_s"] if skip > 0 else 0.0
    dt = steps[-1]["train_s"] - t0
    return samples_per_step * (len(steps) - skip) / dt if dt > 0 else None


def time_to_target(evals: Sequence[Mapping[str, Any]], target: float, metric: str | None
                   ) -> tuple[float | None, int | None]:
    """``(training seconds, step)`` at the first evaluation that meets ``target``, else ``(None, None)``."""
    for e in evals:
        if reached(e["value"], target, metric):
            return e["train_s"], e["step"]
    return None, None


def final_quality(evals: Sequence[Mapping[str, Any]], last: int = 3, up_to_step: int | None = None) -> float | None:
    """Mean of the last ``last`` evaluations after step 0 (at or before ``up_to_step``)."""
    chosen = [e["value"] for e in evals if e["step"] > 0 and (up_to_step is None or e["step"] <= up_to_step)]
    if not chosen:
        return None
    tail = chosen[-last:]
    return sum(tail) / len(tail)


def summarise_run(out: Mapping[str, Any], world_size: int = 2, skip: int = WARMUP_STEPS) -> dict[str, Any]:
    """Figures of one job from the driver's result: ``{"ranks": [rank 0, rank 1], "trace_log", "t_go"}``."""
    r0, r1 = out["ranks"]
    job, steps, evals = r0["job"], r0["steps"], r0.get("evals", [])
    metric, target = r0.get("metric"), job.get("target")
    total_steps = sum(r0["mode_steps"].values()) or 1
    if metric is not None and target is not None and evals:
        tts, tts_step = time_to_target(evals, target, metric)
    elif job.get("target_steps") and len(steps) >= job["target_steps"]:
        tts, tts_step = steps[job["target_steps"] - 1]["train_s"], job["target_steps"]
    else:
        tts, tts_step = None, None
    train_s = steps[-1]["train_s"] if steps else 0.0
    s: dict[str, Any] = {
        "contender": job["contender"],
        "workload": job["workload"],
        "trace": job.get("trace"),
        "rep": job.get("rep", 0),
        "role": job.get("role", "run"),
        "standin": bool(r0.get("standin", False)),
        "metric": metric,
        "target": target if metric is not None else job.get("target_steps"),
        "steps": len(steps),
        "stop": r0["stop"],
        "cap_s": job["cap_s"],
        "train_s": train_s,
        "samples_per_s": samples_per_second(steps, world_size * r0["batch_size"], skip),
        "measured_steps": max(0, len(steps) - skip),
        "tts_s": tts,
        "tts_step": tts_step,
        "final": final_quality(evals) if evals else None,
        "final_step": evals[-1]["step"] if evals else None,
        "bytes_sent": float(r0.get("socket_bytes", 0) + r1.get("socket_bytes", 0)),
        "hook_bytes": r0.get("hook_bytes"),
        "mode_share": {m: n / total_steps for m, n in sorted(r0["mode_steps"].items())},
        "ranks_agree": [e["value"] for e in evals] == [e["value"] for e in r1.get("evals", [])],
        "job_s": out.get("job_s"),
        "timing": r0.get("timing"),
    }
    s["bytes_per_step"] = s["bytes_sent"] / len(steps) if steps else None
    probes = adaptation.probe_cost(steps)
    if probes is not None:
        s["probes"] = probes
    if s["trace"] == "dynamic" and steps and "bw_mbit" in steps[-1]:
        log, t_go = out["trace_log"], out["t_go"]
        s["sensing"] = {"recoveries": adaptation.recoveries(steps, log, t_go),
                        "drops": adaptation.drops(steps, log, t_go)}
    if s["trace"] == "dynamic" and steps:
        s["changes_before_target"] = adaptation.changes_before(steps, out["trace_log"], out["t_go"], tts_step)
    return s


def tts_bounds(run: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """``(low, high)`` bounds of a run's time to target: exact when it got there, ``(training time, inf)`` when
    it stopped before; ``None`` without a run."""
    if run is None:
        return None
    if run.get("tts_s") is not None:
        return run["tts_s"], run["tts_s"]
    return run.get("train_s") or 0.0, math.inf


def _group(runs: Sequence[Mapping[str, Any]], workload: str, trace: str, rep: int) -> dict[str, Mapping[str, Any]]:
    """Contender -> run of one repeat; a twin not rerun in this repeat counts with its first repeat's run."""
    mine = [r for r in runs if r["workload"] == workload and r["trace"] == trace and r.get("role", "run") == "run"]
    out = {r["contender"]: r for r in mine if r["rep"] == rep}
    for r in mine:
        if r["rep"] == 0 and r["contender"] in TWINS and r["contender"] not in out:
            out[r["contender"]] = r
    return out


def best_twin(group: Mapping[str, Mapping[str, Any]], throughput: bool) -> Mapping[str, Any] | None:
    """The best static twin of a group: most samples/s (throughput) or shortest time to target, a twin that
    stopped before the target counting with its training time (a lower bound of its TTT)."""
    twins = [group[t] for t in TWINS if t in group]
    if throughput:
        rated = [t for t in twins if t.get("samples_per_s")]
        return max(rated, key=lambda t: t["samples_per_s"]) if rated else None
    ran = [t for t in twins if tts_bounds(t)[0] > 0 or t.get("tts_s") is not None]
    if not ran:
        return None
    return min(ran, key=lambda t: (tts_bounds(t)[0], t.get("tts_s") is None))


def _div(a: float, b: float) -> float:
    """``a / b`` for non-negative bounds: ``x / inf = 0``, ``x / 0 = inf`` (``0 / 0``: 0)."""
    if b == 0:
        return math.inf if a > 0 else 0.0
    if b == math.inf:
        return 0.0 if a != math.inf else math.inf
    return a / b


def ratio_bounds(num: Sequence[float] | None, den: Sequence[float] | None) -> tuple[float, float] | None:
    """Bounds ``(low, high)`` of ``num / den`` where each is given by its bounds (``None`` when either is missing)."""
    if num is None or den is None:
        return None
    return _div(num[0], den[1]), _div(num[1], den[0])


def invert(b: Sequence[float] | None) -> tuple[float, float] | None:
    """Bounds of ``1 / x`` from bounds of ``x``."""
    return None if b is None else (_div(1.0, b[1]), _div(1.0, b[0]))


def _best_twin_tts(group: Mapping[str, Mapping[str, Any]]) -> tuple[float, float] | None:
    """Bounds of the shortest time to target over the twins of a group: ``min`` of their bounds."""
    bounds = [tts_bounds(group[t]) for t in TWINS if t in group]
    if not bounds:
        return None
    return min(b[0] for b in bounds), min(b[1] for b in bounds)


def compare(runs: list[dict[str, Any]]) -> None:
    """Add ``ratios`` to every non-reference run (in place), against its group (same workload, trace, repeat):

    ``time_vs_best_twin`` (bounds of TTT / best twin's TTT), ``speed_vs_best_twin`` (its inverse), ``best_twin``,
    ``throughput_vs_best_twin``, ``throughput_vs_ddp``, ``throughput_vs_ideal`` / ``_ideal_sync`` (the best run of
    each reference).
    """
    refs: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in runs:
        if r["contender"] in REFERENCES and r.get("samples_per_s"):
            key = (r["workload"], r["contender"])
            if key not in refs or r["samples_per_s"] > refs[key]["samples_per_s"]:
                refs[key] = r
    for r in runs:
        if r["contender"] in REFERENCES or r.get("role", "run") != "run":
            continue
        group = _group(runs, r["workload"], r["trace"], r["rep"])
        throughput = r["metric"] is None and r["trace"] != "dynamic"
        best = best_twin(group, throughput)
        ddp = group.get("ddp")
        sps = r.get("samples_per_s")
        ratios: dict[str, Any] = {"best_twin": best and best["contender"]}
        ratios["throughput_vs_best_twin"] = _ratio(sps, best and best.get("samples_per_s"))
        ratios["throughput_vs_ddp"] = _ratio(sps, ddp and ddp.get("samples_per_s"))
        for ref in REFERENCES:
            base = refs.get((r["workload"], ref))
            ratios[f"throughput_vs_{ref}"] = _ratio(sps, base and base["samples_per_s"])
        if not throughput:
            t = ratio_bounds(tts_bounds(r), _best_twin_tts(group))
            ratios["time_vs_best_twin"] = t
            ratios["speed_vs_best_twin"] = invert(t)
        r["ratios"] = ratios


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return num / den


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def fmt_bounds(b: Sequence[float] | None, spec: str = ".2f", suffix: str = "×") -> str:
    """``1.23×`` for exact bounds, ``≥ 1.23×`` / ``≤ 1.23×`` for one-sided ones, ``-`` for none."""
    if b is None:
        return "-"
    lo, hi = b
    if lo == hi:
        return f"{lo:{spec}}{suffix}"
    if hi == math.inf:
        return f"≥{lo:{spec}}{suffix}"
    if lo == 0.0:
        return f"≤{hi:{spec}}{suffix}"
    return f"{lo:{spec}}-{hi:{spec}}{suffix}"


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description="Tables of a saved shaped-link benchmark run")
    p.add_argument("results", help="results JSON written by shaped_bench.py")
    p.add_argument("--markdown", action="store_true", help="write the docs page (tables, targets, misses) to stdout")
    p.add_argument("--notes", default="", help="a markdown file appended to the page (the analysis of the misses)")
    args = p.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    import markdown_report

    if args.markdown:
        notes = None
        if args.notes:
            with open(args.notes) as f:
                notes = f.read()
        sys.stdout.write(markdown_report.render(results, notes, source=os.path.relpath(args.results)))
    else:
        sys.stdout.write(markdown_report.render_tables(results))
        sys.stdout.write("".join(markdown_report.target_text(t) + "\n" for t in results["targets"]))


if __name__ == "__main__":
    main()
