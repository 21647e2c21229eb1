"""Pure parts of the shaped-link benchmark: figures, ratios, targets, traces, JSON and plots (no shaped runs)."""

import itertools
import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import report
from bench_worker import socket_bytes
from shaped_bench import (
    CONGESTION,
    DYNAMIC_CYCLE,
    PRESETS,
    Driver,
    JobFailed,
    _job,
    job_plan,
    merge_ideal,
    rate_at,
    slim,
    trace_events,
)


def _result(contender, step_s, accs, trace="dynamic", batch=32, n=20, eval_every=5, workload="digits"):
    """A rank-0 result as bench_worker.py writes it: constant step time, accuracies at every `eval_every` steps."""
    steps = [{"step": i + 1, "train_s": step_s * (i + 1), "wall": 1000.0 + step_s * (i + 1), "tx": 100 * (i + 1),
              "mode": "topk(density=0.01)" if i % 4 == 3 else "none", "bw_mbit": 20.0} for i in range(n)]
    evals = [{"step": eval_every * k, "train_s": step_s * eval_every * k, "acc": a} for k, a in enumerate(accs)]
    return {"job": {"contender": contender, "workload": workload, "trace": trace}, "steps": steps, "evals": evals,
            "batch_size": batch, "stop": "steps", "standin": False, "bytes_total": 5000.0,
            "mode_steps": {"none": 15, "topk": 5} if contender == "netsense" else {"none": n}, "t_go": 1000.0}


def test_throughput_skips_warmup_steps_and_counts_both_ranks():
    steps = [{"train_s": t} for t in (5.0, 6.0, 6.5, 7.0, 7.5)]  # slow first steps (bucket rebuild)
    assert report.samples_per_second(steps, samples_per_step=64, skip=3) == pytest.approx(64 * 2 / 1.0)
    assert report.samples_per_second(steps, samples_per_step=64, skip=0) == pytest.approx(64 * 5 / 7.5)
    assert report.samples_per_second(steps[:3], 64, skip=3) is None


def test_time_to_accuracy_is_the_first_evaluation_at_or_above_target_and_final_is_a_mean():
    evals = [{"step": 0, "train_s": 0.0, "acc": 0.1}, {"step": 5, "train_s": 2.0, "acc": 0.91},
             {"step": 10, "train_s": 4.0, "acc": 0.89}, {"step": 15, "train_s": 6.0, "acc": 0.95}]
    assert report.time_to_accuracy(evals, 0.9) == (2.0, 5)
    assert report.time_to_accuracy(evals, 0.99) == (None, None)
    assert report.final_accuracy(evals) == pytest.approx((0.91 + 0.89 + 0.95) / 3)
    assert report.final_accuracy(evals, up_to_step=10) == pytest.approx((0.91 + 0.89) / 2)


def test_summary_has_every_figure_of_the_schema():
    s = report.summarise_run(_result("netsense", 0.5, [0.1, 0.8, 0.92, 0.93, 0.94]), target=0.9)
    assert set(s) >= {"contender", "workload", "trace", "steps", "train_s", "samples_per_s", "tta_s", "final_acc",
                      "bytes_sent", "bytes_per_step", "mode_share", "stop", "standin"}
    assert s["samples_per_s"] == pytest.approx(2 * 32 / 0.5)
    assert s["tta_s"] == pytest.approx(0.5 * 10) and s["tta_step"] == 10
    assert s["mode_share"] == {"none": 0.75, "topk": 0.25}
    assert s["bytes_sent"] == 5000.0 and s["bytes_per_step"] == pytest.approx(250.0)
    cong = report.summarise_run(_result("ddp", 0.5, [0.1]), target=0.9, competing_bytes=1000.0)
    assert cong["bytes_sent"] == 4000.0


