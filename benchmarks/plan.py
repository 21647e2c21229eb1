"""What the shaped-link benchmark runs: the presets, and the schedule that turns one into jobs as results come in.

Per workload (:data:`BENCH`: model options, quality metric and target, budgets) and preset (:data:`PRESETS`):

* the references (``ideal``, ``ideal_sync``, unshaped) run first and, with ``ref_repeats=2``, last again; the
  faster run counts;
* on each *target trace*, ``repeats`` times: NetSensePolicy first (on a static trace to ``quality_steps`` or the
  cap: its final quality is compared with plain DDP's; on the dynamic trace to the target), then the static twins,
  each stopped at the target and capped at :data:`TWIN_FACTOR` times NetSense's time to target in the same repeat
  (a twin slower than that cannot decide a target whose threshold is below the factor, and its time is then
  reported as a bound). The repeats after the first rerun only the twins that came within :data:`RERUN_WITHIN` of
  the best twin in the first (the others keep their first, censored, time);
* on each *once trace* (congestion), NetSense alone, once;
* on each *baseline trace*, once: plain DDP, torch's hooks and AIMDPolicy, stopped at the target and capped at
  :data:`BASELINE_FACTOR` times NetSense's first time to target;
* the quality reference (``quality_ref``, default on): plain DDP on the unshaped link to ``quality_steps`` (its
  maths do not depend on the link).

For a throughput workload (no evaluation) every run trains a fixed number of steps (``steps``) under the cap; on
the dynamic trace its "target" is ``target_steps`` steps, the time to finish them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from names import REFERENCES, TWINS

__all__ = ["BASELINES", "BENCH", "PRESETS", "WARMUP_STEPS", "job_spec", "run_workload"]

#: steps left out of samples/s: step 1 (DDP rebuilds its buckets after it; NetSense's first step), step 2 (the
#: first step a policy decided, after its codecs were timed) and step 3
WARMUP_STEPS = 3
BASELINES: tuple[str, ...] = ("ddp", "torch_fp16", "torch_powersgd", "aimd")

#: per workload: `options` of workloads.make_workload, `metric` ("accuracy", "loss" or None for throughput),
#: `target`, `quality_steps` (NetSense's and the reference's step budget: final quality is compared there),
#: evaluation every `eval_every` steps or `eval_every_s` training seconds, `cap_s` on the training clock;
#: throughput workloads: `steps` per run and `target_steps` on the dynamic trace
BENCH: dict[str, dict[str, Any]] = {
    # 97 %: plain DDP gets there at step 80 (95 %, the old target, at step 30: inside the first phase of any trace)
    "digits": {"options": {}, "metric": "accuracy", "target": 0.97, "quality_steps": 120, "eval_every": 5,
               "eval_every_s": 0.5, "cap_s": 30.0, "twin_order": ("powersgd", "bf16", "fp16", "int8", "topk")},
    # width 96, 2 layers: 0.25 M parameters, 1.0 MB of gradients (0.4 s per plain allreduce at 20 Mbit/s, against a
    # 105 ms step here); plain DDP reaches 3.5 nats at step ~50 (3.0 at step 85), still falling fast there, so the
    # time to target is not decided by noise. 2 validation batches (64 windows, 4096 predicted bytes, the same for
    # every contender): 0.1 s per evaluation (4 batches took 0.19 s, a fifth of a twin's run)
    "gpt": {"options": {"width": 96, "layers": 2, "heads": 4, "val_batches": 2}, "metric": "loss", "target": 3.5,
            "quality_steps": 90, "eval_every": 5, "eval_every_s": 1.0, "cap_s": 30.0,
            "twin_order": ("int8", "bf16", "fp16", "powersgd", "topk")},
    # a ResNet-18 of half the width: 2.8 M parameters, 11.2 MB of gradients (0.9 s per plain allreduce at
    # 100 Mbit/s against a 50-90 ms step); random labels, throughput only
    "cnn": {"options": {"width": 32}, "metric": None, "steps": WARMUP_STEPS + 15, "target_steps": 40,
            "cap_s": 6.0, "cap_s_dynamic": 20.0},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        # the baselines (plain DDP, torch's hooks, AIMD) once, on the dynamic trace: they are in no target, and each
        # costs up to 1.5x NetSense's time; the congestion trace runs NetSense alone
        "digits": {"target_traces": ["20m", "100m", "1g", "unshaped", "dynamic"], "once_traces": ["congestion"],
                   "baseline_traces": ["dynamic"], "repeats": 2, "ref_repeats": 1},
        "gpt": {"target_traces": ["20m", "100m", "1g", "unshaped", "dynamic"], "once_traces": [],
                "baseline_traces": ["dynamic"], "repeats": 2, "ref_repeats": 1},
        "cnn": {"target_traces": ["20m", "100m", "1g", "unshaped", "dynamic"], "once_traces": [],
                "baseline_traces": ["100m", "1g"], "repeats": 2, "ref_repeats": 2},
    },
    "quick": {
        # the dynamic traces (the adaptation targets and the sensing measures) and the CNN at 100 Mbit/s; no quality
        # reference (no final-quality target here)
        "digits": {"target_traces": ["dynamic"], "once_traces": [], "baseline_traces": [], "repeats": 2,
                   "ref_repeats": 0, "quality_ref": False},
        "gpt": {"target_traces": ["dynamic"], "once_traces": [], "baseline_traces": [], "repeats": 2,
                "ref_repeats": 0, "quality_ref": False},
        "cnn": {"target_traces": ["100m"], "once_traces": [], "baseline_traces": [], "repeats": 2,
                "ref_repeats": 2, "twins": False},
    },
}
#: twins are capped at this many times NetSense's time to target of the same repeat: above 1 / 0.77 on the dynamic
#: trace (its target), above 1 / 0.95 on the static ones, with a margin
TWIN_FACTOR = {"dynamic": 1.4, "static": 1.15}
BASELINE_FACTOR = 1.5
#: floor of every derived cap, training seconds (a very fast NetSense run must not starve the twins)
MIN_CAP_S = 3.0
#: a repeat after the first reruns the twins within this factor of the first repeat's best twin
RERUN_WITHIN = 1.1
#: step budget of a run stopped at the target, in quality steps (its cap decides)
STEPS_TO_TARGET = 20


def preset(name: str) -> dict[str, dict[str, Any]]:
    """A deep copy of preset ``name`` with every workload's :data:`BENCH` settings merged in."""
    out = {}
    for wl, cfg in PRESETS[name].items():
        out[wl] = {**copy.deepcopy(BENCH[wl]), **copy.deepcopy(cfg)}
    return out


