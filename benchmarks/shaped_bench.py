"""Shaped-link benchmark: every contender, same model, data, seed and trace, across a kernel-shaped link.

As root, from the repository root (see ``benchmarks/README.md``)::

    python benchmarks/shaped_bench.py --quick    # the targets only -> results/results_quick.json
    python benchmarks/shaped_bench.py            # every trace and contender -> results/results.json

It creates two network namespaces joined by a veth pair shaped with ``tc tbf`` on both ends
(:class:`lightning_netsense.netem.ShapedLink`), starts one rank in each (``bench_worker.py``, kept alive for all
runs), and for every (workload, trace, contender) hands the ranks a job, puts the link into the trace's starting
state, lets them train, and applies the trace's schedule from there (``tc qdisc change`` on time, competing TCP
flows). Everything it creates is removed at the end, also on Ctrl-C, SIGTERM or an error.

Output: a table per workload on the terminal, PASS/MISS lines for the issue's targets, the JSON results and PNG
plots in ``--out``, and the wall-clock duration of the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import report
from contenders import CONTENDERS, LABELS, REFERENCES, run_pilot

#: rates of the static traces, Mbit/s
STATIC = {"1g": 1000.0, "100m": 100.0, "20m": 20.0}
TRACES = ("1g", "100m", "20m", "dynamic", "congestion")
#: the dynamic trace repeats this cycle of (Mbit/s, seconds): 40 s, congested 60 % of the time. It starts congested:
#: starting at 1 Gbit/s, plain DDP does ~80 digits steps in the first 8 s and every contender reaches 95 % before
#: the first change, so the trace would only measure the 1 Gbit/s trace again
DYNAMIC_CYCLE = ((20.0, 16.0), (100.0, 8.0), (20.0, 8.0), (1000.0, 8.0))
#: the congestion trace: this rate, and ``flows`` competing TCP connections per direction, on for ``on_s``
#: seconds every ``on_s + off_s`` seconds from ``first_s`` on
CONGESTION = {"rate": 100.0, "flows": 2, "first_s": 5.0, "on_s": 10.0, "off_s": 5.0}

#: steps of every CNN run: the warm-up steps left out of samples/s (report.WARMUP_STEPS) + 40 measured ones
CNN_STEPS = report.WARMUP_STEPS + 40

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # per workload: every contender of `contenders` on every trace of `traces`, plus the single (trace, contender)
    # jobs of `extra`; the ideal runs once per workload (unshaped). `steps`: step budget, `cap_s`: cap on the
    # training clock (`cap_s_dynamic` on the dynamic trace), `eval_every`: evaluation every this many steps (0:
    # never) and `eval_every_s`: also once this many training seconds passed since the last evaluation
    "full": {
        # the dynamic trace runs to its cap (a whole 40 s cycle and more): NetSense's 300 steps took 13 s there,
        # and the plot of its estimate and modes would have shown the first 20 Mbit/s phase only
        "digits": {"traces": list(TRACES), "contenders": list(CONTENDERS), "steps": 300, "cap_s": 45.0,
                   "cap_s_dynamic": 60.0, "steps_dynamic": 3000, "eval_every": 5, "eval_every_s": 1.0},
        # the throughput targets' two traces only: ~40 measured steps of a 44.7 MB model at 20 Mbit/s would take
        # 12 min per plain-DDP run
        "cnn": {"traces": ["1g", "100m"], "contenders": list(CONTENDERS), "steps": CNN_STEPS, "cap_s": 60.0,
                "eval_every": 0},
    },
    "quick": {
        # plain DDP at 1 Gbit/s: the accuracy reference at NetSense's step count and the ideal's TTA step (plain
        # DDP's maths do not depend on the link; on the dynamic trace it stops at a few dozen steps)
        "digits": {"traces": ["dynamic"], "contenders": list(CONTENDERS), "extra": [["1g", "ddp"]], "steps": 200,
                   "cap_s": 30.0, "cap_s_dynamic": 40.0, "eval_every": 5, "eval_every_s": 1.0},
        "cnn": {"traces": ["100m", "1g"], "contenders": ["ideal", "ideal_sync", "netsense"], "extra": [["1g", "ddp"]],
                "steps": CNN_STEPS, "cap_s": 60.0, "eval_every": 0},
    },
}


# ---------------------------------------------------------------------------------------------- traces
def trace_events(trace: str, horizon_s: float) -> list[tuple[float, str, float]]:
    """Schedule of ``trace`` up to ``horizon_s``: ``(seconds after start, "rate" | "flows", value)``, sorted.

    ``("rate", r)`` sets both ends to ``r`` Mbit/s; ``("flows", s)`` starts the competing flows for ``s`` seconds.
    The first event is at 0 and sets the starting rate.
    """
    if trace in STATIC:
        return [(0.0, "rate", STATIC[trace])]
    if trace == "dynamic":
        out, t, i = [], 0.0, 0
        while t < horizon_s:
            rate, seconds = DYNAMIC_CYCLE[i % len(DYNAMIC_CYCLE)]
            out.append((t, "rate", rate))
            t, i = t + seconds, i + 1
        return out
    if trace == "congestion":
        c = CONGESTION
        out = [(0.0, "rate", c["rate"])]
        t = c["first_s"]
        while t < horizon_s:
            out.append((t, "flows", c["on_s"]))
            t += c["on_s"] + c["off_s"]
        return out
    raise ValueError(f"Expected `trace` to be one of {TRACES}, but got {trace!r}")


def rate_at(events: Sequence[tuple[float, str, float]], t: float) -> float | None:
    """Shaped rate at ``t`` seconds after the start of a schedule from :func:`trace_events`."""
    rate = None
    for when, kind, value in events:
        if when > t:
            break
        if kind == "rate":
            rate = value
    return rate


# ---------------------------------------------------------------------------------------------- the driver
class JobFailed(RuntimeError):
    pass


class Driver:
    """Keeps one rank per namespace alive and runs jobs through files in a control folder."""

    def __init__(self, link: Any, control: str) -> None:
        self.link, self.control = link, control
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        self.port = 29511
        self.next_id = 0

    def start(self) -> None:
        # leftovers of a failed job (both ranks may have reported an error) must not fail the next wait
        for name in os.listdir(self.control):
            if name.startswith(("alive_", "error_")):
                os.remove(os.path.join(self.control, name))
        self.port += 1  # a fresh rendezvous port after a restart (the old one may linger in TIME_WAIT)
        for r in (0, 1):
            log = open(os.path.join(self.control, f"worker{r}.log"), "a")  # noqa: SIM115 - closed in stop()/kill()
            self.logs.append(log)
            cmd = [sys.executable, os.path.join(_HERE, "bench_worker.py"), "--rank", str(r),
                   "--master-addr", self.link.address(0), "--port", str(self.port), "--ifname", self.link.ifname(r),
                   "--control", self.control, "--first-job", str(self.next_id)]
            self.procs.append(self.link.popen(r, cmd, stdout=log, stderr=subprocess.STDOUT))
        self._wait([f"alive_{r}" for r in (0, 1)], 240.0, "ranks to start", errors="error_")

    def stop(self) -> None:
        open(os.path.join(self.control, "quit"), "w").close()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self._close_logs()
        os.remove(os.path.join(self.control, "quit"))

    def _close_logs(self) -> None:
        for log in self.logs:
            log.close()
        self.logs.clear()

    def log_tails(self, chars: int = 1500) -> str:
        out = []
        for r in (0, 1):
            try:
                with open(os.path.join(self.control, f"worker{r}.log")) as f:
                    lines = f.read().splitlines()
                text = "\n".join(ln for ln in lines if "Warning" not in ln and "ddp = DDP" not in ln)
                out.append(f"--- rank {r}:\n{text[-chars:]}")
            except OSError:
                pass
        return "\n".join(out)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs.clear()
        self._close_logs()

    def _wait(self, names: list[str], timeout: float, what: str, tick=None, errors: str = "error_") -> None:
        """Poll until every file in ``names`` exists; raise :class:`JobFailed` on an ``errors*`` file, a rank's exit
        or the timeout. ``tick`` runs between polls (the trace's schedule)."""
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(os.path.join(self.control, n)) for n in names):
            # only complete reports (written to .tmp and renamed) of this job
            found = sorted(n for n in os.listdir(self.control) if n.startswith(errors) and n.endswith(".json"))
            if found:
                with open(os.path.join(self.control, found[0])) as f:
                    msg = json.load(f)["error"]
                raise JobFailed(msg)
            if any(p.poll() is not None for p in self.procs):
                raise JobFailed(f"a rank exited (codes {[p.poll() for p in self.procs]}) while waiting for {what}\n"
                                + self.log_tails())
            if time.monotonic() > deadline:
                raise JobFailed(f"timed out after {timeout:.0f} s waiting for {what}\n" + self.log_tails())
            if tick is not None:
                tick()
            time.sleep(0.02)

    def run(self, job: dict[str, Any], trace: str | None) -> dict[str, Any]:
        """Run one job on both ranks; returns both ranks' results and the trace as applied."""
        jid = job["id"] = self.next_id
        self.next_id += 1
        link = self.link
        link.set_rate(None)  # set-up (DDP's initial broadcast) on the unshaped link
        path = os.path.join(self.control, f"job_{jid}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(job, f)
        os.replace(path + ".tmp", path)
        self._wait([f"ready_{jid}_{r}" for r in (0, 1)], 300.0, "set-up", errors=f"error_{jid}_")
        timeout = 2 * job["cap_s"] + 240.0
        pending = trace_events(trace, timeout) if trace else []
        applied: list[list[Any]] = []
        flows: list[Any] = []
        t_go = time.time()

        def tick() -> None:
            now = time.time() - t_go
            while pending and pending[0][0] <= now:
                _, kind, value = pending.pop(0)
                try:
                    if kind == "rate":
                        link.set_rate(value)
                    else:
                        for src in (0, 1):  # both directions: a 2-rank allreduce uses both
                            # a fresh port per burst: the last burst's receiver may still be closing
                            port = 5201 + len(flows) % 40
                            flows.append(link.competing_flows(CONGESTION["flows"], value, source=src, port=port))
                except Exception as err:  # a failed job (the ranks are restarted), not a failed benchmark
                    raise JobFailed(f"could not apply the trace ({kind} {value}): {err}") from err
                applied.append([time.time(), kind, value])

        try:
            tick()  # the starting state, before the ranks start
            t_go = time.time()
            applied.append([t_go, "go", 0])
            open(os.path.join(self.control, f"go_{jid}"), "w").close()
            self._wait([f"result_{jid}_{r}.json" for r in (0, 1)], timeout, f"job {jid}", tick=tick,
                       errors=f"error_{jid}_")
        finally:
            for fl in flows:
                fl.stop()
        results = []
        for r in (0, 1):
            with open(os.path.join(self.control, f"result_{jid}_{r}.json")) as f:
                results.append(json.load(f))
        return {"ranks": results, "trace_log": applied, "t_go": t_go}


def _job(workload: str, contender: str, trace: str | None, cfg: dict[str, Any], seed: int, torch_psgd: bool,
         target: float | None) -> dict[str, Any]:
    cap = cfg.get("cap_s_dynamic", cfg["cap_s"]) if trace == "dynamic" else cfg["cap_s"]
    steps = cfg.get("steps_dynamic", cfg["steps"]) if trace == "dynamic" else cfg["steps"]
    return {
        "workload": workload, "contender": contender, "trace": trace, "seed": seed, "steps": steps,
        "cap_s": cap, "eval_every": cfg["eval_every"] or 10**9, "eval_every_s": cfg.get("eval_every_s", 0.0),
        "torch_powersgd": torch_psgd, "target": target,
    }


def job_plan(cfg: dict[str, Any]) -> list[tuple[str, str | None]]:
    """``(contender, trace)`` of every job of a workload's preset: the references (the ideal, then the synced
    ideal; unshaped, trace ``None``), then trace by trace every other contender, then the ``extra`` jobs not
    already planned, then the references again in reverse order.

    The references run first and last, and the faster run counts (:func:`merge_ideal`): they are limits, and one
    run of the ideal on this shared 2-core machine moved between 121 and 209 samples/s for the CNN, below
    contenders that communicate. The better of two runs, one on each side of the others, is the stricter bound.
    """
    refs = [c for c in REFERENCES if c in cfg["contenders"]]
    plan: list[tuple[str, str | None]] = [(c, None) for c in refs]
    plan += [(c, tr) for tr in cfg["traces"] for c in cfg["contenders"] if c not in REFERENCES]
    for tr, c in cfg.get("extra", []):
        if (c, tr) not in plan:
            plan.append((c, tr))
    plan += [(c, None) for c in reversed(refs)]
    return plan


def merge_ideal(kept: dict[str, Any] | None, summary: dict[str, Any]) -> bool:
    """Fold a repeated run of a reference (the ideal, the synced ideal) into the one ``kept`` so far (in place);
    True if ``summary`` is faster and replaces it. Every run's samples/s is listed in ``repeats_samples_per_s``."""
    if kept is None:
        summary["repeats_samples_per_s"] = [summary["samples_per_s"]]
        return True
    seen = kept["repeats_samples_per_s"] + [summary["samples_per_s"]]
    faster = (summary["samples_per_s"] or 0.0) > (kept["samples_per_s"] or 0.0)
    if faster:
        kept.clear()
        kept.update(summary)
    kept["repeats_samples_per_s"] = seen
    return faster


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
    pilot: dict[str, Any] = {}
    psgd_workloads = [wl for wl, cfg in preset.items() if any(c == "powersgd" for c, _ in job_plan(cfg))]
    for wl in psgd_workloads:
        console.print(f"[bold]pilot[/]: torch PowerSGD on gloo, DDP default buckets, workload {wl} ...")
        pilot[wl] = run_pilot(wl, timeout=args.pilot_timeout)
        console.print(f"  -> {'runs' if pilot[wl]['ok'] else 'cannot run: ' + escape(pilot[wl]['reason'])}")
        if not args.quick or pilot[wl]["ok"]:
            continue
        # the quick run trusts one failed pilot for every workload (the cause is the hook, not the model)
        for other in psgd_workloads:
            pilot.setdefault(other, {**pilot[wl], "reason": pilot[wl]["reason"] + f" (pilot on {wl})"})
        break
    runs: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    control = tempfile.mkdtemp(prefix="shaped_bench_")
    failures: list[dict[str, Any]] = []
    try:
        with ShapedLink(rate_mbit=None) as link:
            driver = Driver(link, control)
            driver.start()
            aborted: str | None = None
            for wl, cfg in preset.items():
                psgd_ok = bool(pilot.get(wl, {}).get("ok", False))
                for contender, trace in job_plan(cfg):
                    if aborted is not None:
                        failures.append({"workload": wl, "trace": trace, "contender": contender,
                                         "error": "not run (the ranks could not be restarted): " + aborted[-300:]})
                        continue
                    out = None
                    while out is None and aborted is None:
                        job = _job(wl, contender, trace, cfg, args.seed, psgd_ok,
                                   args.target if wl == "digits" else None)
                        t0 = time.time()
                        try:
                            out = driver.run(job, trace)
                        except JobFailed as err:
                            console.print(f"[red]{wl}/{trace}/{contender} failed[/]: {escape(str(err)[-1500:])}")
                            failures.append({"workload": wl, "trace": trace, "contender": contender,
                                             "error": str(err)[-2000:]})
                            driver.kill()
                            try:
                                driver.start()
                            except JobFailed as again:
                                console.print(f"[red]the ranks could not be restarted; skipping the remaining jobs[/]"
                                              f": {escape(str(again)[-800:])}")
                                aborted = str(again)[-2000:]
                            if contender == "powersgd" and psgd_ok:
                                # torch's hook passed the pilot yet failed here (measured on the CNN: gloo's
                                # "Received data size doesn't match expected size" after the pilot's 12 steps):
                                # our PowerSGD stands in from now on, and this job runs again with it
                                psgd_ok = False
                                pilot[wl] = {**pilot.get(wl, {}), "ok": False,
                                             "reason": "passed the pilot, failed mid-run: " + str(err)[-300:]}
                                console.print("[yellow]  torch PowerSGD failed mid-run: our PowerSGD stands in[/]")
                                continue
                            break
                    if out is None:
                        continue
                    r0, r1 = out["ranks"]
                    r0["bytes_total"] = r0["socket_bytes"] + r1["socket_bytes"]
                    summary = report.summarise_run(r0, job["target"])
                    summary["trace"] = trace
                    summary["ranks_agree"] = [e["acc"] for e in r0["evals"]] == [e["acc"] for e in r1["evals"]]
                    series = {"steps": r0["steps"], "evals": r0["evals"], "trace_log": out["trace_log"],
                              "t_go": r0["t_go"]}
                    if contender in REFERENCES:
                        kept = next((r for r in runs if r["workload"] == wl and r["contender"] == contender), None)
                        if merge_ideal(kept, summary):
                            raw[f"{wl}/{trace}/{contender}"] = series
                        if kept is None:
                            runs.append(summary)
                    else:
                        runs.append(summary)
                        raw[f"{wl}/{trace}/{contender}"] = series
                    if contender not in REFERENCES and not summary["ranks_agree"]:
                        console.print("[yellow]  the two ranks evaluated different accuracies: their models differ[/]")
                    label = LABELS["powersgd_standin"] if summary["standin"] else LABELS[contender]
                    acc = summary["final_acc"]
                    # a reference's own model is never averaged: its TTA is derived from plain DDP's at the end
                    own = contender in REFERENCES and acc is not None
                    tta = "derived later" if own else report.fmt(summary["tta_s"], ".1f", " s")
                    console.print(
                        f"  {wl:6} {trace or '-':10} {label:28} {summary['steps']:4d} steps {summary['train_s']:6.1f} s"
                        f" ({summary['stop']}), {report.fmt(summary['samples_per_s'], '.0f')} samples/s, "
                        f"TTA {tta}, acc {report.fmt(acc and 100 * acc, '.1f')}  [{time.time() - t0:.0f} s]"
                    )
            if aborted is None:
                driver.stop()
            else:
                driver.kill()
    finally:
        shutil.rmtree(control, ignore_errors=True)
    ideal_results = {k.split("/")[0]: {"steps": v["steps"]} for k, v in raw.items() if k.endswith("/ideal")}
    sync_results = {k.split("/")[0]: {"steps": v["steps"]} for k, v in raw.items() if k.endswith("/ideal_sync")}
    report.compare(runs, ideal_results, sync_results)
    report.add_pairwise(runs)
    ddp_evals = {k.split("/")[1]: v["evals"] for k, v in raw.items() if k.startswith("digits/") and k.endswith("/ddp")}
    targets = report.evaluate_targets(runs, ddp_evals, raw.get("digits/dynamic/netsense", {}).get("evals"))
    return {
        "schema": report.SCHEMA_VERSION,
        "preset": "quick" if args.quick else "full",
        "seconds": time.time() - t_start,
        "config": {"presets": preset, "target_accuracy": args.target, "seed": args.seed,
                   "dynamic_cycle_mbit_s": DYNAMIC_CYCLE, "congestion": CONGESTION, "world_size": 2,
                   "torch_threads_per_rank": 1, "warmup_steps_skipped_in_samples_per_s": report.WARMUP_STEPS},
        "pilot_torch_powersgd": pilot,
        "runs": runs,
        "targets": targets,
        "failures": failures,
        "series": raw,
    }


# ---------------------------------------------------------------------------------------------- output
_STEP_KEYS = ("step", "train_s", "wall", "mode", "bw_mbit", "comm_s", "backward_s")


def _round(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


def slim(results: dict[str, Any], all_steps: bool = False) -> dict[str, Any]:
    """The results to commit: per-step series only where a plot needs them, numbers to 4 significant digits.

    Kept: every run's evaluations; per-step mode and estimate of NetSensePolicy with the trace as applied (every
    contender with ``all_steps``; AIMDPolicy's too made the file 1.3 MB once the dynamic trace ran to its cap);
    the references' clock per step (their TTA; the ideal's accuracy line). The input is not modified.
    """
    out = dict(results)
    series = {}
    walls: dict[str, Any] = {}
    for key, data in results["series"].items():
        contender = key.split("/")[2]
        kept: dict[str, Any] = {"evals": [{k: e[k] for k in ("step", "train_s", "acc")} for e in data["evals"]]}
        if contender == "netsense" or (all_steps and contender not in REFERENCES):
            kept["steps"] = [{k: st.get(k) for k in _STEP_KEYS if k != "wall"} for st in data["steps"]]
            # wall-clock times need more digits than the rest
            walls[key] = (round(data["t_go"], 3), [[round(w, 3), kind, v] for w, kind, v in data["trace_log"]],
                          [round(st["wall"], 3) for st in data["steps"]])
        elif contender in REFERENCES:
            kept["steps"] = [{"step": st["step"], "train_s": st["train_s"]} for st in data["steps"]]
        series[key] = kept
    out["series"] = series
    out = _round(out)
    for key, (t_go, log, step_walls) in walls.items():
        v = out["series"][key]
        v["t_go"], v["trace_log"] = t_go, log
        for st, w in zip(v["steps"], step_walls):
            st["wall"] = w
    return out


def print_tables(results: dict[str, Any], console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    runs = results["runs"]
    for wl in sorted({r["workload"] for r in runs}):
        table = Table(title=f"{wl}: {'time to accuracy' if wl == 'digits' else 'throughput'} across a shaped link")
        cols = ["trace", "contender", "steps", "samples/s", "vs DDP", "vs ideal", "vs synced"]
        if wl == "digits":
            cols += ["TTA s", "TTA vs DDP", "vs best static", "final acc %"]
        cols += ["MB sent", "modes"]
        for c in cols:
            table.add_column(c, justify="left" if c in ("trace", "contender", "modes") else "right")
        order = {c: i for i, c in enumerate(CONTENDERS)}
        trace_order = {t: i for i, t in enumerate(TRACES)}
        for r in sorted((r for r in runs if r["workload"] == wl),
                        key=lambda r: (trace_order.get(r["trace"], -1), order[r["contender"]])):
            ratios = r.get("ratios", {})
            label = LABELS["powersgd_standin"] if r["standin"] else LABELS[r["contender"]]
            row = [r["trace"] or "unshaped", label, f"{r['steps']}{'*' if r['stop'] == 'cap' else ''}",
                   report.fmt(r["samples_per_s"], ".0f"), report.fmt(ratios.get("throughput_vs_ddp"), ".2f", "×"),
                   report.fmt(ratios.get("throughput_vs_ideal"), ".2f", "×"),
                   report.fmt(ratios.get("throughput_vs_ideal_sync"), ".2f", "×")]
            if wl == "digits":
                acc = r["final_acc"]
                reached = r["tta_s"] is not None or r["contender"] in REFERENCES
                tta = report.fmt(r["tta_s"], ".1f") if reached else "not reached"
                row += [tta, report.fmt_speedup(ratios.get("tta_speedup_vs_ddp")),
                        report.fmt_speedup(ratios.get("tta_speedup_vs_best_static")),
                        report.fmt(acc and 100 * acc, ".1f")]
            share = ", ".join(f"{m} {100 * v:.0f}%" for m, v in sorted(r["mode_share"].items(), key=lambda kv: -kv[1]))
            row += [report.fmt(r["bytes_sent"] / 1e6, ".1f") if r["contender"] != "ideal" else "0", share]
            table.add_row(*row)
        console.print(table)
    console.print("* stopped by the time cap before the step budget. TTA: training seconds to the target accuracy; "
                  "≥: a lower bound (the baseline never reached the target). The ideals' TTA: their clock at plain "
                  "DDP's step to the target.")
    for wl, p in results.get("pilot_torch_powersgd", {}).items():
        if not p.get("ok"):
            console.print(f"[yellow]torch PowerSGD cannot run on gloo with several buckets ({wl}: "
                          f"{escape(p['reason'][:170])}) - this project's 'powersgd' codec (rank 4) stands in.[/]")
    for f in results.get("failures", []):
        console.print(f"[red]FAILED[/] {f['workload']}/{f['trace']}/{f['contender']}: {escape(f['error'][-300:])}")
    for t in results["targets"]:
        colour = {"PASS": "green", "MISS": "red"}.get(t["status"], "yellow")
        value = "-" if t["value"] is None else (("≥" if t.get("lower_bound") else "") + f"{t['value']:.2f}")
        console.print(f"[{colour}]{t['status']:4}[/] {t['name']}: {value} (target {t['threshold']:g})"
                      + (f"  - {escape(t['note'])}" if t["note"] else ""))


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


def main(argv: list[str] | None = None) -> None:
    t_start = time.time()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the targets only: digits on the dynamic trace (+ plain DDP at 1 Gbit/s as the accuracy "
                        "reference), CNN at 100 Mbit/s and 1 Gbit/s")
    p.add_argument("--out", default=os.path.join(_HERE, "results"), help="folder for the JSON and the plots")
    p.add_argument("--name", default="",
                   help="base name of the JSON file and suffix of the plots (default: results for the full run, "
                        "results_quick for --quick, results_custom when a selection or override option is given)")
    p.add_argument("--workloads", default="", help="comma-separated subset of digits,cnn")
    p.add_argument("--traces", default="", help="comma-separated traces for every workload, replacing the preset's "
                                                "(" + ",".join(TRACES) + "); drops the preset's extra jobs")
    p.add_argument("--contenders", default="", help="comma-separated subset of " + ",".join(CONTENDERS)
                                                    + "; drops the preset's extra jobs")
    p.add_argument("--steps", type=int, default=0, help="override the step budget of every workload")
    p.add_argument("--cap-s", type=float, default=0.0, help="override the training-time cap of every run")
    p.add_argument("--target", type=float, default=0.95, help="test accuracy for time to accuracy (digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pilot-timeout", type=float, default=60.0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--all-steps", action="store_true", help="keep every run's per-step series in the JSON (diagnosis)")
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        p.error(f"--target is a test accuracy in (0, 1], got {args.target}")
    if args.steps < 0 or args.cap_s < 0:
        p.error("--steps and --cap-s must be positive")
    from rich.console import Console

    # a log file is not a terminal: do not squeeze the tables into 80 columns
    console = Console(width=None if sys.stdout.isatty() else 190)
    preset = json.loads(json.dumps(PRESETS["quick" if args.quick else "full"]))
    if args.workloads:
        preset = {w: preset[w] for w in _csv(args.workloads, list(preset), "workload", p)}
    traces = _csv(args.traces, TRACES, "trace", p)
    contenders = _csv(args.contenders, CONTENDERS, "contender", p)
    for cfg in preset.values():
        if traces or contenders:
            cfg.pop("extra", None)
        if traces:
            cfg["traces"] = traces
        if contenders:
            cfg["contenders"] = [c for c in CONTENDERS if c in contenders]
        if args.steps:
            cfg["steps"] = args.steps
            cfg.pop("steps_dynamic", None)
        if args.cap_s:
            cfg["cap_s"] = cfg["cap_s_dynamic"] = args.cap_s
    custom = bool(args.workloads or traces or contenders or args.steps or args.cap_s)
    name = args.name or ("results_custom" if custom else "results_quick" if args.quick else "results")
    signal.signal(signal.SIGTERM, _on_sigterm)
    results = run_all(args, preset, console, t_start)
    results["name"] = name
    os.makedirs(args.out, exist_ok=True)
    print_tables(results, console)
    if not args.no_plots:
        import plots

        suffix = name[len("results"):] if name.startswith("results") else "_" + name
        for path in plots.make_all(results, args.out, suffix=suffix):
            console.print(f"plot: {os.path.relpath(path)}")
    path = os.path.join(args.out, name + ".json")
    results["seconds"] = time.time() - t_start
    with open(path, "w") as f:
        json.dump(slim(results, args.all_steps), f, indent=1)
    console.print(f"results: {os.path.relpath(path)}")
    seconds = time.time() - t_start
    console.print(f"[bold]wall-clock duration of this run: {int(seconds // 60)} min {seconds % 60:.0f} s[/]")


if __name__ == "__main__":
    main()