def _group():
    results = {
        # the ideal's own (never averaged) model reaches the target early: that must not count as its TTA
        "ideal": _result("ideal", 0.05, [0.1, 0.95, 0.96, 0.97, 0.97], trace=None),
        "ddp": _result("ddp", 2.0, [0.1, 0.8, 0.92, 0.93, 0.94]),     # TTA 20 s at step 10
        "fp16": _result("fp16", 1.0, [0.1, 0.8, 0.92, 0.93, 0.94]),   # 10 s
        "topk": _result("topk", 0.4, [0.1, 0.8, 0.85, 0.92, 0.94]),   # 6 s
        "aimd": _result("aimd", 0.5, [0.1, 0.8, 0.85, 0.88, 0.89]),   # never
        "netsense": _result("netsense", 0.2, [0.1, 0.8, 0.92, 0.93, 0.94]),  # 2 s
    }
    runs = []
    for c, res in results.items():
        s = report.summarise_run(res, target=0.9)
        s["trace"] = None if c == "ideal" else "dynamic"
        runs.append(s)
    report.compare(runs, {"digits": results["ideal"]})
    report.add_pairwise(runs)
    return {r["contender"]: r for r in runs}, results


def test_ratios_to_ddp_best_static_and_ideal():
    rows, _ = _group()
    ns = rows["netsense"]["ratios"]
    assert ns["throughput_vs_ddp"] == pytest.approx(10.0)
    assert ns["throughput_vs_ideal"] == pytest.approx(0.25)
    assert ns["tta_speedup_vs_ddp"] == {"value": pytest.approx(10.0), "lower_bound": False}
    assert ns["best_static_tta"] == "topk"  # the fastest static compressor to the target
    assert ns["tta_speedup_vs_best_static"]["value"] == pytest.approx(3.0)
    # AIMD never reached the target: its whole run (20 steps * 0.5 s) bounds the speed-up from below
    assert ns["tta_speedup_vs_aimd"] == {"value": pytest.approx(10.0 / 2.0), "lower_bound": True}
    # the ideal's TTA: its own clock at the step where plain DDP reached the target (step 10)
    assert rows["ideal"]["tta_s"] == pytest.approx(0.05 * 10)
    assert rows["ideal"]["final_acc"] is None  # its model is trained without averaging: not comparable
    assert rows["aimd"]["ratios"]["tta_speedup_vs_ddp"] is None  # it never got there


def test_targets_report_pass_miss_and_lower_bounds():
    rows, results = _group()
    targets = {t["name"]: t for t in report.evaluate_targets(list(rows.values()), {"dynamic": results["ddp"]["evals"]},
                                                               results["netsense"]["evals"])}
    assert targets["dynamic: TTA speed-up vs plain DDP"]["status"] == "PASS"       # 10 >= 8
    assert targets["dynamic: TTA speed-up vs torch fp16 hook"]["status"] == "PASS"  # 5 >= 2.5
    assert targets["dynamic: TTA speed-up vs best static compressor"]["status"] == "PASS"  # 3 >= 1.5
    aimd = targets["dynamic: TTA speed-up vs AIMDPolicy"]
    assert aimd["status"] == "PASS" and aimd["lower_bound"] and aimd["value"] == pytest.approx(5.0)
    acc = targets["dynamic: final accuracy within 0.5 points of plain DDP"]
    assert acc["status"] == "PASS" and acc["value"] == pytest.approx(0.0)
    # throughput targets need CNN runs that this group does not have: not applicable, never a silent pass
    assert targets["100 Mbit/s: throughput vs ideal (cnn)"]["status"] == "N/A"
    # a slower NetSense misses, and says by how much
    rows["netsense"]["ratios"]["tta_speedup_vs_ddp"] = {"value": 3.0, "lower_bound": False}
    again = {t["name"]: t for t in report.evaluate_targets(list(rows.values()), {})}
    assert again["dynamic: TTA speed-up vs plain DDP"]["status"] == "MISS"
    assert again["dynamic: TTA speed-up vs plain DDP"]["value"] == 3.0
    assert again["dynamic: final accuracy within 0.5 points of plain DDP"]["status"] == "N/A"  # no reference
    # plain DDP capped at step 10 (a slow trace): both are compared at step 10, NetSense's later evaluations unused
    capped = [e for e in results["ddp"]["evals"] if e["step"] <= 10]
    late = [dict(e, acc=0.5) if e["step"] > 10 else e for e in results["netsense"]["evals"]]
    acc = {t["name"]: t for t in report.evaluate_targets(list(rows.values()), {"20m": capped}, late)}
    acc = acc["dynamic: final accuracy within 0.5 points of plain DDP"]
    assert acc["status"] == "PASS" and "steps 5, 10 " in acc["note"] and acc["value"] == pytest.approx(0.0)
    worse = [dict(e, acc=e["acc"] - 0.02) for e in results["netsense"]["evals"]]
    acc = {t["name"]: t for t in report.evaluate_targets(list(rows.values()), {"20m": capped}, worse)}
    assert acc["dynamic: final accuracy within 0.5 points of plain DDP"]["status"] == "MISS"