def job_spec(workload: str, contender: str, trace: str | None, cfg: dict[str, Any], rep: int = 0,
             cap_s: float | None = None, stop_at_target: bool = False, role: str = "run") -> dict[str, Any]:
    """The job of one run (what ``bench_worker.py`` reads), before the driver numbers it.

    ``role``: ``"run"``, or ``"quality"`` for plain DDP's quality reference (unshaped, to ``quality_steps``).
    """
    dynamic = trace == "dynamic"
    if cfg["metric"] is None:  # throughput: a fixed number of steps; on the dynamic trace, the time to finish them
        budget = cfg["target_steps"] if dynamic else cfg["steps"]
        cap = cfg.get("cap_s_dynamic", cfg["cap_s"]) if dynamic else cfg["cap_s"]
    else:
        # a run that stops at the target is bounded by its cap alone: a step budget would stop a slow-converging
        # codec (PowerSGD needs ~1.5x plain DDP's steps to 97 % on digits) short of it, unseen
        budget = cfg["quality_steps"] * (STEPS_TO_TARGET if stop_at_target else 1)
        cap = cfg["cap_s"]
    return {
        "workload": workload, "workload_options": cfg["options"], "contender": contender, "trace": trace,
        "rep": rep, "role": role, "seed": cfg.get("seed", 0), "steps": budget,
        "cap_s": min(cap, cap_s) if cap_s else cap,
        "eval_every": cfg.get("eval_every") or 10**9, "eval_every_s": cfg.get("eval_every_s", 0.0),
        "metric": cfg["metric"], "target": cfg.get("target"),
        "target_steps": cfg["target_steps"] if cfg["metric"] is None and dynamic else None,
        "stop_at_target": stop_at_target, "torch_powersgd": cfg.get("torch_powersgd", False),
    }


def _derived_cap(ns: dict[str, Any] | None, factor: float, cfg_cap: float) -> float:
    """``factor`` times NetSense's time to target, within bounds; NetSense's whole training time when it did not
    get there (a contender that does not reach the target within it either leaves the comparison undecided)."""
    if ns is None:
        return cfg_cap
    if ns.get("tts_s") is not None:
        return min(cfg_cap, max(MIN_CAP_S, factor * ns["tts_s"]))
    return min(cfg_cap, max(MIN_CAP_S, ns.get("train_s") or cfg_cap))


