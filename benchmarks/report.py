"""Pure maths of the shaped-link benchmark: per-run figures, ratios, the targets.

Nothing here runs training or touches the link: :func:`summarise_run` turns one run's rank-0 result (what
``bench_worker.py`` wrote) into figures, :func:`compare` adds the ratios, :func:`evaluate_targets` the PASS/MISS
lines. ``tests/test_bench_smoke.py`` tests them with hand-made results.

Definitions (also in ``benchmarks/README.md``):

* **samples/s**: ``world * batch * (steps after the first `skip`) / training seconds of those steps``; the first
  steps are DDP's bucket rebuild and the hook's plain-allreduce warm-up.
* **time to accuracy (TTA)**: training seconds (wall time minus evaluation) at the first evaluation whose
  test accuracy is ``>= target``; ``None`` when the run never got there (within its step budget and time cap).
* **final accuracy**: mean of the last three evaluations (one evaluation of 360 test images moves by a point
  from one evaluation to the next).
* **speed-up over X** (TTA): ``TTA(X) / TTA(contender)``. When X never reached the target it is a lower bound
  ``training time(X) / TTA(contender)`` (printed with ``>=``): X's TTA is longer than its whole run.
* **best static compressor**: the one of ``fp16`` / ``powersgd`` / ``topk`` with the shortest TTA (the most
  samples/s for throughput). A static compressor that never reached the target counts with its whole training
  time, a lower bound of its TTA; when that decides the choice, the speed-up over the best static compressor is
  a lower bound too.
* **ideal TTA**: the ideal exchanges nothing, so its own model is not the one DDP trains. Averaging gradients
  does not depend on the link, so plain DDP's *maths* are the same on every trace: the ideal's TTA is its own
  training clock at the step at which plain DDP (any trace of this run) first reached the target; ``None``
  (and no TTA ratio to it) when plain DDP never got there. The synced ideal (DDP with the exchange skipped)
  gets its TTA the same way.
* **synced ideal**: the limit of synchronous data parallelism with free communication. Ratios to it
  (``throughput_vs_ideal_sync``) separate what communication and compression cost from what synchronising costs
  at all; its own ``throughput_vs_ideal`` says how much the latter is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "add_pairwise",
    "best_static",
    "compare",
    "evaluate_targets",
    "final_accuracy",
    "ideal_tta",
    "samples_per_second",
    "summarise_run",
    "time_to_accuracy",
    "tta_speedup",
]

SCHEMA_VERSION = 2
STATIC_COMPRESSORS = ("fp16", "powersgd", "topk")
#: the references, unshaped and without any exchange: the ideal (no DDP) and the synced ideal (DDP, exchange skipped)
REFERENCES = ("ideal", "ideal_sync")
#: steps left out of samples/s: step 1 (DDP rebuilds its buckets; the hook runs plain allreduce and calibrates
#: its codecs), step 2 (the hook's warm-up step) and step 3 (the first step the policy decided)
WARMUP_STEPS = 3


def samples_per_second(steps: Sequence[Mapping[str, Any]], samples_per_step: int,
                       skip: int = WARMUP_STEPS) -> float | None:
    """Global samples per second over the steps after the first ``skip`` (``None`` with too few steps).

    ``steps[i]["train_s"]`` is the cumulative training clock after step ``i + 1``.
    """
    if len(steps) <= skip or skip < 0:
        return None
    t0 = steps[skip - 1]["train_s"] if skip > 0 else 0.0
    dt = steps[-1]["train_s"] - t0
    n = len(steps) - skip
    return samples_per_step * n / dt if dt > 0 else None


def time_to_accuracy(evals: Sequence[Mapping[str, Any]], target: float) -> tuple[float | None, int | None]:
    """``(training seconds, step)`` at the first evaluation with accuracy ``>= target``, else ``(None, None)``."""
    for e in evals:
        if e["acc"] >= target:
            return e["train_s"], e["step"]
    return None, None


def final_accuracy(evals: Sequence[Mapping[str, Any]], last: int = 3, up_to_step: int | None = None) -> float | None:
    """Mean accuracy of the last ``last`` evaluations (at or before ``up_to_step``), skipping the step-0 one."""
    chosen = [e["acc"] for e in evals if e["step"] > 0 and (up_to_step is None or e["step"] <= up_to_step)]
    if not chosen:
        return None
    tail = chosen[-last:]
    return sum(tail) / len(tail)


def summarise_run(result: Mapping[str, Any], target: float | None, world_size: int = 2, skip: int = WARMUP_STEPS,
                  competing_bytes: float = 0.0) -> dict[str, Any]:
    """Figures of one run from its rank-0 result (see ``bench_worker.py``).

    ``result["bytes_total"]`` (both ranks' socket bytes, set by the driver) is preferred over rank 0's veth
    counter; ``competing_bytes`` is subtracted from whichever is used.
    """
    steps = result["steps"]
    evals = result.get("evals", [])
    job = result["job"]
    spp = world_size * result["batch_size"]
    total_steps = sum(result["mode_steps"].values()) or 1
    tta, tta_step = time_to_accuracy(evals, target) if (target is not None and evals) else (None, None)
    veth = steps[-1]["tx"] if steps else 0  # rank 0's veth only, unless the driver summed both ranks
    out = {
        "contender": job["contender"],
        "workload": job["workload"],
        "trace": job.get("trace"),
        "standin": bool(result.get("standin", False)),
        "steps": len(steps),
        "stop": result["stop"],
        "train_s": steps[-1]["train_s"] if steps else 0.0,
        "samples_per_s": samples_per_second(steps, spp, skip),
        "measured_steps": max(0, len(steps) - skip),
        "tta_s": tta,
        "tta_step": tta_step,
        "final_acc": final_accuracy(evals) if evals else None,
        "bytes_sent": max(0.0, float(result.get("bytes_total", veth)) - competing_bytes),
        "hook_bytes": result.get("hook_bytes"),
        "mode_share": {m: n / total_steps for m, n in sorted(result["mode_steps"].items())},
    }
    out["bytes_per_step"] = out["bytes_sent"] / len(steps) if steps else None
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return num / den


def tta_speedup(base: Mapping[str, Any] | None, run: Mapping[str, Any]) -> dict[str, Any] | None:
    """Speed-up of ``run`` over ``base`` in time to accuracy: ``{"value", "lower_bound"}`` or ``None``.

    ``lower_bound`` is ``True`` when ``base`` never reached the target: its whole training time stands in for
    its TTA, so the true speed-up is at least ``value``.
    """
    if base is None or run.get("tta_s") is None:
        return None
    if base.get("tta_s") is not None:
        return {"value": _ratio(base["tta_s"], run["tta_s"]), "lower_bound": False}
    if not base.get("train_s"):
        return None
    return {"value": _ratio(base["train_s"], run["tta_s"]), "lower_bound": True}


def best_static(statics: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The static compressor with the shortest TTA; one that never reached the target counts with its training time.

    A static compressor that did not reach the target has a TTA longer than its whole run, so
    ``min(TTA)`` over the static compressors is at least ``min(TTA if reached else training time)``; the run
    that attains this minimum is returned (without a TTA when it did not reach the target, which makes
    :func:`tta_speedup` report a lower bound). ``None`` when there is none.
    """
    ran = [s for s in statics if s.get("tta_s") is not None or s.get("train_s")]
    if not ran:
        return None
    # on a tie, prefer one that reached the target (an exact figure)
    return min(ran, key=lambda s: (s["tta_s"] if s.get("tta_s") is not None else s["train_s"], s.get("tta_s") is None))


def ideal_tta(ideal: Mapping[str, Any] | None, ddp_runs: Sequence[Mapping[str, Any]]) -> tuple[float | None, str]:
    """The ideal's TTA: its training clock at the step where plain DDP first reached the target.

    ``ideal`` is the ideal run's rank-0 result (with ``steps``); ``ddp_runs`` summaries of plain DDP runs.
    Returns ``(seconds or None, explanation)``.
    """
    if ideal is None:
        return None, "no ideal run"
    reached = [r["tta_step"] for r in ddp_runs if r.get("tta_step") is not None]
    if not reached:
        return None, "plain DDP did not reach the target on any trace"
    step = min(reached)
    if step == 0:
        return 0.0, "reached at step 0"
    if len(ideal["steps"]) < step:
        return None, f"the ideal ran {len(ideal['steps'])} steps, fewer than plain DDP's {step}"
    return ideal["steps"][step - 1]["train_s"], f"plain DDP reached the target at step {step}"


def compare(runs: list[dict[str, Any]], ideal_results: Mapping[str, Mapping[str, Any]],
            sync_results: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Add ``ratios`` to every summary in ``runs`` (in place): to plain DDP, the best static compressor, the ideal
    and the synced ideal.

    Runs are grouped by (workload, trace). For each group the best static compressor is the fastest of
    ``fp16``/``powersgd``/``topk`` to the target (TTA) or the one with most samples/s (throughput).
    ``ideal_results`` and ``sync_results`` hold, per workload, the references' rank-0 results (their ``steps``).
    """
    ideals = {r["workload"]: r for r in runs if r["contender"] == "ideal"}
    syncs = {r["workload"]: r for r in runs if r["contender"] == "ideal_sync"}
    for refs, results in ((ideals, ideal_results), (syncs, sync_results or {})):
        for wl, ref in refs.items():
            if ref.get("final_acc") is None and ref.get("tta_s") is None:
                continue  # a throughput workload: nothing was evaluated
            # its own model (no averaging) is not the training compared: never use its own evaluations
            ddp_runs = [r for r in runs if r["workload"] == wl and r["contender"] == "ddp"]
            ref["tta_s"], ref["tta_note"] = ideal_tta(results.get(wl), ddp_runs)
            reached = [r["tta_step"] for r in ddp_runs if r.get("tta_step") is not None]
            ref["tta_step"] = min(reached) if reached and ref["tta_s"] is not None else None
            ref["final_acc"] = None  # a model trained without averaging: not the training being compared
    for wl, sync in syncs.items():
        ideal = ideals.get(wl)
        sync["ratios"] = {"throughput_vs_ideal": _ratio(sync["samples_per_s"], ideal and ideal["samples_per_s"])}
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in runs:
        if r["contender"] not in REFERENCES:
            groups.setdefault((r["workload"], r["trace"]), {})[r["contender"]] = r
    for (wl, _), group in groups.items():
        ddp = group.get("ddp")
        ideal = ideals.get(wl)
        sync = syncs.get(wl)
        statics = [group[c] for c in STATIC_COMPRESSORS if c in group]
        best_tta = best_static(statics) if wl_has_tta(group) else None
        with_sps = [s for s in statics if s["samples_per_s"] is not None]
        best_sps = max(with_sps, key=lambda s: s["samples_per_s"]) if with_sps else None
        for r in group.values():
            r["ratios"] = {
                "throughput_vs_ddp": _ratio(r["samples_per_s"], ddp and ddp["samples_per_s"]),
                "throughput_vs_best_static": _ratio(r["samples_per_s"], best_sps and best_sps["samples_per_s"]),
                "throughput_vs_ideal": _ratio(r["samples_per_s"], ideal and ideal["samples_per_s"]),
                "throughput_vs_ideal_sync": _ratio(r["samples_per_s"], sync and sync["samples_per_s"]),
                "tta_speedup_vs_ddp": tta_speedup(ddp, r),
                "tta_speedup_vs_best_static": tta_speedup(best_tta, r),
                # the ideal's TTA is derived from plain DDP's: with none, there is no ratio (its whole run bounds
                # nothing, it trains a different model)
                "tta_speedup_vs_ideal": (
                    {"value": _ratio(ideal["tta_s"], r["tta_s"]), "lower_bound": False}
                    if ideal is not None and ideal.get("tta_s") is not None and r.get("tta_s") is not None else None
                ),
                "best_static_tta": best_tta and best_tta["contender"],
                "best_static_throughput": best_sps and best_sps["contender"],
            }


def wl_has_tta(group: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the runs of a (workload, trace) group measure time to accuracy (they were evaluated)."""
    return any(r.get("final_acc") is not None for r in group.values())


def _find(runs: Sequence[Mapping[str, Any]], workload: str, trace: str | None, contender: str):
    for r in runs:
        if r["workload"] == workload and r["contender"] == contender and (trace is None or r["trace"] == trace):
            return r
    return None


def add_pairwise(runs: list[dict[str, Any]]) -> None:
    """Add ``tta_speedup_vs_fp16`` and ``tta_speedup_vs_aimd`` to each run's ratios (same workload and trace)."""
    for r in runs:
        if "ratios" not in r or r["contender"] in REFERENCES:
            continue
        for other in ("fp16", "aimd"):
            base = _find(runs, r["workload"], r["trace"], other)
            r["ratios"][f"tta_speedup_vs_{other}"] = tta_speedup(base, r)


def evaluate_targets(runs: Sequence[Mapping[str, Any]], ddp_evals: Mapping[str, Sequence[Mapping[str, Any]]],
                     ns_evals: Sequence[Mapping[str, Any]] | None = None, tta_workload: str = "digits",
                     tput_workload: str = "cnn") -> list[dict[str, Any]]:
    """The issue's targets as ``{"name", "threshold", "value", "status", "note"}`` (status PASS, MISS or N/A).

    ``ddp_evals`` maps a trace to plain DDP's evaluations there (for the accuracy reference at the same step:
    the maths of plain DDP do not depend on the link, so any trace that got as far serves); ``ns_evals`` are
    NetSensePolicy's evaluations on the dynamic trace (to compare both at the same step).
    """
    out: list[dict[str, Any]] = []
    ns = _find(runs, tta_workload, "dynamic", "netsense")

    def tta_target(name: str, other: str, threshold: float, key: str) -> None:
        if ns is None:
            out.append({"name": name, "threshold": threshold, "value": None, "status": "N/A", "note": "not run"})
            return
        sp = ns.get("ratios", {}).get(key)
        if sp is None or sp["value"] is None:
            if ns["tta_s"] is None:
                out.append({"name": name, "threshold": threshold, "value": None, "status": "MISS",
                            "note": "NetSensePolicy did not reach the target"})
            else:
                out.append({"name": name, "threshold": threshold, "value": None, "status": "N/A",
                            "note": f"{other} not run"})
            return
        v, lb = sp["value"], sp["lower_bound"]
        if v >= threshold:
            status, note = "PASS", "lower bound: the baseline did not reach the target within its budget" if lb else ""
        elif lb:
            status, note = "MISS", "inconclusive: lower bound only (the baseline stopped before the target)"
        else:
            status, note = "MISS", ""
        out.append({"name": name, "threshold": threshold, "value": v, "lower_bound": lb, "status": status,
                    "note": note})

    tta_target("dynamic: TTA speed-up vs plain DDP", "plain DDP", 8.0, "tta_speedup_vs_ddp")
    tta_target("dynamic: TTA speed-up vs torch fp16 hook", "fp16", 2.5, "tta_speedup_vs_fp16")
    tta_target("dynamic: TTA speed-up vs best static compressor", "a static compressor", 1.5,
               "tta_speedup_vs_best_static")
    tta_target("dynamic: TTA speed-up vs AIMDPolicy", "AIMDPolicy", 1.3, "tta_speedup_vs_aimd")

    name = "dynamic: final accuracy within 0.5 points of plain DDP"
    if ns is None or ns["final_acc"] is None:
        out.append({"name": name, "threshold": -0.5, "value": None, "status": "N/A", "note": "not run"})
    else:
        # plain DDP's maths do not depend on the trace: take the run that got furthest, and compare both at the
        # last step both reached (plain DDP is often capped before NetSense's step budget on slow traces)
        runs_ev = [(max(e["step"] for e in ev), trace, ev) for trace, ev in ddp_evals.items() if ev]
        if not runs_ev:
            out.append({"name": name, "threshold": -0.5, "value": None, "status": "N/A", "note": "plain DDP not run"})
        else:
            last, where, ev = max(runs_ev, key=lambda x: (x[0], x[1] == "dynamic"))
            step = min(last, ns["steps"])
            mine_ev = ns_evals or []
            # the same evaluation steps on both sides (the last three both have, at or before `step`)
            common = sorted({e["step"] for e in mine_ev} & {e["step"] for e in ev})
            common = [c for c in common if 0 < c <= step][-3:]
            mine = _mean_at(mine_ev, common)
            ref = _mean_at(ev, common)
            if mine is None or ref is None:
                out.append({"name": name, "threshold": -0.5, "value": None, "status": "N/A",
                            "note": f"no common step with evaluations (plain DDP reached step {last})"})
            else:
                diff = 100.0 * (mine - ref)
                out.append({"name": name, "threshold": -0.5, "value": diff,
                            "status": "PASS" if diff >= -0.5 else "MISS",
                            "note": f"points vs plain DDP, mean of the evaluations at steps "
                                    f"{', '.join(map(str, common))} ({where} trace): "
                                    f"{100 * mine:.2f} vs {100 * ref:.2f}"})

    sync = _find(runs, tput_workload, None, "ideal_sync")
    for name, trace, key, threshold in (
        ("100 Mbit/s: throughput vs ideal", "100m", "throughput_vs_ideal", 0.85),
        ("1 Gbit/s: throughput vs plain DDP", "1g", "throughput_vs_ddp", 0.97),
    ):
        r = _find(runs, tput_workload, trace, "netsense")
        v = r and r.get("ratios", {}).get(key)
        full = f"{name} ({tput_workload})"
        if v is None:
            out.append({"name": full, "threshold": threshold, "value": None, "status": "N/A", "note": "not run"})
            continue
        note = ""
        vs_sync = r["ratios"].get("throughput_vs_ideal_sync")
        if key == "throughput_vs_ideal" and vs_sync is not None:
            # the part of the gap that synchronising costs any DDP contender, whatever it sends
            note = f"{vs_sync:.2f}x the synced ideal (DDP with the exchange skipped)"
            sync_vs_ideal = sync.get("ratios", {}).get("throughput_vs_ideal")
            if sync_vs_ideal is not None:
                note += f", which ran at {sync_vs_ideal:.2f}x the ideal"
        out.append({"name": full, "threshold": threshold, "value": v,
                    "status": "PASS" if v >= threshold else "MISS", "note": note})
    return out



def _mean_at(evals: Sequence[Mapping[str, Any]], steps: Sequence[int]) -> float | None:
    """Mean accuracy of the evaluations at ``steps`` (``None`` when there is none)."""
    accs = [e["acc"] for e in evals if e["step"] in set(steps)]
    return sum(accs) / len(accs) if accs and steps else None


def fmt_speedup(sp: Mapping[str, Any] | None) -> str:
    if sp is None or sp.get("value") is None:
        return "-"
    return ("≥" if sp["lower_bound"] else "") + f"{sp['value']:.2f}×"


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"