def test_traces_schedule_the_rates_and_flows():
    dyn = trace_events("dynamic", 100.0)
    assert dyn[0] == (0.0, "rate", DYNAMIC_CYCLE[0][0])
    assert {v for _, k, v in dyn if k == "rate"} == {1000.0, 100.0, 20.0}
    assert [t for t, _, _ in dyn] == sorted(t for t, _, _ in dyn) and dyn[-1][0] < 100.0
    period = sum(sec for _, sec in DYNAMIC_CYCLE)
    assert rate_at(dyn, 1.0) == rate_at(dyn, 1.0 + period) == DYNAMIC_CYCLE[0][0]
    assert rate_at(dyn, DYNAMIC_CYCLE[0][1] + 0.1) == DYNAMIC_CYCLE[1][0]
    assert trace_events("20m", 50.0) == [(0.0, "rate", 20.0)]
    cong = trace_events("congestion", 40.0)
    assert cong[0] == (0.0, "rate", CONGESTION["rate"])
    flows = [(t, v) for t, k, v in cong if k == "flows"]
    assert flows and flows[0] == (CONGESTION["first_s"], CONGESTION["on_s"])
    assert all(b[0] - a[0] == CONGESTION["on_s"] + CONGESTION["off_s"] for a, b in itertools.pairwise(flows))
    with pytest.raises(ValueError, match="trace"):
        trace_events("lunar", 10.0)


def test_socket_bytes_counts_only_this_process():
    ss = ("ESTAB 0 0 10.231.0.1:40000 10.231.0.2:5201 users:((\"python\",pid=42,fd=7))\n"
          "\t cubic bytes_sent:1000 bytes_acked:1001 segs_out:3\n"
          "ESTAB 0 0 10.231.0.1:40001 10.231.0.2:5201 users:((\"python\",pid=421,fd=3))\n"
          "\t cubic bytes_sent:999999\n"
          "ESTAB 0 0 10.231.0.1:40002 10.231.0.2:29512 users:((\"python\",pid=42,fd=9))\n"
          "\t bbr bytes_sent:234 bytes_received:5\n")
    assert socket_bytes(ss, 42) == 1234
    assert socket_bytes(ss, 7) == 0


def test_slim_results_round_trip_through_json_and_plots(tmp_path):
    rows, results = _group()
    series = {f"digits/{r['trace']}/{c}": {"steps": results[c]["steps"], "evals": results[c]["evals"],
                                           "trace_log": [[999.9, "rate", 1000.0], [1008.0, "rate", 20.0]],
                                           "t_go": 1000.0} for c, r in rows.items()}
    full = {"runs": list(rows.values()), "series": series, "config": {"target_accuracy": 0.9}, "targets": []}
    small = json.loads(json.dumps(slim(full)))
    assert "steps" in small["series"]["digits/dynamic/netsense"]
    assert "steps" not in small["series"]["digits/dynamic/ddp"]  # evaluations only
    assert small["series"]["digits/dynamic/netsense"]["steps"][0]["wall"] == pytest.approx(1000.2)
    assert series["digits/dynamic/netsense"]["steps"][0]["wall"] == pytest.approx(1000.2)  # the input is untouched
    pytest.importorskip("matplotlib")
    import plots

    paths = plots.make_all(small, str(tmp_path))
    assert {os.path.basename(p) for p in paths} == {"bandwidth_mode_digits.png", "accuracy_digits.png",
                                                    "throughput_digits.png"}
    assert all(os.path.getsize(p) > 1000 for p in paths)
    xs, ys = plots.rate_steps(series["digits/dynamic/netsense"]["trace_log"], 1000.0, 1020.0)
    assert ys[0] == 1000.0 and ys[-1] == 20.0 and xs[0] == 0.0 and xs[-1] == pytest.approx(20.0)


