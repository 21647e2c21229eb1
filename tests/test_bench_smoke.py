"""Pure parts of the shaped-link benchmark: metrics, ratios and target lines (no shaped runs)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from shaped_bench import TRACES, add_ratios, check_targets, summarise  # noqa: E402


def _result(contender, accs, step_s, batch=32, standin=False):
    steps = [{"train_s": step_s * (i + 1), "wall": 100.0 + step_s * (i + 1), "tx": 1000 * (i + 1),
              "mode": "topk(density=0.01)" if i % 2 else "none", "bw_mbit": 20.0} for i in range(10)]
    evals = [{"step": 5 * k, "train_s": step_s * 5 * k, "acc": a} for k, a in enumerate(accs)]
    return {"job": {"contender": contender}, "steps": steps, "evals": evals, "batch_size": batch,
            "stop": "cap", "standin": standin, "t_go_driver": 100.0}


def test_summarise_measures_throughput_time_to_target_and_mode_share():
    s = summarise(_result("netsense", [0.1, 0.8, 0.92], step_s=0.5), target=0.9)
    assert s["samples_per_s"] == pytest.approx(10 * 32 * 2 / 5.0)
    assert s["time_to_target_s"] == pytest.approx(0.5 * 10)  # first evaluation at or above the target
    assert s["final_acc"] == 0.92
    assert s["mode_share"] == {"none": 0.5, "topk": 0.5}
    assert s["bytes_sent"] == 10_000
    assert summarise(_result("ddp", [0.1, 0.5], step_s=1.0), target=0.9)["time_to_target_s"] is None


def test_ratios_against_ddp_best_static_and_ideal():
    rows = {
        "ideal": summarise(_result("ideal", [0.1, 0.95], 0.1), 0.9),
        "ddp": summarise(_result("ddp", [0.1, 0.95], 2.0), 0.9),
        "fp16": summarise(_result("fp16", [0.1, 0.95], 1.0), 0.9),
        "topk": summarise(_result("topk", [0.1, 0.95], 0.4), 0.9),
        "netsense": summarise(_result("netsense", [0.1, 0.95], 0.2), 0.9),
    }
    add_ratios(rows)
    ns = rows["netsense"]["ratios"]
    assert ns["throughput_vs_ddp"] == pytest.approx(10.0)
    assert ns["throughput_vs_ideal"] == pytest.approx(0.5)
    assert ns["tta_speedup_vs_ddp"] == pytest.approx(10.0)
    assert ns["tta_speedup_vs_best_static"] == pytest.approx(2.0)  # top-k is the best static compressor here
    report = {"results": {"digits/dynamic": rows}}
    lines = check_targets(report)
    assert any(line.startswith("PASS") and "vs ddp" in line for line in lines)
    assert any(line.startswith("MISS") and "vs aimd" in line for line in lines)  # not measured: a miss, not a pass


def test_dynamic_trace_steps_between_the_three_rates():
    rates = {r for _, r in TRACES["dynamic"]}
    assert rates == {1000.0, 100.0, 20.0}
    times = [t for t, _ in TRACES["dynamic"]]
    assert times == sorted(times) and times[0] == 0.0
