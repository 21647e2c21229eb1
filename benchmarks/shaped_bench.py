"""Shaped-link benchmark: does NetSense adapt? Every contender through ``lightning.Trainer``, same model, data, seed
and trace, across a kernel-shaped link.

As root, from the repository root (see ``benchmarks/README.md``)::

    python benchmarks/shaped_bench.py --quick    # the dynamic traces and the CNN at 100 Mbit/s -> results_quick.json
    python benchmarks/shaped_bench.py            # every trace and target                       -> results.json

It creates two network namespaces joined by a veth pair shaped with ``tc tbf`` on both ends
(:class:`lightning_netsense.netem.ShapedLink`), starts one long-lived rank in each (``bench_worker.py``), and runs
the jobs ``plan.py`` schedules: per workload the references, then on every target trace NetSensePolicy and its
static twins, repeated, then the baselines. Everything it creates is removed at the end, also on Ctrl-C, SIGTERM or
an error.

Output: a line per run, the tables and the PASS/MISS lines of the targets (``targets.py``), the JSON results and the
PNG plots in ``--out``, and the wall-clock duration of the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import plan
import report
import targets
from bench_driver import Driver, JobFailed
from names import CONTENDERS, REFERENCES, label
from traces import CONGESTION, DYNAMIC, TRACES

#: per-step fields kept for the sensing plot (NetSense on the dynamic trace, first repeat)
_STEP_KEYS = ("step", "train_s", "excluded_s", "mode", "bw_mbit", "bw_inf", "probe_s")


def _pilot(preset: dict[str, dict[str, Any]], args: argparse.Namespace, console: Any) -> dict[str, Any]:
    """torch's PowerSGD pilot for every workload whose plan includes it (measured here: it fails on digits' buckets
    and runs on the CNN's and gpt's, so one workload's outcome is not trusted for another)."""
    from contenders import run_pilot
    from rich.markup import escape

    pilot: dict[str, Any] = {}
    for wl, cfg in preset.items():
        if not cfg.get("baseline_traces") or not _wants(args, "torch_powersgd"):
            continue
        console.print(f"[bold]pilot[/]: torch PowerSGD on gloo, DDP default buckets, workload {wl} ...")
        pilot[wl] = run_pilot(wl, timeout=args.pilot_timeout, options=cfg["options"])
        console.print(f"  -> {'runs' if pilot[wl]['ok'] else 'cannot run: ' + escape(pilot[wl]['reason'])}")
    return pilot


def _wants(args: argparse.Namespace, contender: str) -> bool:
    return not args.contenders or contender in args.contenders


def run_all(args: argparse.Namespace, preset: dict[str, dict[str, Any]], console: Any,
            t_start: float | None = None) -> dict[str, Any]:
    """Run every job of ``preset`` on one shaped link; return the results (before :func:`slim`).

    A failed job is reported (``failures``) and the ranks are restarted; if they cannot be restarted, the
    remaining jobs are skipped and reported as failed, and the results of the jobs run so far are kept.
    """
    t_start = time.time() if t_start is None else t_start
    from rich.markup import escape

    from lightning_netsense.netem import ShapedLink, available, cleanup_stale

    ok, why = available()
    if not ok:
        sys.exit(f"cannot shape a link here: {why}")
    removed = cleanup_stale()
    if removed:
        console.print(f"removed stale namespaces of an earlier run: {', '.join(removed)}")
    pilot = _pilot(preset, args, console)
    runs: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    failures: list[dict[str, Any]] = []
    control = tempfile.mkdtemp(prefix="shaped_bench_")
    state: dict[str, Any] = {"aborted": None}
    try:
        with ShapedLink(rate_mbit=None) as link:
            driver = Driver(link, control)
            driver.start()

            def execute(job: dict[str, Any]) -> dict[str, Any] | None:
                where = f"{job['workload']}/{job['trace'] or '-'}/{job['contender']}#{job['rep']}"
                if state["aborted"] is not None:
                    failures.append({"job": where, "error": "not run (the ranks could not be restarted)"})
                    return None
                job["torch_powersgd"] = bool(pilot.get(job["workload"], {}).get("ok", False))
                t0 = time.time()
                try:
                    out = driver.run(job, job["trace"])
                except JobFailed as err:
                    console.print(f"[red]{where} failed[/]: {escape(str(err)[-1500:])}")
                    failures.append({"job": where, "error": str(err)[-2000:]})
                    driver.kill()
                    try:
                        driver.start()
                    except JobFailed as again:
                        console.print(f"[red]the ranks could not be restarted; skipping the remaining jobs[/]: "
                                      f"{escape(str(again)[-800:])}")
                        state["aborted"] = str(again)[-2000:]
                    if job["contender"] == "torch_powersgd" and job["torch_powersgd"]:
                        # torch's hook passed the pilot yet failed here (seen on the CNN): the stand-in from now on
                        pilot[job["workload"]] = {"ok": False, "reason": "passed the pilot, failed mid-run: "
                                                  + str(err)[-300:]}
                        console.print("[yellow]  torch PowerSGD failed mid-run: our PowerSGD stands in[/]")
                        return execute(dict(job))
                    return None
                out["job_s"] = time.time() - t0
                summary = report.summarise_run(out)
                runs.append(summary)
                key = f"{job['workload']}/{job['trace'] if job['role'] == 'run' else job['role']}/{job['contender']}"
                raw[f"{key}/{job['rep']}"] = {"steps": out["ranks"][0]["steps"], "evals": out["ranks"][0]["evals"],
                                              "trace_log": out["trace_log"], "t_go": out["t_go"]}
                _print_run(console, summary, time.time() - t_start)
                return summary

            for wl, cfg in preset.items():
                plan.run_workload(wl, cfg, execute, contenders=args.contenders or None)
            if state["aborted"] is None:
                driver.stop()
            else:
                driver.kill()
    finally:
        shutil.rmtree(control, ignore_errors=True)
    _derive_reference_tts(runs, raw)
    report.compare(runs)
    evals = {k: v["evals"] for k, v in raw.items()}
    return {
        "schema": report.SCHEMA_VERSION,
        "preset": "quick" if args.quick else "full",
        "seconds": time.time() - t_start,
        "config": {"workloads": preset, "dynamic": {wl: DYNAMIC[wl] for wl in preset}, "congestion": CONGESTION,
                   "twin_factor": plan.TWIN_FACTOR, "baseline_factor": plan.BASELINE_FACTOR, "min_cap_s": plan.MIN_CAP_S,
                   "rerun_within": plan.RERUN_WITHIN, "world_size": 2, "torch_threads_per_rank": 1,
                   "warmup_steps_skipped_in_samples_per_s": report.WARMUP_STEPS},
        "pilot_torch_powersgd": pilot,
        "runs": runs,
        "targets": targets.evaluate_targets(runs, evals),
        "failures": failures,
        "series": raw,
    }