def test_lower_bounds_when_baselines_never_reached_the_target():
    rows, results = _group()
    runs = list(rows.values())
    for r in runs:  # no static compressor reached the target: the one that trained longest-to-shortest bounds it
        if r["contender"] in ("fp16", "powersgd", "topk"):
            r["tta_s"] = r["tta_step"] = None
    report.compare(runs, {"digits": results["ideal"]})
    ns = rows["netsense"]["ratios"]
    # fp16 ran 20 s, top-k 8 s without getting there: min TTA over them is > 8 s, so the speed-up is >= 8 / 2
    assert ns["best_static_tta"] == "topk"
    assert ns["tta_speedup_vs_best_static"] == {"value": pytest.approx(4.0), "lower_bound": True}
    # a static compressor that reached the target faster than the others ran wins with an exact figure
    rows["fp16"]["tta_s"] = 5.0
    report.compare(runs, {"digits": results["ideal"]})
    assert rows["netsense"]["ratios"]["best_static_tta"] == "fp16"
    exact = {"value": pytest.approx(2.5), "lower_bound": False}
    assert rows["netsense"]["ratios"]["tta_speedup_vs_best_static"] == exact
    # the ideal's TTA is plain DDP's step on the ideal's clock: without it there is no TTA ratio to the ideal
    # (the ideal's own run length bounds nothing)
    rows["ddp"]["tta_s"] = rows["ddp"]["tta_step"] = None
    report.compare(runs, {"digits": results["ideal"]})
    assert rows["ideal"]["tta_s"] is None and "did not reach" in rows["ideal"]["tta_note"]
    assert rows["netsense"]["ratios"]["tta_speedup_vs_ideal"] is None
    assert rows["netsense"]["ratios"]["tta_speedup_vs_ddp"] == {"value": pytest.approx(40.0 / 2.0), "lower_bound": True}
    # a lower bound below the threshold is no pass, and says it is inconclusive
    rows["netsense"]["ratios"]["tta_speedup_vs_ddp"] = {"value": 5.0, "lower_bound": True}
    t = {t["name"]: t for t in report.evaluate_targets(runs, {})}["dynamic: TTA speed-up vs plain DDP"]
    assert t["status"] == "MISS" and t["lower_bound"] and "inconclusive" in t["note"]


def test_throughput_runs_have_no_time_to_accuracy_figures():
    ideal = _result("ideal", 0.3, [], trace=None, workload="cnn", n=43, eval_every=10**9)
    ddp = _result("ddp", 0.6, [], trace="1g", workload="cnn", n=43, eval_every=10**9)
    ns = _result("netsense", 0.62, [], trace="1g", workload="cnn", n=43, eval_every=10**9)
    runs = []
    for res in (ideal, ddp, ns):
        s = report.summarise_run(res, target=None)
        assert s["measured_steps"] == 40 and s["tta_s"] is None and s["final_acc"] is None
        runs.append(s)
    report.compare(runs, {"cnn": ideal})
    assert "tta_note" not in runs[0]
    r = runs[2]["ratios"]
    assert r["throughput_vs_ddp"] == pytest.approx(0.6 / 0.62) and r["throughput_vs_ideal"] == pytest.approx(0.3 / 0.62)
    assert r["tta_speedup_vs_ddp"] is None and r["tta_speedup_vs_best_static"] is None
    t = {t["name"]: t for t in report.evaluate_targets(runs, {})}
    assert t["1 Gbit/s: throughput vs plain DDP (cnn)"]["status"] == "MISS"
    assert t["100 Mbit/s: throughput vs ideal (cnn)"]["status"] == "N/A"  # no 100m run


