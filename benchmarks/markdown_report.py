"""Markdown tables of a shaped-link benchmark run: what the driver prints and what ``docs/benchmarks.md`` holds.

    python benchmarks/report.py --markdown benchmarks/results/results.json [--notes NOTES.md] > docs/benchmarks.md

:func:`render` is the whole page: the targets, a table per workload (time to target or samples/s per trace and
contender, every repeat), NetSense's runs in detail, the sensing measures, and what missed with the figures that
explain it (``--notes`` appends a hand-written analysis). :func:`render_tables` is the part the driver prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from names import CONTENDERS, REFERENCES, label
from traces import TRACES

__all__ = ["render", "render_tables", "target_text"]

_DESCRIPTION = {
    "digits": "MLP on scikit-learn's digits, Adam; time to test accuracy",
    "gpt": "byte-level GPT on Python's standard library, AdamW; time to validation loss",
    "cnn": "ResNet-18 (half width) on synthetic images, SGD; samples/s (dynamic trace: time to its step budget)",
}


def _num(x: Any) -> float:
    """A number from the JSON (where infinite bounds are the string ``"inf"``)."""
    return math.inf if x == "inf" else float(x)


def _runs(results: Mapping[str, Any], wl: str, trace: str | None, contender: str) -> list[Mapping[str, Any]]:
    return sorted((r for r in results["runs"] if r["workload"] == wl and r["trace"] == trace
                   and r["contender"] == contender and r.get("role", "run") == "run"), key=lambda r: r["rep"])


def _tts_cell(run: Mapping[str, Any]) -> str:
    if run.get("tts_s") is not None:
        return f"{run['tts_s']:.1f}"
    return f"≥{run['train_s']:.1f}" if run.get("train_s") else "-"


def _quality(value: float | None, metric: str | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f} %" if metric == "accuracy" else f"{value:.3f}"


def _modes(share: Mapping[str, float]) -> str:
    return ", ".join(f"{m} {100 * v:.0f}%" for m, v in sorted(share.items(), key=lambda kv: -kv[1]) if v >= 0.005)


def _bounds(b: Sequence | None, spec: str = ".2f") -> str:
    if b is None:
        return "-"
    lo, hi = _num(b[0]), _num(b[1])
    if lo == 0.0 and hi == math.inf:
        return "undecided"  # neither run reached the target: no bound either way
    if lo == hi:
        return f"{lo:{spec}}"
    if hi == math.inf:
        return f"≥{lo:{spec}}"
    if lo == 0.0:
        return f"≤{hi:{spec}}"
    return f"{lo:{spec}}..{hi:{spec}}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _matrix(results: Mapping[str, Any], wl: str) -> str:
    """Traces x contenders: time to target per repeat (``≥``: stopped before it), samples/s for throughput."""
    runs = [r for r in results["runs"] if r["workload"] == wl and r.get("role", "run") == "run"
            and r["contender"] not in REFERENCES]
    traces = [t for t in TRACES if any(r["trace"] == t for r in runs)]
    contenders = [c for c in CONTENDERS if any(r["contender"] == c for r in runs)]
    rows = []
    for t in traces:
        throughput = any(r["trace"] == t and r["metric"] is None for r in runs) and t != "dynamic"
        row = [t + (" (samples/s)" if throughput else "")]
        for c in contenders:
            mine = _runs(results, wl, t, c)
            if throughput:
                row.append(" / ".join(f"{r['samples_per_s']:.0f}" if r.get("samples_per_s") else "-" for r in mine)
                           or "")
            else:
                row.append(" / ".join(_tts_cell(r) for r in mine) or "")
        rows.append(row)
    standins = {r["contender"] for r in runs if r.get("standin")}
    head = ["trace"] + [label(c, c in standins) for c in contenders]
    return _table(head, rows)


def _netsense(results: Mapping[str, Any], wl: str) -> str:
    rows = []
    for t in TRACES:
        for r in _runs(results, wl, t, "netsense"):
            ratios = r.get("ratios", {})
            best = ratios.get("best_twin")
            twins = {x["rep"]: x for x in _runs(results, wl, t, best)} if best else {}
            twin = twins.get(r["rep"], twins.get(0))
            probes = r.get("probes") or {}
            if twin is None:
                best_cell = best or "-"
            elif r["metric"] is None and t != "dynamic":
                best_cell = f"{best} ({twin['samples_per_s']:.0f}/s)" if twin.get("samples_per_s") else best
            else:
                best_cell = f"{best} ({_tts_cell(twin)} s)"
            timed = r["metric"] is not None or t == "dynamic"
            rows.append([
                t, str(r["rep"]), _tts_cell(r) if timed else "-", best_cell,
                _bounds(ratios.get("time_vs_best_twin")),
                f"{r['samples_per_s']:.0f}" if r.get("samples_per_s") else "-",
                _quality(r.get("final"), r["metric"]) + (f" @{r['final_step']}" if r.get("final_step") else ""),
                f"{r['bytes_sent'] / 1e6:.1f}", _modes(r.get("mode_share", {})),
                f"{100 * probes['time_share']:.1f} / {100 * probes['byte_share']:.1f}" if probes else "-",
                str(r.get("changes_before_target", "")) if t == "dynamic" else "",
            ])
    head = ["trace", "rep", "time to target s", "best twin (its time)", "NetSense / best twin", "samples/s",
            "final quality", "MB sent", "modes", "probes: time % / bytes %", "changes before target"]
    return _table(head, rows)


def _references(results: Mapping[str, Any], wl: str) -> str:
    parts = []
    for c in REFERENCES:
        mine = sorted((r for r in results["runs"] if r["workload"] == wl and r["contender"] == c), key=lambda r: r["rep"])
        if mine:
            sps = ", ".join(f"{r['samples_per_s']:.0f}" for r in mine if r.get("samples_per_s"))
            tts = mine[0].get("tts_s")
            parts.append(f"{label(c)}: {sps} samples/s" + (f", time to target {tts:.1f} s (its clock at plain DDP's "
                                                               f"step {mine[0]['tts_step']})" if tts is not None else ""))
    ref = next((r for r in results["runs"] if r["workload"] == wl and r.get("role") == "quality"), None)
    if ref is not None:
        parts.append(f"plain DDP's quality reference (unshaped, {ref['steps']} steps): target at step "
                     f"{ref.get('tts_step')}, final {_quality(ref.get('final'), ref['metric'])}")
    return "; ".join(parts) + ".\n" if parts else ""


def target_text(t: Mapping[str, Any]) -> str:
    """One target as a line: name, value (mean over repeats) and spread - or each repeat's bounds where a run
    stopped before its end (``≥``) or was compared with one that did (``≤``) -, threshold, note."""
    unit = {"x": "x", "s": " s", "steps": " steps"}.get(t.get("unit", ""), "")
    share = t.get("unit") == "share"

    def show(x: float) -> str:
        return f"{100 * x:.2f} %" if share else f"{x:.3g}{unit}"

    sense = "<=" if t["sense"] == "max" else ">="
    reps = [b for b in t.get("repeats", []) if b]
    if t["value"] is None and not reps:
        value = "-"
    elif t.get("one_sided"):
        value = "repeats " + ", ".join(_bounds(b, ".3g") + ("" if share or _bounds(b) == "undecided" else unit)
                                       for b in reps)
    else:
        value = show(_num(t["value"]))
        if t.get("spread") and len(reps) > 1:
            lo, hi = (_num(x) for x in t["spread"])
            value += f" ({show(lo)} - {show(hi)})"
    note = f"  - {t['note']}" if t.get("note") else ""
    return f"{t['name']}: {value} (target {sense} {show(t['threshold'])}){note}"


def render_tables(results: Mapping[str, Any]) -> str:
    """The per-workload tables (what the driver prints before the target lines)."""
    out = []
    order = ("digits", "gpt", "cnn")
    for wl in sorted({r["workload"] for r in results["runs"]}, key=lambda w: order.index(w) if w in order else 9):
        out.append(f"\n### {wl}: {_DESCRIPTION.get(wl, '')}\n")
        out.append("Time to target, training seconds, per repeat (`≥`: stopped before the target; twins are capped "
                   "at a multiple of NetSense's time, see the definitions):\n\n" + _matrix(results, wl))
        if any(r["workload"] == wl and r["contender"] == "netsense" for r in results["runs"]):
            out.append("\nNetSensePolicy per run:\n\n" + _netsense(results, wl))
        refs = _references(results, wl)
        if refs:
            out.append("\n" + refs)
    for wl, p in results.get("pilot_torch_powersgd", {}).items():
        if not p.get("ok"):
            out.append(f"\ntorch PowerSGD cannot run on gloo with several buckets ({wl}: {p['reason'][:170]}): "
                       f"{label('torch_powersgd', True)} stands in; it is no candidate for the best static.\n")
    for f in results.get("failures", []):
        out.append(f"\nFAILED {f['job']}: {f['error'][-300:]}\n")
    return "".join(out)


def _misses(results: Mapping[str, Any]) -> str:
    """The facts behind every MISS: which twin won, what NetSense ran, what the sensing saw."""
    lines = []
    for t in results["targets"]:
        if t["status"] != "MISS":
            continue
        facts = [target_text(t)]
        trace = t["name"].split(" ")[0].rstrip(":")
        if trace in TRACES:
            for r in _runs(results, t["workload"], trace, "netsense"):
                facts.append(f"repeat {r['rep']}: NetSense ran {_modes(r.get('mode_share', {}))}; best twin "
                             f"{r.get('ratios', {}).get('best_twin')}")
        lines.append("- " + "\n  - ".join(facts))
    return "\n".join(lines) + "\n" if lines else "Nothing missed.\n"


def render(results: Mapping[str, Any], notes: str | None = None, source: str | None = None) -> str:
    """The docs page: targets, tables, sensing, misses (``source``: the JSON's path, for the regeneration line)."""
    secs = _num(results.get("seconds", 0.0))
    source = source or f"benchmarks/results/{results.get('name', 'results')}.json"
    out = [
        "# Shaped-link benchmark: does NetSense adapt?\n\n",
        f"Generated by `python benchmarks/report.py --markdown {source}` from a `{results.get('preset')}` run of "
        f"`benchmarks/shaped_bench.py` ({int(secs // 60)} min {secs % 60:.0f} s on this 2-core machine; "
        "gloo, one rank per network namespace, `tc tbf` on a veth pair). Definitions and options: "
        "`benchmarks/README.md`.\n\n",
        "## Targets\n\nEach from every repeat: PASS only when every repeat meets it.\n\n",
        _table(["status", "target"], [[t["status"], target_text(t).replace("|", "/")] for t in results["targets"]]),
        "\n## Results per workload\n",
        render_tables(results),
        "\n## What missed, with the figures behind it\n\n",
        _misses(results),
    ]
    if notes:
        out.append("\n" + notes.strip() + "\n")
    return "".join(out)