def _derive_reference_tts(runs: list[dict[str, Any]], raw: dict[str, Any]) -> None:
    """The references' time to target: their own models are never averaged, so their own evaluations are not the
    training compared. Plain DDP's maths do not depend on the link: a reference's time to target is its clock at
    the step where plain DDP's quality reference first met the target (``None`` when it never did)."""
    for r in runs:
        if r["contender"] not in REFERENCES or r["metric"] is None:
            continue
        ddp = next((x for x in runs if x["workload"] == r["workload"] and x.get("role") == "quality"), None)
        steps = raw.get(f"{r['workload']}/None/{r['contender']}/{r['rep']}", {}).get("steps", [])
        step = ddp and ddp.get("tts_step")
        r["tts_s"] = steps[step - 1]["train_s"] if step and len(steps) >= step else None
        r["tts_step"] = step if r["tts_s"] is not None else None
        r["final"] = None  # a model trained without averaging: not the training compared


def _print_run(console: Any, s: dict[str, Any], elapsed: float) -> None:
    what = s["metric"] or "steps"
    tts = report.fmt(s["tts_s"], ".1f", " s") if s["tts_s"] is not None else "-"
    final = "-" if s["final"] is None else (f"{100 * s['final']:.1f} %" if s["metric"] == "accuracy"
                                             else f"{s['final']:.3f}")
    console.print(
        f"  {s['workload']:6} {s['trace'] or '-':10} {label(s['contender'], s['standin']):30} #{s['rep']} "
        f"{s['steps']:4d} steps {s['train_s']:6.1f} s ({s['stop']}), "
        f"{report.fmt(s['samples_per_s'], '.0f')} samples/s, to {what} {tts}, final {final}  [{elapsed:.0f} s]"
    )