def test_the_synced_ideal_splits_the_gap_to_the_ideal():
    """DDP with the exchange skipped is a reference like the ideal: no group of its own, its ratio to the ideal
    says what synchronising costs, and every contender gets a ratio to it (the 100 Mbit/s target's note)."""
    runs, results = [], {}
    for c, step_s, trace in (("ideal", 0.3, None), ("ideal_sync", 0.4, None), ("ddp", 0.8, "100m"),
                             ("netsense", 0.5, "100m")):
        results[c] = _result(c, step_s, [], trace=trace, workload="cnn", n=43, eval_every=10**9)
        s = report.summarise_run(results[c], target=None)
        s["trace"] = trace
        runs.append(s)
    report.compare(runs, {"cnn": results["ideal"]}, {"cnn": results["ideal_sync"]})
    report.add_pairwise(runs)
    rows = {r["contender"]: r for r in runs}
    assert rows["ideal_sync"]["ratios"] == {"throughput_vs_ideal": pytest.approx(0.3 / 0.4)}
    ns = rows["netsense"]["ratios"]
    assert ns["throughput_vs_ideal"] == pytest.approx(0.3 / 0.5)
    assert ns["throughput_vs_ideal_sync"] == pytest.approx(0.4 / 0.5)
    assert ns["best_static_throughput"] is None  # the references are not static compressors
    t = {t["name"]: t for t in report.evaluate_targets(runs, {})}["100 Mbit/s: throughput vs ideal (cnn)"]
    assert t["status"] == "MISS" and t["value"] == pytest.approx(0.6)
    assert "0.80x the synced ideal" in t["note"] and "0.75x the ideal" in t["note"]


def test_skip_exchange_hook_returns_the_local_gradient_at_once():
    pytest.importorskip("lightning_netsense")
    import torch
    from contenders import skip_exchange_hook

    class _Bucket:  # what the hook reads of DDP's GradBucket
        def __init__(self) -> None:
            self.tensor = torch.arange(4.0)

        def buffer(self) -> torch.Tensor:
            return self.tensor

    bucket = _Bucket()
    fut = skip_exchange_hook(None, bucket)
    assert fut.done() and fut.value() is bucket.tensor


def test_presets_measure_what_the_targets_need():
    for name, preset in PRESETS.items():
        digits, cnn = preset["digits"], preset["cnn"]
        plan = job_plan(digits)
        assert ("netsense", "dynamic") in plan and ("ideal", None) in plan
        assert {c for c, tr in plan if tr == "dynamic"} >= {"ddp", "fp16", "powersgd", "topk", "aimd", "netsense"}
        # plain DDP also on a fast trace: the accuracy reference at NetSense's step count
        assert ("ddp", "1g") in plan, name
        cplan = job_plan(cnn)
        assert {("ideal", None), ("netsense", "100m"), ("netsense", "1g"), ("ddp", "1g")} <= set(cplan), name
        assert cnn["steps"] - report.WARMUP_STEPS == 40
        assert digits["cap_s_dynamic"] >= sum(sec for _, sec in DYNAMIC_CYCLE)  # a whole cycle of the trace
    # the dynamic trace starts congested and visits every rate; in the full run every contender trains there
    # until the cap (a whole cycle: the plot of NetSense's estimate covers each rate), elsewhere to the budget
    assert DYNAMIC_CYCLE[0][0] == 20.0 and {r for r, _ in DYNAMIC_CYCLE} == {20.0, 100.0, 1000.0}
    full = PRESETS["full"]["digits"]
    dyn, fixed = (_job("digits", "netsense", t, full, 0, False, 0.95) for t in ("dynamic", "20m"))
    assert dyn["cap_s"] >= sum(sec for _, sec in DYNAMIC_CYCLE) and dyn["steps"] * 0.02 >= dyn["cap_s"]
    assert fixed["steps"] == full["steps"] == 300 and fixed["cap_s"] == full["cap_s"]
    extra = dict(PRESETS["quick"]["digits"], traces=["dynamic"], contenders=["ddp"])
    assert job_plan(extra) == [("ddp", "dynamic"), ("ddp", "1g")]
    # the references run first and last (the faster run counts: one run of the ideal moved from 121 to 209
    # samples/s), the ideal outermost
    both = dict(extra, contenders=["ideal", "ddp"])
    assert job_plan(both) == [("ideal", None), ("ddp", "dynamic"), ("ddp", "1g"), ("ideal", None)]
    refs = dict(extra, contenders=["ideal_sync", "ddp", "ideal"])
    assert job_plan(refs) == [("ideal", None), ("ideal_sync", None), ("ddp", "dynamic"), ("ddp", "1g"),
                              ("ideal_sync", None), ("ideal", None)]
    for preset in PRESETS.values():  # both presets measure what synchronising alone costs on the CNN
        assert ("ideal_sync", None) in job_plan(preset["cnn"])


