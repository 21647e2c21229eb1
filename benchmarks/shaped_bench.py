"""Shaped-link benchmark: every contender, same model, data, seed and trace, on a kernel-shaped link.

As root: two network namespaces joined by a veth pair, ``tc tbf`` on both ends, one rank in each
(``benchmarks/bench_worker.py``), everything removed afterwards, also on Ctrl-C.

    python benchmarks/shaped_bench.py --quick        # digits on the dynamic and 100 Mbit/s traces (< 10 min)
    python benchmarks/shaped_bench.py                # all traces, digits + ResNet-18-sized CNN (see README)

Prints a rich table, writes ``--out``/results.json and PNG plots, and PASS/MISS lines for the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

from contenders import CONTENDERS, LABELS, STATIC_COMPRESSORS  # noqa: E402

#: rate schedules: (seconds since the start of training, Mbit/s); None = unshaped
TRACES: dict[str, list[tuple[float, float | None]]] = {
    "unshaped": [(0.0, None)],
    "1g": [(0.0, 1000.0)],
    "100m": [(0.0, 100.0)],
    "20m": [(0.0, 20.0)],
    # steps between the three rates: fast, congested, medium, congested, fast, ... (period 40 s)
    "dynamic": [(t0 + dt, r) for t0 in range(0, 400, 40) for dt, r in ((0, 1000.0), (8, 20.0), (24, 100.0), (32, 20.0))],
    # 100 Mbit/s shared with competing TCP flows from the 5th second on
    "congestion": [(0.0, 100.0)],
}
_CONGESTION_FLOWS = 4


def _apply_trace(link: Any, trace: str, t_go: float, stop: threading.Event, flows_seconds: float) -> None:
    flows = None
    for at, rate in TRACES[trace]:
        if stop.wait(max(0.0, t_go + at - time.time())):
            break
        link.set_rate(rate)
        if trace == "congestion" and flows is None:
            if stop.wait(5.0):
                break
            flows = link.competing_flows(flows=_CONGESTION_FLOWS, seconds=flows_seconds, source=1, port=5301)
    stop.wait()
    if flows is not None:
        flows.stop()


def _wait_files(paths: list[str], timeout: float, error_glob: str, control: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(os.path.exists(p) for p in paths):
            return
        errors = [f for f in os.listdir(control) if f.startswith(error_glob)]
        if errors:
            with open(os.path.join(control, errors[0])) as f:
                raise RuntimeError(f"a rank failed:\n{json.load(f)['error']}")
        time.sleep(0.05)
    raise TimeoutError(f"ranks did not produce {paths} within {timeout:.0f} s")


def run_jobs(jobs: list[dict[str, Any]], log: Any) -> list[dict[str, Any]]:
    """Run every job on one shaped link with two long-lived ranks; return rank 0's result of each."""
    from lightning_netsense.netem import ShapedLink

    control = tempfile.mkdtemp(prefix="netsense_bench_")
    results = []
    python = sys.executable
    with ShapedLink(rate_mbit=None) as link:
        procs = [
            link.popen(side, [python, os.path.join(_HERE, "bench_worker.py"), "--rank", str(side),
                              "--master-addr", link.address(0), "--ifname", link.ifname(side),
                              "--control", control, "--port", "29517"],
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
            for side in (0, 1)
        ]
        try:
            for i, job in enumerate(jobs):
                job = {**job, "id": i}
                path = os.path.join(control, f"job_{i}.json")
                with open(path + ".tmp", "w") as f:
                    json.dump(job, f)
                os.replace(path + ".tmp", path)
                link.set_rate(None)  # model set-up (DDP's broadcast) runs unshaped
                _wait_files([os.path.join(control, f"ready_{i}_{r}") for r in (0, 1)], 300, f"error_{i}_", control)
                stop = threading.Event()
                t_go = time.time()
                first = TRACES[job["trace"]][0][1]
                link.set_rate(first)
                shaper = threading.Thread(target=_apply_trace, args=(link, job["trace"], t_go, stop, job["cap_s"] + 30))
                shaper.start()
                open(os.path.join(control, f"go_{i}"), "w").close()
                try:
                    _wait_files([os.path.join(control, f"result_{i}_{r}.json") for r in (0, 1)],
                                job["cap_s"] * 3 + 600, f"error_{i}_", control)
                finally:
                    stop.set()
                    shaper.join()
                with open(os.path.join(control, f"result_{i}_0.json")) as f:
                    res = json.load(f)
                res["t_go_driver"] = t_go
                results.append(res)
                log(job, res)
        finally:
            open(os.path.join(control, "quit"), "w").close()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except Exception:  # noqa: BLE001
                    p.kill()
            shutil.rmtree(control, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------------------------- metrics
def summarise(res: dict[str, Any], target: float) -> dict[str, Any]:
    steps, evals = res["steps"], res["evals"]
    train_s = steps[-1]["train_s"] if steps else 0.0
    samples = len(steps) * res["batch_size"] * 2
    tta = next((e["train_s"] for e in evals if e["acc"] >= target), None)
    modes: dict[str, int] = {}
    for s in steps:
        m = str(s.get("mode", "none")).split("(")[0]
        modes[m] = modes.get(m, 0) + 1
    return {
        "contender": res["job"]["contender"],
        "label": LABELS["powersgd_standin"] if res.get("standin") else LABELS[res["job"]["contender"]],
        "steps": len(steps),
        "train_s": train_s,
        "samples_per_s": samples / train_s if train_s > 0 else 0.0,
        "time_to_target_s": tta,
        "final_acc": evals[-1]["acc"] if evals else None,
        "bytes_sent": steps[-1]["tx"] if steps else 0,
        "mode_share": {m: n / len(steps) for m, n in sorted(modes.items())} if steps else {},
        "stop": res["stop"],
        "curve": [(e["train_s"], e["acc"]) for e in evals],
        "trace_points": [(s["wall"] - res["t_go_driver"], s.get("bw_mbit"), s.get("mode")) for s in steps],
    }


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Ratios of each contender to plain DDP, the best static compressor and the ideal (throughput and TTA)."""
    def ratio(a: float | None, b: float | None, inverse: bool = False) -> float | None:
        if not a or not b:
            return None
        return b / a if inverse else a / b

    static = [rows[c] for c in STATIC_COMPRESSORS if c in rows]
    best_tput = max(static, key=lambda r: r["samples_per_s"], default=None)
    reached = [r for r in static if r["time_to_target_s"] is not None]
    best_tta = min(reached, key=lambda r: r["time_to_target_s"], default=None)
    for r in rows.values():
        r["ratios"] = {}
        for name, ref in (("ddp", rows.get("ddp")), ("best_static", best_tput), ("ideal", rows.get("ideal"))):
            if ref is not None:
                r["ratios"][f"throughput_vs_{name}"] = ratio(r["samples_per_s"], ref["samples_per_s"])
        for name, ref in (("ddp", rows.get("ddp")), ("fp16", rows.get("fp16")), ("best_static", best_tta),
                          ("aimd", rows.get("aimd"))):
            if ref is not None:
                # time-to-accuracy speed-up: reference time / own time (None when either did not reach it)
                r["ratios"][f"tta_speedup_vs_{name}"] = ratio(r["time_to_target_s"], ref["time_to_target_s"], True)


def _fmt(x: float | None, spec: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def print_tables(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for key, rows in report["results"].items():
        table = Table(title=f"{key}")
        for col in ("contender", "steps", "samples/s", "time to target s", "final acc", "MB sent", "modes",
                    "tput/DDP", "tput/ideal", "TTA x DDP"):
            table.add_column(col, justify="left" if col in ("contender", "modes") else "right")
        for r in rows.values():
            table.add_row(
                r["label"], str(r["steps"]), _fmt(r["samples_per_s"]),
                _fmt(r["time_to_target_s"], ".1f", "not reached" if r["final_acc"] is not None else "-"),
                _fmt(None if r["final_acc"] is None else 100 * r["final_acc"], ".1f"),
                _fmt(r["bytes_sent"] / 1e6, ".1f"),
                " ".join(f"{m}:{100 * s:.0f}%" for m, s in r["mode_share"].items()),
                _fmt(r["ratios"].get("throughput_vs_ddp"), ".2f"), _fmt(r["ratios"].get("throughput_vs_ideal"), ".2f"),
                _fmt(r["ratios"].get("tta_speedup_vs_ddp"), ".2f"),
            )
        console.print(table)


def check_targets(report: dict[str, Any]) -> list[str]:
    """PASS/MISS lines for the issue's targets, with the measured ratio (MISS when it could not be measured)."""
    lines = []
    res = report["results"]

    def line(name: str, value: float | None, goal: float, higher: bool = True) -> None:
        ok = value is not None and (value >= goal if higher else value <= goal)
        lines.append(f"{'PASS' if ok else 'MISS'}  {name}: measured {_fmt(value, '.2f', 'n/a')} (target {'>=' if higher else '<='} {goal})")

    dyn = res.get("digits/dynamic")
    if dyn and "netsense" in dyn:
        ns = dyn["netsense"]
        for ref, goal in (("ddp", 8), ("fp16", 2.5), ("best_static", 1.5), ("aimd", 1.3)):
            line(f"dynamic: NetSense time-to-accuracy speed-up vs {ref}", ns["ratios"].get(f"tta_speedup_vs_{ref}"), goal)
        if "ddp" in dyn and ns["final_acc"] is not None and dyn["ddp"]["final_acc"] is not None:
            line("dynamic: final accuracy gap to plain DDP (points)", 100 * (dyn["ddp"]["final_acc"] - ns["final_acc"]), 0.5, higher=False)
    for wl in ("cnn", "digits"):
        r100 = res.get(f"{wl}/100m")
        if r100 and "netsense" in r100 and "ideal" in r100:
            line(f"{wl} 100 Mbit/s: NetSense throughput / ideal", r100["netsense"]["ratios"].get("throughput_vs_ideal"), 0.85)
        r1g = res.get(f"{wl}/1g")
        if r1g and "netsense" in r1g and "ddp" in r1g:
            line(f"{wl} 1 Gbit/s: NetSense throughput / plain DDP", r1g["netsense"]["ratios"].get("throughput_vs_ddp"), 0.97)
    return lines


def plot(report: dict[str, Any], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_netsense.observation import MODE_CODES

    paths = []
    dyn = report["results"].get("digits/dynamic") or report["results"].get("digits/1g")
    if dyn and "netsense" in dyn:
        pts = dyn["netsense"]["trace_points"]
        t = [p[0] for p in pts]
        fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
        horizon = max(t) if t else 1
        sched = [(a, r) for a, r in TRACES[report["traces"]["digits/dynamic"] if "digits/dynamic" in report["traces"] else "1g"] if a <= horizon]
        xs, ys = [], []
        for k, (a, r) in enumerate(sched):
            end = sched[k + 1][0] if k + 1 < len(sched) else horizon
            xs += [a, end]
            ys += [r, r]
        ax1.plot(xs, ys, label="shaped rate (tc tbf)", color="black")
        ax1.plot(t, [p[1] if p[1] is not None else float("nan") for p in pts], ".", label="estimated bandwidth")
        ax1.set_yscale("log")
        ax1.set_ylabel("Mbit/s")
        ax1.legend()
        ax2.step(t, [MODE_CODES.get(str(p[2]).split("(")[0], -1) for p in pts], where="post")
        ax2.set_yticks(list(MODE_CODES.values()), list(MODE_CODES))
        ax2.set_xlabel("seconds since start of training")
        ax2.set_ylabel("mode")
        fig.suptitle("NetSensePolicy on the dynamic trace")
        fig.tight_layout()
        p = os.path.join(out, "dynamic_bandwidth_mode.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    for key, rows in report["results"].items():
        if not key.startswith("digits/"):
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in rows.values():
            if r["curve"]:
                ax.plot([c[0] for c in r["curve"]], [100 * c[1] for c in r["curve"]], marker=".", label=r["label"])
        ax.axhline(100 * report["target"], color="grey", ls="--", lw=0.8)
        ax.set_xlabel("training seconds")
        ax.set_ylabel("test accuracy %")
        ax.set_ylim(50, 100)
        ax.set_title(f"accuracy vs wall time, {key}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out, f"accuracy_{key.replace('/', '_')}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="digits on the dynamic and 100 Mbit/s traces only")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--traces", default=None, help="comma-separated digits traces (default: all; --quick: dynamic,100m)")
    p.add_argument("--cnn-traces", default=None, help="comma-separated CNN traces (default: 1g,100m; --quick: none)")
    p.add_argument("--cap", type=float, default=None, help="training seconds per digits run (default 45; quick 25)")
    p.add_argument("--cnn-steps", type=int, default=8)
    p.add_argument("--target", type=float, default=0.90, help="test accuracy of time-to-accuracy (default 0.90)")
    p.add_argument("--out", default=os.path.join(_HERE, "results"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces and tc)")
    console = Console(width=170)
    contenders = [c for c in args.contenders.split(",") if c]
    traces = (args.traces or ("dynamic,100m" if args.quick else "dynamic,1g,100m,20m,congestion")).split(",")
    cnn_traces = [t for t in (args.cnn_traces or ("" if args.quick else "1g,100m")).split(",") if t]
    cap = args.cap or (25.0 if args.quick else 45.0)
    jobs = []
    for trace in traces:
        for c in contenders:
            jobs.append({"workload": "digits", "trace": "unshaped" if c == "ideal" else trace, "key": f"digits/{trace}",
                         "contender": c, "steps": 100_000, "cap_s": cap, "eval_every": 5, "seed": args.seed,
                         "torch_powersgd": False})
    for trace in cnn_traces:
        for c in contenders:
            jobs.append({"workload": "cnn", "trace": "unshaped" if c == "ideal" else trace, "key": f"cnn/{trace}",
                         "contender": c, "steps": args.cnn_steps, "cap_s": 60.0, "eval_every": 10**9,
                         "seed": args.seed, "torch_powersgd": False})
    t0 = time.time()

    def log(job: dict[str, Any], res: dict[str, Any]) -> None:
        s = summarise(res, args.target)
        console.print(f"[{time.time() - t0:6.0f} s] {job['key']:<18} {s['label']:<30} {s['steps']:>5} steps "
                      f"{s['samples_per_s']:8.1f} samples/s  final acc {_fmt(s['final_acc'], '.3f')}")

    results = run_jobs(jobs, log)
    report: dict[str, Any] = {"target": args.target, "cap_s": cap, "quick": args.quick, "traces": {}, "results": {},
                              "note": "torch's powerSGD_hook fails/hangs on gloo with several buckets (DESIGN.md); "
                                      "this project's 'powersgd' mode (rank 4) stands in for it."}
    for job, res in zip(jobs, results):
        report["traces"][job["key"]] = job["key"].split("/")[1]
        report["results"].setdefault(job["key"], {})[job["contender"]] = summarise(res, args.target)
    for rows in report["results"].values():
        add_ratios(rows)
    report["duration_s"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    print_tables(report, console)
    console.print(f"[bold]{report['note']}[/bold]")
    report["targets"] = check_targets(report)
    for line in report["targets"]:
        console.print(line)
    report["plots"] = [os.path.basename(x) for x in plot(report, args.out)]
    slim = json.loads(json.dumps(report))
    for rows in slim["results"].values():
        for r in rows.values():
            r["trace_points"] = r["trace_points"][:: max(1, len(r["trace_points"]) // 200)]
    path = os.path.join(args.out, "quick.json" if args.quick else "results.json")
    with open(path, "w") as f:
        json.dump(slim, f, indent=1)
    console.print(f"results: {path}; plots: {', '.join(report['plots'])}; {report['duration_s']:.0f} s in all")


if __name__ == "__main__":
    main()