# ---------------------------------------------------------------------------------------------- output
def _round(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else (None if math.isnan(x) else str(x))
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


def slim(results: dict[str, Any]) -> dict[str, Any]:
    """The results to commit: per-step series only where a plot needs them, numbers to 4 significant digits.

    Kept: the evaluations of every first repeat, of every NetSense run and of plain DDP's quality reference (the
    quality plots and target); NetSense's per-step mode and estimate with the trace as applied on the dynamic trace,
    first repeat (the sensing plots). The input is not modified; infinite bounds become the string ``"inf"``.
    """
    out = dict(results)
    series: dict[str, Any] = {}
    walls: dict[str, Any] = {}
    for key, data in results["series"].items():
        _, trace, contender, rep = key.split("/")
        kept: dict[str, Any] = {}
        if rep == "0" or contender == "netsense":
            kept["evals"] = [{k: e[k] for k in ("step", "train_s", "value")} for e in data["evals"]]
        if contender == "netsense" and trace == "dynamic" and rep == "0":
            kept["steps"] = [{k: st.get(k) for k in _STEP_KEYS} for st in data["steps"]]
            # wall-clock times need more digits than the rest
            walls[key] = (round(data["t_go"], 3), [[round(w, 3), kind, v] for w, kind, v in data["trace_log"]],
                          [round(st["wall"], 3) for st in data["steps"]])
        if kept:
            series[key] = kept
    out["series"] = series
    out = _round(out)
    for key, (t_go, log, step_walls) in walls.items():
        v = out["series"][key]
        v["t_go"], v["trace_log"] = t_go, log
        for st, w in zip(v["steps"], step_walls):
            st["wall"] = w
    return out


def _on_sigterm(signum: int, frame: Any) -> None:
    # a SystemExit unwinds the driver: flows stopped, ranks stopped, namespaces and the control folder removed
    # (netem's own handler removes the namespaces first, then calls this one)
    raise SystemExit(128 + signum)


def _csv(value: str, allowed: Sequence[str], what: str, parser: argparse.ArgumentParser) -> list[str]:
    items = [v for v in value.split(",") if v]
    unknown = [v for v in items if v not in allowed]
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return items


def select(preset: dict[str, dict[str, Any]], workloads: Sequence[str], traces: Sequence[str],
           repeats: int, cap_s: float) -> dict[str, dict[str, Any]]:
    """``preset`` restricted to ``workloads`` and ``traces`` (target and baseline traces alike), with ``repeats``
    and a training-time cap ``cap_s`` on every run when given (0: the preset's)."""
    out = {wl: cfg for wl, cfg in preset.items() if not workloads or wl in workloads}
    for cfg in out.values():
        if traces:
            for key in ("target_traces", "once_traces", "baseline_traces"):
                cfg[key] = [t for t in cfg.get(key, []) if t in traces]
            missing = [t for t in traces if t not in cfg["target_traces"] + cfg["once_traces"]]
            cfg["target_traces"] += missing
        if repeats:
            cfg["repeats"] = repeats
        if cap_s:
            cfg["cap_s"] = cfg["cap_s_dynamic"] = cap_s
    return out


def main(argv: list[str] | None = None) -> None:
    t_start = time.time()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the dynamic traces (digits, gpt) and the CNN at 100 Mbit/s")
    p.add_argument("--out", default=os.path.join(_HERE, "results"), help="folder for the JSON and the plots")
    p.add_argument("--name", default="", help="base name of the JSON file and suffix of the plots (default: results, "
                                              "results_quick, or results_custom when a selection option is given)")
    p.add_argument("--workloads", default="", help="comma-separated subset of " + ",".join(plan.BENCH))
    p.add_argument("--traces", default="", help="comma-separated traces for every workload (" + ",".join(TRACES) + ")")
    p.add_argument("--contenders", default="", help="comma-separated subset of " + ",".join(CONTENDERS))
    p.add_argument("--repeats", type=int, default=0, help="repeats of the target traces (default: the preset's)")
    p.add_argument("--cap-s", type=float, default=0.0, help="cap on the training clock of every run")
    p.add_argument("--pilot-timeout", type=float, default=60.0)
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.repeats < 0 or args.cap_s < 0:
        p.error("--repeats and --cap-s must be positive")
    from rich.console import Console

    # a log file is not a terminal: do not squeeze the lines into 80 columns
    console = Console(width=None if sys.stdout.isatty() else 190)
    workloads = _csv(args.workloads, list(plan.BENCH), "workload", p)
    traces = _csv(args.traces, TRACES, "trace", p)
    args.contenders = _csv(args.contenders, CONTENDERS, "contender", p)
    preset = select(plan.preset("quick" if args.quick else "full"), workloads, traces, args.repeats, args.cap_s)
    custom = bool(workloads or traces or args.contenders or args.repeats or args.cap_s)
    name = args.name or ("results_custom" if custom else "results_quick" if args.quick else "results")
    signal.signal(signal.SIGTERM, _on_sigterm)
    results = run_all(args, preset, console, t_start)
    results["name"] = name
    results["seconds"] = time.time() - t_start
    os.makedirs(args.out, exist_ok=True)
    import markdown_report

    console.print(markdown_report.render_tables(results), markup=False, highlight=False)
    for t in results["targets"]:
        colour = {"PASS": "green", "MISS": "red"}.get(t["status"], "yellow")
        console.print(f"[{colour}]{t['status']:4}[/] {markdown_report.target_text(t)}", highlight=False)
    if not args.no_plots:
        import plots

        suffix = name[len("results"):] if name.startswith("results") else "_" + name
        for path in plots.make_all(results, args.out, suffix=suffix):
            console.print(f"plot: {os.path.relpath(path)}")
    path = os.path.join(args.out, name + ".json")
    results["seconds"] = time.time() - t_start
    with open(path, "w") as f:
        json.dump(slim(results), f, indent=1)
    console.print(f"results: {os.path.relpath(path)}")
    seconds = time.time() - t_start
    console.print(f"[bold]wall-clock duration of this run: {int(seconds // 60)} min {seconds % 60:.0f} s[/]")


if __name__ == "__main__":
    main()
