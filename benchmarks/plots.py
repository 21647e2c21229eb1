"""PNG plots of a shaped-link benchmark run (``results.json`` of ``shaped_bench.py``).

    python benchmarks/plots.py benchmarks/results/results.json     # re-draw the plots of a saved run

* ``bandwidth_mode_<workload>.png``: NetSensePolicy on the dynamic trace - the shaped rate (``tc tbf``) against
  the estimated bandwidth, and the mode chosen for each step, over wall time (one per workload that ran it).
* ``accuracy_<workload>.png``: test accuracy against training time, one panel per trace, one line per contender
  (the ideal's line is plain DDP's accuracy on the ideal's clock: see ``report.py``).
* ``throughput_<workload>.png``: samples/s per trace and contender.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

from contenders import CONTENDERS, LABELS, REFERENCES

__all__ = ["make_all", "rate_steps"]

_MODES = ("none", "fp16", "bf16", "int8", "powersgd", "topk")  # MODE_CODES order: least to most compressing
_TRACE_ORDER = ("1g", "100m", "20m", "dynamic", "congestion")
_DPI = 80


def rate_steps(trace_log: list[list[Any]], t_go: float, t_end: float) -> tuple[list[float], list[float]]:
    """Step-function points ``(seconds since go, Mbit/s)`` of the rates applied in ``trace_log``.

    ``trace_log`` rows are ``[wall time, kind, value]``; the starting rate, applied just before ``go``, counts
    from 0.
    """
    xs: list[float] = []
    ys: list[float] = []
    rate = None
    for wall, kind, value in trace_log:
        if kind != "rate":
            continue
        t = max(0.0, wall - t_go)
        if rate is not None:
            xs.append(t)
            ys.append(rate)
        xs.append(t)
        ys.append(value)
        rate = value
    if rate is not None:
        xs.append(max(t_end - t_go, xs[-1] if xs else 0.0))
        ys.append(rate)
    return xs, ys


def _label(run: dict[str, Any]) -> str:
    return LABELS["powersgd_standin"] if run.get("standin") else LABELS[run["contender"]]


def _bandwidth_mode(plt: Any, results: dict[str, Any], workload: str, out: str, suffix: str = "") -> str | None:
    data = results["series"].get(f"{workload}/dynamic/netsense")
    if not data or not data.get("steps"):
        return None
    t_go = data["t_go"]
    steps = data["steps"]
    t = [s["wall"] - t_go for s in steps]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5), gridspec_kw={"height_ratios": [2, 1]})
    xs, ys = rate_steps(data["trace_log"], t_go, steps[-1]["wall"])
    ax1.plot(xs, ys, color="black", lw=1.5, label="shaped rate (tc tbf, each direction)")
    bw = [s["bw_mbit"] if s.get("bw_mbit") is not None else float("nan") for s in steps]
    ax1.plot(t, bw, ".", ms=4, color="tab:blue", label="estimated bandwidth (NetSenseState; gaps: infinite)")
    ax1.set_yscale("log")
    ax1.set_ylabel("Mbit/s")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    codes = [_MODES.index(str(s["mode"]).split("(")[0]) if str(s["mode"]).split("(")[0] in _MODES else -1
             for s in steps]
    ax2.step(t, codes, where="post", color="tab:red")
    ax2.set_yticks(range(len(_MODES)), list(_MODES))
    ax2.set_ylabel("mode used")
    ax2.set_xlabel("seconds since the start of training (wall time)")
    ax2.set_xlim(0, max(t) * 1.02 if t and max(t) > 0 else 1.0)
    ax2.grid(True, alpha=0.3)
    fig.suptitle(f"NetSensePolicy on the dynamic trace ({workload})")
    return _save(plt, fig, os.path.join(out, f"bandwidth_mode_{workload}{suffix}.png"))


def _accuracy(plt: Any, results: dict[str, Any], workload: str, out: str, suffix: str = "") -> str | None:
    runs = [r for r in results["runs"] if r["workload"] == workload and r["contender"] not in REFERENCES]
    traces = [t for t in _TRACE_ORDER if any(r["trace"] == t for r in runs)]
    if not traces or not any(results["series"].get(f"{workload}/{t}/{r['contender']}", {}).get("evals")
                             for t in traces for r in runs):
        return None
    ideal = results["series"].get(f"{workload}/None/ideal")
    target = results["config"].get("target_accuracy")
    fig, axes = plt.subplots(1, len(traces), figsize=(max(7.0, 3.6 * len(traces)), 3.8), sharey=True, squeeze=False)
    for ax, trace in zip(axes[0], traces):
        for c in CONTENDERS:
            run = next((r for r in runs if r["trace"] == trace and r["contender"] == c), None)
            evals = results["series"].get(f"{workload}/{trace}/{c}", {}).get("evals")
            if run is None or not evals:
                continue
            ax.plot([e["train_s"] for e in evals], [100 * e["acc"] for e in evals], lw=1.2, label=_label(run))
        ddp = results["series"].get(f"{workload}/{trace}/ddp", {}).get("evals")
        if ideal and ideal.get("steps") and ddp:
            clock = {s["step"]: s["train_s"] for s in ideal["steps"]}
            pts = [(clock[e["step"]], e["acc"]) for e in ddp if e["step"] in clock]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "k:", lw=1.2,
                    label="ideal (plain DDP's accuracy on the no-comm clock)")
        if target:
            ax.axhline(100 * target, color="grey", ls="--", lw=0.8)
        ax.set_title(trace)
        ax.set_xlim(left=0)
        ax.set_xlabel("training seconds")
        ax.set_ylim(60, 100)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("test accuracy %")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"{workload}: test accuracy vs training time (wall time minus evaluation) per contender")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    return _save(plt, fig, os.path.join(out, f"accuracy_{workload}{suffix}.png"), tight=False)


def _throughput(plt: Any, results: dict[str, Any], workload: str, out: str, suffix: str = "") -> str | None:
    runs = [r for r in results["runs"] if r["workload"] == workload and r["samples_per_s"]]
    traces = [t for t in _TRACE_ORDER if any(r["trace"] == t for r in runs)]
    if not traces:
        return None
    contenders = [c for c in CONTENDERS if c not in REFERENCES and any(r["contender"] == c for r in runs)]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(contenders))
    for i, c in enumerate(contenders):
        vals = [next((r["samples_per_s"] for r in runs if r["trace"] == t and r["contender"] == c), 0.0) or 0.0
                for t in traces]
        label = next((_label(r) for r in runs if r["contender"] == c), c)
        ax.bar([k + (i - (len(contenders) - 1) / 2) * width for k in range(len(traces))], vals, width, label=label)
    for ref, style in zip(REFERENCES, (":", "--")):
        run = next((r for r in runs if r["contender"] == ref), None)
        if run:
            ax.axhline(run["samples_per_s"], color="black", ls=style, lw=1.2, label=LABELS[ref])
    ax.set_xticks(range(len(traces)), traces)
    ax.set_ylabel("samples/s (both ranks)")
    ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(f"{workload}: throughput per trace")
    return _save(plt, fig, os.path.join(out, f"throughput_{workload}{suffix}.png"))


def _save(plt: Any, fig: Any, path: str, tight: bool = True) -> str:
    """Write ``fig`` to ``path`` (PNG) and close it."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def make_all(results: dict[str, Any], out: str, suffix: str = "") -> list[str]:
    """Draw every plot the results allow into ``out``; return the paths (``suffix`` goes before ``.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    paths = []
    for wl in sorted({r["workload"] for r in results["runs"]}):
        for draw in (_bandwidth_mode, _accuracy, _throughput):
            # drawn under the final name: a quick or custom run never touches the full run's plots
            path = draw(plt, results, wl, out, suffix)
            if path is not None:
                paths.append(path)
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/plots.py RESULTS.json")
    with open(sys.argv[1]) as f:
        res = json.load(f)
    name = res.get("name") or ("results_quick" if res.get("preset") == "quick" else "results")
    suffix = name[len("results"):] if name.startswith("results") else "_" + name
    for p in make_all(res, os.path.dirname(os.path.abspath(sys.argv[1])), suffix):
        print(p)