def test_the_faster_run_of_the_ideal_counts_and_both_are_listed():
    first = {"contender": "ideal", "samples_per_s": 121.0, "train_s": 22.6}
    assert merge_ideal(None, first) and first["repeats_samples_per_s"] == [121.0]
    faster = {"contender": "ideal", "samples_per_s": 205.0, "train_s": 13.3}
    assert merge_ideal(first, faster)  # replaces the kept one, in place
    assert first["samples_per_s"] == 205.0 and first["train_s"] == 13.3
    assert first["repeats_samples_per_s"] == [121.0, 205.0]
    slower = {"contender": "ideal", "samples_per_s": 150.0, "train_s": 18.0}
    assert not merge_ideal(first, slower)
    assert first["samples_per_s"] == 205.0 and first["repeats_samples_per_s"] == [121.0, 205.0, 150.0]


def test_static_contenders_never_probe_the_link():
    pytest.importorskip("lightning_netsense")
    from contenders import hook_state

    for name in ("powersgd", "topk"):
        state = hook_state(name)
        assert state.probe_every == 0 and not state.policy.uses_link_estimate
    assert hook_state("topk").policy.decision.key == "topk(density=0.01)"
    assert hook_state("netsense").probe_every > 0  # the adaptive ones may probe
    with pytest.raises(ValueError, match="hook-based"):
        hook_state("ddp")


def test_driver_wait_reports_only_this_jobs_complete_errors(tmp_path):
    d = Driver(link=None, control=str(tmp_path))
    (tmp_path / "error_3_1.json").write_text(json.dumps({"error": "an earlier job"}))
    (tmp_path / "error_4_0.json.tmp").write_text("{half-writ")
    (tmp_path / "ready_4_0").write_text("")
    (tmp_path / "ready_4_1").write_text("")
    d._wait(["ready_4_0", "ready_4_1"], 1.0, "set-up", errors="error_4_")  # neither error is job 4's
    with pytest.raises(JobFailed, match="timed out"):
        d._wait(["result_4_0.json"], 0.1, "job 4", errors="error_4_")
    (tmp_path / "error_4_1.json").write_text(json.dumps({"error": "Traceback: boom"}))
    with pytest.raises(JobFailed, match="boom"):
        d._wait(["result_4_0.json"], 5.0, "job 4", errors="error_4_")


def test_hook_overhead_times_every_codec_on_the_cnns_buckets(capsys):
    import hook_overhead
    import torch
    from workloads import resnet18

    buckets = hook_overhead.buckets()
    # every parameter in exactly one bucket, in DDP's (reverse) order
    assert sum(n for _, n in buckets) == sum(p.numel() for p in resnet18(stem="cifar").parameters())
    assert len(buckets) >= 2
    threads = torch.get_num_threads()
    try:
        hook_overhead.main(["--steps", "3"])
    finally:
        torch.set_num_threads(threads)  # main() sets one thread: do not leave it to the tests after this one
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == list(hook_overhead._OPTIONS)
    for line in lines:  # per step: the parts are measured, positive, and add up to the total
        total = float(line.split()[1])
        parts = [float(x) for x in re.findall(r"([0-9.]+) ms", line)]
        assert len(parts) == 4 and all(p > 0 for p in parts)
        assert total == pytest.approx(sum(parts) / 1e3, abs=2e-3)


@pytest.mark.slow
def test_first_step_reports_steps_to_the_target_per_mode(capsys):
    """benchmarks/first_step.py: two real gloo ranks per mode; a first step in that mode, PowerSGD after."""
    import first_step

    first_step.main(["--modes", "powersgd,int8", "--seeds", "0", "--steps", "5", "--target", "0.0"])
    out = capsys.readouterr().out
    # a target of 0 is met at the first evaluation; the mode of the first step is the one asked for
    assert "powersgd  steps to 0% over seeds 0: 5" in out and "int8      steps to 0% over seeds 0: 5" in out, out
    assert "{'powersgd': 5}" in out and "{'int8': 1, 'powersgd': 4}" in out, out