def _rerun(first: list[dict[str, Any]], throughput: bool) -> set[str]:
    """The twins of the first repeat worth repeating: within :data:`RERUN_WITHIN` of the best one."""
    if throughput:
        sps = {s["contender"]: s.get("samples_per_s") or 0.0 for s in first}
        best = max(sps.values(), default=0.0)
        return {c for c, v in sps.items() if v > 0 and v * RERUN_WITHIN >= best}
    reached = {s["contender"]: s["tts_s"] for s in first if s.get("tts_s") is not None}
    if not reached:
        return set()
    best = min(reached.values())
    return {c for c, t in reached.items() if t <= RERUN_WITHIN * best}


def _ordered(twins: list[str], cfg: dict[str, Any], first: list[dict[str, Any]]) -> list[str]:
    """The twins in the order to run them: the first repeat's fastest first, else the workload's ``twin_order``
    (the likely best first, so that the caps derived from it spare the rest)."""
    if first:
        tts = {s["contender"]: s.get("tts_s") if s.get("tts_s") is not None else float("inf") for s in first}
        return sorted(twins, key=lambda t: (tts.get(t, float("inf")), twins.index(t)))
    order = list(cfg.get("twin_order", ()))
    return sorted(twins, key=lambda t: order.index(t) if t in order else len(order) + twins.index(t))


def run_workload(workload: str, cfg: dict[str, Any], execute: Callable[[dict[str, Any]], dict[str, Any] | None],
                 contenders: Iterable[str] | None = None) -> None:
    """Run every job of ``workload``'s preset ``cfg`` through ``execute`` (job spec -> run summary, or ``None``
    when the job failed), choosing caps and reruns from the results as they come in.

    ``contenders`` restricts the contenders (``None``: all). The summaries are the caller's to keep.
    """
    allowed = set(contenders) if contenders is not None else None

    def want(c: str) -> bool:
        return allowed is None or c in allowed

    throughput = cfg["metric"] is None
    refs = [c for c in REFERENCES if want(c)] if cfg.get("ref_repeats", 1) else []
    for c in refs:
        execute(job_spec(workload, c, None, cfg, rep=0))
    twins = [t for t in TWINS if want(t)] if cfg.get("twins", True) else []
    traces = [(t, cfg.get("repeats", 1)) for t in cfg["target_traces"]] + [(t, 1) for t in cfg.get("once_traces", [])]
    for trace, repeats in traces:
        kind = "dynamic" if trace == "dynamic" else "static"
        first_ns: dict[str, Any] | None = None
        first_twins: list[dict[str, Any]] = []
        once = trace in cfg.get("once_traces", [])
        for rep in range(repeats):
            # on the dynamic trace NetSense stops at the target too (no final-quality target there; its run up to
            # the target crosses enough changes for the sensing measures); on a static trace it trains on to the
            # quality steps, where its final quality is compared with plain DDP's
            ns = execute(job_spec(workload, "netsense", trace, cfg, rep=rep, stop_at_target=kind == "dynamic"
                                  and not throughput)) if want("netsense") else None
            first_ns = first_ns or ns
            cap = _derived_cap(ns, TWIN_FACTOR[kind], job_spec(workload, "netsense", trace, cfg)["cap_s"])
            again = set(twins) if rep == 0 else _rerun(first_twins, throughput and trace != "dynamic")
            timed = not throughput or trace == "dynamic"
            best: float | None = None
            for twin in _ordered(twins if not once else [], cfg, first_twins if rep else []):
                if twin not in again:
                    continue
                # a twin that has not got there by RERUN_WITHIN times the best twin so far cannot be the best one
                mine = cap if best is None else min(cap, max(MIN_CAP_S, RERUN_WITHIN * best))
                out = execute(job_spec(workload, twin, trace, cfg, rep=rep, cap_s=mine if timed else None,
                                       stop_at_target=not throughput))
                if out is not None and timed and out.get("tts_s") is not None:
                    best = out["tts_s"] if best is None else min(best, out["tts_s"])
                if rep == 0 and out is not None:
                    first_twins.append(out)
        if trace in cfg.get("baseline_traces", []):
            cap = _derived_cap(first_ns, BASELINE_FACTOR, job_spec(workload, "ddp", trace, cfg)["cap_s"])
            for b in BASELINES:
                if want(b):
                    timed = not throughput or trace == "dynamic"
                    execute(job_spec(workload, b, trace, cfg, cap_s=cap if timed else None,
                                     stop_at_target=not throughput))
    if not throughput and want("ddp") and cfg.get("quality_ref", True):
        # the quality reference: plain DDP's maths do not depend on the link, so the fastest link serves
        execute(job_spec(workload, "ddp", "unshaped", cfg, role="quality"))
    if cfg.get("ref_repeats", 1) >= 2:
        for c in reversed(refs):
            execute(job_spec(workload, c, None, cfg, rep=1))
