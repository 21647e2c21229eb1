"""PNG plots of a shaped-link benchmark run (``results.json`` of ``shaped_bench.py``).

    python benchmarks/plots.py benchmarks/results/results.json     # re-draw the plots of a saved run

* ``sensing_<workload>.png``: NetSensePolicy on the workload's dynamic trace (first repeat) - the shaped rate
  (``tc tbf``) against the estimated bandwidth, the bandwidth probes, and the mode each step ran underneath, over
  the training clock.
* ``quality_<workload>.png``: test accuracy or validation loss against training time, one panel per trace, one line
  per contender (first repeat), the target dashed.
* ``throughput_<workload>.png``: samples/s per trace and contender (mean over repeats).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

from adaptation import train_at
from names import CONTENDERS, REFERENCES, label
from traces import TRACES

__all__ = ["make_all", "rate_steps"]

_MODES = ("none", "fp16", "bf16", "int8", "powersgd", "topk")  # MODE_CODES order: least to most compressing
_DPI = 80
_UNSHAPED_MBIT = 6000.0  # where an unshaped phase is drawn (the veth's own rate for gloo here)


def rate_steps(changes: list[tuple[float, float | None]], t_end: float) -> tuple[list[float], list[float]]:
    """Step-function points ``(seconds, Mbit/s)`` of ``(time, rate)`` changes (the first at 0), up to ``t_end``."""
    xs: list[float] = []
    ys: list[float] = []
    rate = None
    for t, value in changes:
        value = _UNSHAPED_MBIT if value is None else value
        if rate is not None:
            xs.append(t)
            ys.append(rate)
        xs.append(t)
        ys.append(value)
        rate = value
    if rate is not None:
        xs.append(max(t_end, xs[-1]))
        ys.append(rate)
    return xs, ys


def _sensing(plt: Any, results: dict[str, Any], workload: str, out: str, suffix: str = "") -> str | None:
    data = results["series"].get(f"{workload}/dynamic/netsense/0")
    if not data or not data.get("steps"):
        return None
    t_go, steps = data["t_go"], data["steps"]
    timed = [dict(s, wall_s=s["wall"] - t_go) for s in steps]
    t = [s["train_s"] for s in steps]
    # the rate changes on the training clock (evaluations paused it, not the link)
    changes = [(train_at(timed, max(0.0, w - t_go)), v) for w, kind, v in data["trace_log"] if kind == "rate"]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5), gridspec_kw={"height_ratios": [2, 1]})
    xs, ys = rate_steps(changes, t[-1])
    ax1.plot(xs, ys, color="black", lw=1.5, label="shaped rate (tc tbf, each direction)")
    bw = [s["bw_mbit"] if s.get("bw_mbit") is not None else float("nan") for s in steps]
    ax1.plot(t, bw, ".", ms=4, color="tab:blue", label="estimated bandwidth after the step")
    top = 2.0 * max([y for y in ys if y is not None] + [v for v in bw if v == v] + [1000.0])
    inf = [s["train_s"] for s in steps if s.get("bw_inf")]
    if inf:
        ax1.plot(inf, [top] * len(inf), "^", ms=4, color="tab:blue", alpha=0.5,
                 label="estimate infinite (the fit saw only latency)")
    probes = [(s["train_s"], s["bw_mbit"] if s.get("bw_mbit") else top) for s in steps if (s.get("probe_s") or 0) > 0]
    if probes:
        ax1.plot(*zip(*probes), "x", ms=6, color="tab:orange", label="a bandwidth probe ran at this boundary")
    ax1.set_yscale("log")
    ax1.set_ylabel("Mbit/s")
    ax1.legend(loc="lower left", fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    codes = [_MODES.index(str(s["mode"]).split("(")[0]) if str(s.get("mode")).split("(")[0] in _MODES else -1
             for s in steps]
    ax2.step(t, codes, where="post", color="tab:red")
    ax2.set_yticks(range(len(_MODES)), list(_MODES))
    ax2.set_ylabel("mode of the step")
    ax2.set_xlabel("training seconds (wall time minus evaluation)")
    ax2.set_xlim(0, max(t) * 1.02 if t and max(t) > 0 else 1.0)
    ax2.grid(True, alpha=0.3)
    fig.suptitle(f"NetSensePolicy on the dynamic trace ({workload})")
    return _save(plt, fig, os.path.join(out, f"sensing_{workload}{suffix}.png"))


def _quality(plt: Any, results: dict[str, Any], workload: str, out: str, suffix: str = "") -> str | None:
    runs = [r for r in results["runs"] if r["workload"] == workload and r["contender"] not in REFERENCES
            and r.get("role", "run") == "run" and r["rep"] == 0 and r["metric"] is not None]
    traces = [t for t in TRACES if any(r["trace"] == t for r in runs)]
    if not traces:
        return None
    metric = runs[0]["metric"]
    target = runs[0].get("target")
    fig, axes = plt.subplots(1, len(traces), figsize=(max(7.0, 3.4 * len(traces)), 3.8), sharey=True, squeeze=False)
    for ax, trace in zip(axes[0], traces):
        for c in CONTENDERS:
            run = next((r for r in runs if r["trace"] == trace and r["contender"] == c), None)
            evals = results["series"].get(f"{workload}/{trace}/{c}/0", {}).get("evals")
            if run is None or not evals:
                continue
            scale = 100.0 if metric == "accuracy" else 1.0
            ax.plot([e["train_s"] for e in evals], [scale * e["value"] for e in evals], lw=1.2,
                    ls="-" if c == "netsense" else "--" if c in ("ddp",) else "-", label=label(c, run.get("standin")))
        if target is not None:
            ax.axhline(target * (100.0 if metric == "accuracy" else 1.0), color="grey", ls=":", lw=0.8)
        ax.set_title(trace)
        ax.set_xlim(left=0)
        ax.set_xlabel("training seconds")
        if metric == "accuracy":
            ax.set_ylim(80, 100)
        else:  # from a byte-level model's first loss (ln 256 = 5.5 nats) down
            ax.set_ylim(2.4, 5.7)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("test accuracy %" if metric == "accuracy" else "validation loss, nats")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(f"{workload}: quality vs training time (first repeat; twins stop at the target)")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    return _save(plt, fig, os.path.join(out, f"quality_{workload}{suffix}.png"), tight=False)


def _throughput(plt: Any, results: dict[str, Any], workload: str, out: str, suffix: str = "") -> str | None:
    runs = [r for r in results["runs"] if r["workload"] == workload and r.get("samples_per_s")
            and r.get("role", "run") == "run"]
    traces = [t for t in TRACES if any(r["trace"] == t for r in runs)]
    if not traces:
        return None
    contenders = [c for c in CONTENDERS if c not in REFERENCES and any(r["contender"] == c for r in runs)]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(contenders))
    for i, c in enumerate(contenders):
        vals = []
        for t in traces:
            mine = [r["samples_per_s"] for r in runs if r["trace"] == t and r["contender"] == c]
            vals.append(sum(mine) / len(mine) if mine else 0.0)
        standin = any(r.get("standin") for r in runs if r["contender"] == c)
        ax.bar([k + (i - (len(contenders) - 1) / 2) * width for k in range(len(traces))], vals, width,
               label=label(c, standin))
    for ref, style in zip(REFERENCES, (":", "--")):
        mine = [r["samples_per_s"] for r in runs if r["contender"] == ref]
        if mine:
            ax.axhline(max(mine), color="black", ls=style, lw=1.2, label=label(ref))
    ax.set_xticks(range(len(traces)), traces)
    ax.set_ylabel("samples/s (both ranks)")
    ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(f"{workload}: throughput per trace (mean over repeats)")
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
        for draw in (_sensing, _quality, _throughput):
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
