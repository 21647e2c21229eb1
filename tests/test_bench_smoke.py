"""The shaped-link benchmark without a shaped link: figures, bounds, targets, sensing measures, traces, the schedule,
the contenders' strategies, JSON, tables and plots; and (slow) two Lightning jobs end to end on loopback."""

import itertools
import json
import math
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import adaptation
import markdown_report
import plan
import report
import targets
from bench_driver import Driver, JobFailed
from bench_worker import socket_bytes
from names import CONTENDERS, LABELS, TWINS
from shaped_bench import select, slim
from traces import CONGESTION, DYNAMIC, phase_changes, rate_at, trace_events


def _out(contender, step_s, values, trace="dynamic", workload="digits", metric="accuracy", target=0.9, n=20,
         eval_every=5, rep=0, role="run", stop="steps", steps_extra=None, trace_log=None, t_go=1000.0):
    """A driver result as shaped_bench gets it: both ranks' results (rank 1 a copy), the trace as applied."""
    steps = [{"step": i + 1, "train_s": step_s * (i + 1), "wall": t_go + step_s * (i + 1), "excluded_s": 0.0}
             for i in range(n)]
    for i, st in enumerate(steps):
        st.update((steps_extra or (lambda i: {}))(i))
    evals = [{"step": eval_every * k, "train_s": step_s * eval_every * k, "value": v} for k, v in enumerate(values)]
    r0 = {"job": {"contender": contender, "workload": workload, "trace": trace, "rep": rep, "role": role,
                  "cap_s": 30.0, "target": target if metric else None, "target_steps": None},
          "steps": steps, "evals": evals, "metric": metric, "batch_size": 32, "stop": stop, "standin": False,
          "mode_steps": {"int8": 1, "powersgd": n - 1} if contender == "netsense" else {"none": n},
          "socket_bytes": 2500, "hook_bytes": 5000.0, "t_go": t_go}
    return {"ranks": [r0, dict(r0)], "trace_log": trace_log or [[t_go - 0.01, "rate", 20.0], [t_go, "go", 0]],
            "t_go": t_go}


# ---------------------------------------------------------------------------------------------- figures
def test_throughput_skips_warmup_steps_and_counts_both_ranks():
    steps = [{"train_s": t} for t in (5.0, 6.0, 6.5, 7.0, 7.5)]  # slow first steps (bucket rebuild)
    assert report.samples_per_second(steps, samples_per_step=64, skip=3) == pytest.approx(64 * 2 / 1.0)
    assert report.samples_per_second(steps, samples_per_step=64, skip=0) == pytest.approx(64 * 5 / 7.5)
    assert report.samples_per_second(steps[:3], 64, skip=3) is None


def test_time_to_target_meets_accuracy_from_above_and_loss_from_below():
    acc = [{"step": 0, "train_s": 0.0, "value": 0.1}, {"step": 5, "train_s": 2.0, "value": 0.91},
           {"step": 10, "train_s": 4.0, "value": 0.89}, {"step": 15, "train_s": 6.0, "value": 0.95}]
    assert report.time_to_target(acc, 0.9, "accuracy") == (2.0, 5)
    assert report.time_to_target(acc, 0.99, "accuracy") == (None, None)
    loss = [dict(e, value=5.0 - 2 * e["value"]) for e in acc]  # 4.8, 3.18, 3.22, 3.1
    assert report.time_to_target(loss, 3.15, "loss") == (6.0, 15)
    assert report.final_quality(acc) == pytest.approx((0.91 + 0.89 + 0.95) / 3)
    assert report.final_quality(acc, up_to_step=10) == pytest.approx((0.91 + 0.89) / 2)


def test_summary_has_every_figure_and_the_sensing_of_a_dynamic_run():
    log = [[999.99, "rate", 20.0], [1000.0, "go", 0], [1002.0, "rate", 1000.0], [1004.0, "rate", 20.0]]

    def extra(i):  # the estimate follows the link one step late; a probe at step 6
        t = 0.5 * (i + 1)
        bw = 20.0 if t <= 2.5 else 1000.0 if t <= 4.5 else 20.0
        return {"bw_mbit": bw, "hook_bytes": 100.0, "probe_bytes": 300.0 if i == 5 else 0.0,
                "probe_s": 0.02 if i == 5 else 0.0, "mode": "powersgd"}

    s = report.summarise_run(_out("netsense", 0.5, [0.1, 0.8, 0.92, 0.93, 0.94], n=12, steps_extra=extra,
                                  trace_log=log))
    assert set(s) >= {"contender", "workload", "trace", "rep", "steps", "train_s", "samples_per_s", "tts_s", "final",
                      "bytes_sent", "bytes_per_step", "mode_share", "stop", "standin", "probes", "sensing"}
    assert s["samples_per_s"] == pytest.approx(2 * 32 / 0.5)
    assert s["tts_s"] == pytest.approx(0.5 * 10) and s["tts_step"] == 10
    assert s["mode_share"] == {"int8": pytest.approx(1 / 12), "powersgd": pytest.approx(11 / 12)}
    assert s["bytes_sent"] == 5000.0 and s["ranks_agree"]
    assert s["probes"]["probes"] == 1 and s["probes"]["time_share"] == pytest.approx(0.02 / 6.0)
    assert s["probes"]["byte_share"] == pytest.approx(300.0 / 1500.0)
    # the recovery at 2 s was seen by the step ending at 3.0 s; the drop at 4 s by the second step after it
    assert s["sensing"]["recoveries"] == [{"at": pytest.approx(2.0), "seconds": pytest.approx(1.0), "censored": False,
                                           "mode": "powersgd"}]
    assert s["sensing"]["drops"] == [{"at": pytest.approx(4.0), "steps": 2, "censored": False, "mode": "powersgd"}]
    assert s["changes_before_target"] == 2  # both changes came before step 10 (5 s)


def test_sensing_measures_censor_at_the_next_change_and_pause_with_evaluations():
    log = [[0.0, "rate", 20.0], [0.0, "go", 0], [1.0, "rate", 1000.0], [2.0, "rate", 20.0], [3.0, "rate", 1000.0]]
    never = [{"step": i + 1, "train_s": 0.25 * (i + 1), "wall": 0.25 * (i + 1), "excluded_s": 0.0, "bw_mbit": 20.0}
             for i in range(16)]
    rec = adaptation.recoveries(never, log, 0.0)
    assert [r["censored"] for r in rec] == [True, True]
    assert rec[0]["seconds"] == pytest.approx(1.0)  # censored at the next change, 1 s later
    # the first step after the drop already shows it (a step that straddled the change would count as 0)
    assert adaptation.drops(never, log, 0.0) == [{"at": pytest.approx(2.0), "steps": 1, "censored": False,
                                                  "mode": None}]
    # an evaluation of 0.5 s after step 4 (wall 1.0) pauses the clock: the change at wall 1.2 is at 1.0 training s
    paused = [dict(s, wall=s["wall"] + (0.5 if s["step"] > 4 else 0.0), excluded_s=0.5 if s["step"] > 4 else 0.0)
              for s in never]
    timed = [dict(s, wall_s=s["wall"]) for s in paused]
    assert adaptation.train_at(timed, 1.2) == pytest.approx(1.0)
    assert adaptation.train_at(timed, 1.6) == pytest.approx(1.1)
    assert adaptation.probe_cost([{"train_s": 1.0}]) is None  # no hook accounting: not a NetSense run
    assert adaptation.changes_before(never, log, 0.0, None) is None


# ---------------------------------------------------------------------------------------------- ratios and targets
def _group(ns_tts=(2.0,), twin_tts=None, trace="dynamic"):
    """NetSense and the twins on one trace; `twin_tts`: per twin a time per repeat (None: stopped before)."""
    twin_tts = twin_tts or {"fp16": [10.0], "bf16": [None], "int8": [6.0], "powersgd": [3.0], "topk": [None]}
    runs = []
    for rep, t in enumerate(ns_tts):
        values = [0.1, 0.95] if t is not None else [0.1, 0.5]
        runs.append(report.summarise_run(_out("netsense", (t or 5.0) / 5, values, trace=trace, rep=rep, n=5)))
    for twin, times in twin_tts.items():
        for rep, t in enumerate(times):
            if t == "skip":
                continue
            values = [0.1, 0.95] if t is not None else [0.1, 0.5]
            runs.append(report.summarise_run(_out(twin, (t or 4.0) / 5, values, trace=trace, rep=rep, n=5,
                                                  stop="target" if t else "cap")))
    report.compare(runs)
    return runs


def test_best_twin_and_the_bounds_of_netsense_against_it():
    runs = _group()
    ns = next(r for r in runs if r["contender"] == "netsense")
    assert ns["ratios"]["best_twin"] == "powersgd"
    assert ns["ratios"]["time_vs_best_twin"] == pytest.approx((2.0 / 3.0, 2.0 / 3.0))
    # no twin reached the target: the best stopped at 4 s, so NetSense took at most half its time
    runs = _group(twin_tts={t: [None] for t in TWINS})
    ns = next(r for r in runs if r["contender"] == "netsense")
    assert ns["ratios"]["time_vs_best_twin"] == (0.0, pytest.approx(0.5))
    assert ns["ratios"]["speed_vs_best_twin"] == (pytest.approx(2.0), math.inf)
    # NetSense did not reach it but a twin did: at least its own training time over the twin's time
    runs = _group(ns_tts=(None,))
    ns = next(r for r in runs if r["contender"] == "netsense")
    assert ns["ratios"]["time_vs_best_twin"] == (pytest.approx(5.0 / 3.0), math.inf)


def test_a_twin_not_rerun_counts_with_its_first_repeat():
    runs = _group(ns_tts=(2.0, 2.5), twin_tts={"powersgd": [3.0, 2.0], "int8": [2.4, "skip"], "fp16": [None, "skip"]})
    ns = [r for r in runs if r["contender"] == "netsense"]
    assert [r["ratios"]["best_twin"] for r in ns] == ["int8", "powersgd"]
    assert ns[1]["ratios"]["time_vs_best_twin"] == pytest.approx((2.5 / 2.0, 2.5 / 2.0))


def _targets(runs, evals=None):
    return {t["name"]: t for t in targets.evaluate_targets(runs, evals or {})}


def test_targets_pass_only_when_every_repeat_meets_them_and_say_so():
    runs = _group(ns_tts=(2.0, 2.2), twin_tts={"powersgd": [3.0, 3.0], "int8": [6.0, "skip"]})
    t = _targets(runs)["dynamic (digits): NetSense's time to target / the best twin's"]
    assert t["status"] == "PASS" and t["spread"] == [pytest.approx(2 / 3), pytest.approx(2.2 / 3)]
    assert t["value"] == pytest.approx((2 / 3 + 2.2 / 3) / 2) and t["note"] == ""
    runs = _group(ns_tts=(2.0, 2.5), twin_tts={"powersgd": [3.0, 3.0]})
    t = _targets(runs)["dynamic (digits): NetSense's time to target / the best twin's"]
    assert t["status"] == "MISS" and "1 of 2 repeats" in t["note"]
    runs = _group(ns_tts=(2.0,), twin_tts={"powersgd": [None]})  # the twin stopped at 4 s: NetSense <= 0.5x
    t = _targets(runs)["dynamic (digits): NetSense's time to target / the best twin's"]
    assert t["status"] == "PASS" and t["one_sided"] and "one repeat only" in t["note"]
    assert "≤0.5x" in markdown_report.target_text(t)
    runs = _group(ns_tts=(None,), twin_tts={"powersgd": [None]})  # neither got there: a bound that decides nothing
    t = _targets(runs)["dynamic (digits): NetSense's time to target / the best twin's"]
    assert t["status"] == "MISS" and "inconclusive" in t["note"]


def test_static_targets_speed_and_quality_against_plain_ddp():
    runs = _group(ns_tts=(3.0, 3.1), twin_tts={"powersgd": [3.0, 3.0]}, trace="20m")
    ref = _out("ddp", 0.1, [0.1, 0.95, 0.96, 0.97, 0.97], trace="unshaped", role="quality")
    runs.append(report.summarise_run(ref))
    evals = {"digits/quality/ddp/0": ref["ranks"][0]["evals"],
             "digits/20m/netsense/0": [{"step": 5, "train_s": 1, "value": 0.95}],
             "digits/20m/netsense/1": [{"step": 5, "train_s": 1, "value": 0.92}]}
    got = _targets(runs, evals)
    speed = got["20m (digits): the best twin's time to target / NetSense's"]
    assert speed["status"] == "PASS" and speed["spread"] == [pytest.approx(3.0 / 3.1), pytest.approx(1.0)]
    quality = got["20m (digits): final accuracy, NetSense - plain DDP (points)"]
    assert quality["repeats"] == [[pytest.approx(0.0)] * 2, [pytest.approx(-3.0)] * 2]
    assert quality["status"] == "MISS" and "1 of 2 repeats" in quality["note"]
    assert "100m (digits): the best twin's time to target / NetSense's" not in got  # not run: no line at all
    # a loss is compared the other way round: at most 0.02 nats above plain DDP
    loss = targets._quality("gpt", "1g", [{"rep": 0, "steps": 5, "metric": "loss"}],
                            {"gpt/quality/ddp/0": [{"step": 5, "value": 3.00}],
                             "gpt/1g/netsense/0": [{"step": 5, "value": 3.01}]})
    assert loss["status"] == "PASS" and loss["threshold"] == 0.02


def test_throughput_targets_and_sensing_lines():
    runs = []
    for c, step_s, trace, rep in (("ideal_sync", 0.4, None, 0), ("ideal_sync", 0.5, None, 1),
                                  ("netsense", 0.5, "100m", 0), ("netsense", 0.45, "100m", 1),
                                  ("powersgd", 0.45, "100m", 0), ("topk", 0.6, "100m", 0)):
        runs.append(report.summarise_run(_out(c, step_s, [], trace=trace, workload="cnn", metric=None, n=23,
                                              rep=rep)))
    report.compare(runs)
    ns = [r for r in runs if r["contender"] == "netsense"]
    assert ns[0]["ratios"]["throughput_vs_ideal_sync"] == pytest.approx(0.4 / 0.5)  # the faster synced ideal
    assert ns[1]["ratios"]["best_twin"] == "powersgd"  # not rerun: its first repeat stands
    got = _targets(runs)
    assert got["100m (cnn): NetSense's samples/s / the synced ideal's"]["status"] == "MISS"
    sps = got["100m (cnn): NetSense's samples/s / the best twin's"]
    assert sps["status"] == "MISS" and sps["repeats"] == [[pytest.approx(0.9)] * 2, [pytest.approx(1.0)] * 2]
    records = [[{"mode": "none"}, {"mode": "powersgd(bits=16,rank=8)"}], [{"mode": "int8"}]]
    line = targets._sensing("recovery", "gpt", 1.0, [[(0.5, 0.5), (0.8, math.inf)], [(0.7, 0.7)]], "s", records)
    assert line["status"] == "MISS" and line["changes"] == [[0.5, 0.5], [0.8, math.inf], [0.7, 0.7]]
    assert line["note"].startswith("2 of 3 changes met it, 1 not within their phase (the mode running at the "
                                   "changes that missed: powersgd at 1)")


# ---------------------------------------------------------------------------------------------- traces and plan
def test_traces_schedule_rates_per_workload_and_flows():
    for wl, cycle in DYNAMIC.items():
        dyn = trace_events("dynamic", 40.0, wl)
        assert dyn[0] == (0.0, "rate", 20.0)
        assert [t for t, _, _ in dyn] == sorted(t for t, _, _ in dyn) and dyn[-1][0] < 40.0
        period = sum(sec for _, sec in cycle)
        assert rate_at(dyn, 0.5) == rate_at(dyn, 0.5 + period) == 20.0
        rates = [r for r, _ in cycle]
        pairs = set(zip(rates, rates[1:] + rates[:1]))
        assert (20.0, 1000.0) in pairs and (1000.0, 20.0) in pairs  # a recovery and a drop per cycle
        assert max(sec for r, sec in cycle if r == 1000.0) > 1.0  # longer than the recovery target
    assert trace_events("unshaped", 5.0) == [(0.0, "rate", None)]
    cong = trace_events("congestion", 40.0)
    flows = [(t, v) for t, k, v in cong if k == "flows"]
    assert flows[0] == (CONGESTION["first_s"], CONGESTION["on_s"])
    assert all(b[0] - a[0] == CONGESTION["on_s"] + CONGESTION["off_s"] for a, b in itertools.pairwise(flows))
    log = [[9.9, "rate", 20.0], [10.0, "go", 0], [11.0, "rate", 1000.0], [12.0, "rate", 1000.0], [13, "flows", 5]]
    assert phase_changes(log, 10.0) == [(1.0, 20.0, 1000.0)]
    with pytest.raises(ValueError, match="trace"):
        trace_events("lunar", 10.0)


def _fake_run(job, tts=None):
    """A run summary for a scheduled job: NetSense gets there in 2 s; twins as given; others in 4 s."""
    t = {"netsense": 2.0}.get(job["contender"], 4.0) if tts is None else tts.get(job["contender"], 4.0)
    reached = t is not None and (t <= job["cap_s"])
    return {"contender": job["contender"], "tts_s": t if reached else None, "train_s": t if reached else job["cap_s"],
            "samples_per_s": 100.0 / (t or 10.0), "job": job}


def test_the_schedule_caps_twins_at_a_multiple_of_netsense_and_reruns_the_close_ones():
    cfg = plan.preset("full")["digits"]
    jobs = []
    tts = {"netsense": 4.0, "powersgd": 3.0, "int8": 3.2, "fp16": None, "bf16": None, "topk": 3.9}

    def execute(job):
        jobs.append(job)
        return _fake_run(job, tts)

    plan.run_workload("digits", cfg, execute)
    seen = [(j["contender"], j["trace"], j["rep"]) for j in jobs]
    assert seen[0] == ("ideal", None, 0) and seen[1] == ("ideal_sync", None, 0)
    dyn = [j for j in jobs if j["trace"] == "dynamic"]
    # NetSense first, stopped at the target on the dynamic trace, trained on to the quality steps on static ones
    assert dyn[0]["contender"] == "netsense" and dyn[0]["stop_at_target"] and dyn[0]["cap_s"] == cfg["cap_s"]
    # a run stopped at the target is bounded by its cap, not by the quality steps (PowerSGD needs more steps)
    assert dyn[0]["steps"] == plan.STEPS_TO_TARGET * cfg["quality_steps"]
    twins0 = [j for j in dyn if j["contender"] in TWINS and j["rep"] == 0]
    # the likely best twin first, capped at 1.4x NetSense's time; the others at 1.1x the best twin so far
    assert [j["contender"] for j in twins0] == list(cfg["twin_order"])
    assert twins0[0]["cap_s"] == pytest.approx(plan.TWIN_FACTOR["dynamic"] * 4.0)
    assert all(j["stop_at_target"] and j["cap_s"] == pytest.approx(plan.RERUN_WITHIN * 3.0) for j in twins0[1:])
    # the second repeat reruns the twins within 1.1x of the best one (3.0 s), the fastest first: not top-k (capped)
    assert [j["contender"] for j in dyn if j["contender"] in TWINS and j["rep"] == 1] == ["powersgd", "int8"]
    ns20 = [j for j in jobs if j["trace"] == "20m" and j["contender"] == "netsense"]
    assert [j["rep"] for j in ns20] == [0, 1] and not any(j["stop_at_target"] for j in ns20)
    assert all(j["steps"] == cfg["quality_steps"] for j in ns20)
    static = [j for j in jobs if j["trace"] == "20m" and j["contender"] in TWINS and j["rep"] == 0]
    assert static[0]["cap_s"] == pytest.approx(plan.TWIN_FACTOR["static"] * 4.0)
    base = [j for j in jobs if j["contender"] in plan.BASELINES and j["role"] == "run"]
    assert {(j["contender"], j["trace"]) for j in base} == {(b, t) for b in plan.BASELINES
                                                             for t in cfg["baseline_traces"]}
    assert all(j["rep"] == 0 and j["stop_at_target"] for j in base)
    assert all(j["cap_s"] == pytest.approx(plan.BASELINE_FACTOR * 4.0) for j in base)
    quality = [j for j in jobs if j["role"] == "quality"]
    assert [(j["contender"], j["trace"], j["steps"]) for j in quality] == [("ddp", "unshaped", cfg["quality_steps"])]
    # the congestion trace: NetSense alone, once
    assert [(j["contender"], j["rep"]) for j in jobs if j["trace"] == "congestion"] == [("netsense", 0)]


def test_presets_measure_what_the_targets_need():
    for name in plan.PRESETS:
        p = plan.preset(name)
        for wl in ("digits", "gpt"):
            assert "dynamic" in p[wl]["target_traces"] and p[wl]["repeats"] >= 2, (name, wl)
        assert "100m" in p["cnn"]["target_traces"] and p["cnn"]["repeats"] >= 2 and p["cnn"]["ref_repeats"] >= 2
    full = plan.preset("full")
    for cfg in full.values():
        assert set(cfg["target_traces"]) >= {"20m", "100m", "1g", "unshaped", "dynamic"}
    jobs = []
    plan.run_workload("cnn", plan.preset("quick")["cnn"], lambda j: jobs.append(j) or _fake_run(j))
    assert [j["contender"] for j in jobs] == ["ideal", "ideal_sync", "netsense", "netsense", "ideal_sync", "ideal"]
    assert all(j["steps"] == plan.BENCH["cnn"]["steps"] for j in jobs)
    sub = select(plan.preset("full"), ["gpt"], ["dynamic"], 3, 5.0)
    assert list(sub) == ["gpt"] and sub["gpt"]["target_traces"] == ["dynamic"] and sub["gpt"]["repeats"] == 3
    assert sub["gpt"]["baseline_traces"] == ["dynamic"] and sub["gpt"]["cap_s"] == 5.0


# ---------------------------------------------------------------------------------------------- contenders
def test_twins_hold_netsenses_options_and_first_step():
    pytest.importorskip("lightning_netsense")
    from contenders import TwinPolicy

    from lightning_netsense.adaptive import NetSensePolicy
    from lightning_netsense.hook import NetSenseState

    defaults = {d.mode: d for d in NetSensePolicy().candidates()}
    for mode in TWINS:
        twin = TwinPolicy(mode)
        assert twin.decision == defaults[mode] and not twin.uses_link_estimate
        state = NetSenseState(policy=twin)
        # the state allows only stateless codecs in the first step without probes; int8 is among them
        first = state._first_decision(2)
        assert first == NetSensePolicy().first_decision(tuple(defaults.values()), 2) == defaults["int8"]
        assert state.probe_every == 2 and not state._probes_link  # a twin never probes
    assert TwinPolicy("powersgd").decision.key == "powersgd(bits=16,rank=8)"
    assert TwinPolicy("topk").decision.key == "topk(density=0.01)"
    with pytest.raises(ValueError, match="mode"):
        TwinPolicy("none")


def test_every_contender_is_a_lightning_strategy_and_the_standin_is_labelled():
    pytest.importorskip("lightning_netsense")
    from contenders import build_strategy
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_netsense import AIMDPolicy, NetSensePolicy, NetSenseStrategy

    assert build_strategy("ideal", 0, 2) == (None, False)
    for name in CONTENDERS[1:]:
        strategy, standin = build_strategy(name, 1, 2, torch_powersgd=False)
        assert isinstance(strategy, DDPStrategy), name
        assert strategy.cluster_environment.global_rank() == 1 and strategy.cluster_environment.world_size() == 2
        assert standin == (name == "torch_powersgd")
    assert type(build_strategy("netsense", 0, 2)[0].policy) is NetSensePolicy
    assert isinstance(build_strategy("aimd", 0, 2)[0].policy, AIMDPolicy)
    hooked, standin = build_strategy("torch_powersgd", 0, 2, torch_powersgd=True)
    assert not isinstance(hooked, NetSenseStrategy) and not standin
    assert "stand-in" in LABELS["torch_powersgd_standin"] and "twin" in LABELS["powersgd"]


def test_skip_exchange_hook_returns_the_local_gradient_at_once():
    pytest.importorskip("lightning_netsense")
    import torch
    from contenders import skip_exchange_hook

    class _Bucket:  # what the hook reads of DDP's GradBucket
        tensor = torch.arange(4.0)

        def buffer(self):
            return self.tensor

    bucket = _Bucket()
    fut = skip_exchange_hook(None, bucket)
    assert fut.done() and fut.value() is bucket.tensor


# ---------------------------------------------------------------------------------------------- output
def test_slim_results_round_trip_through_json_tables_and_plots(tmp_path):
    log = [[999.99, "rate", 20.0], [1000.0, "go", 0], [1001.0, "rate", 1000.0]]
    extra = lambda i: {"bw_mbit": 20.0 if i < 3 else 900.0, "mode": "powersgd(bits=16,rank=8)", "hook_bytes": 1.0,
                       "probe_s": 0.01 if i == 2 else 0.0, "probe_bytes": 10.0 if i == 2 else 0.0}
    outs = {"netsense": _out("netsense", 0.5, [0.1, 0.92, 0.95], n=10, steps_extra=extra, trace_log=log),
            "int8": _out("int8", 0.6, [0.1, 0.91, 0.95], n=10),
            "ddp": _out("ddp", 0.1, [0.1, 0.95, 0.96], trace="unshaped", role="quality", n=10)}
    runs = [report.summarise_run(o) for o in outs.values()]
    report.compare(runs)
    series = {}
    for c, o in outs.items():
        trace = "quality" if c == "ddp" else "dynamic"
        r0 = o["ranks"][0]
        series[f"digits/{trace}/{c}/0"] = {"steps": r0["steps"], "evals": r0["evals"], "trace_log": o["trace_log"],
                                           "t_go": o["t_go"]}
    full = {"runs": runs, "series": series, "targets": targets.evaluate_targets(runs, {}), "preset": "quick",
            "seconds": 65.0, "name": "results_quick", "failures": [], "pilot_torch_powersgd": {}}
    small = json.loads(json.dumps(slim(full)))
    assert "steps" in small["series"]["digits/dynamic/netsense/0"]
    assert "steps" not in small["series"]["digits/dynamic/int8/0"]  # evaluations only
    assert small["series"]["digits/dynamic/netsense/0"]["steps"][0]["wall"] == pytest.approx(1000.5)
    page = markdown_report.render(small, notes="## Why\n\nBecause.")
    assert "| dynamic | 0 | 2.5 | int8 (3.0 s) | 0.83 |" in page and page.rstrip().endswith("Because.")
    assert re.search(r"\| MISS \| dynamic \(digits\): NetSense's time to target / the best twin's: 0.833x", page)
    pytest.importorskip("matplotlib")
    import plots

    paths = plots.make_all(small, str(tmp_path))
    assert {os.path.basename(p) for p in paths} == {"sensing_digits.png", "quality_digits.png",
                                                    "throughput_digits.png"}
    assert all(os.path.getsize(p) > 1000 for p in paths)
    xs, ys = plots.rate_steps([(0.0, 20.0), (1.0, None)], 3.0)
    assert ys == [20.0, 20.0, plots._UNSHAPED_MBIT, plots._UNSHAPED_MBIT] and xs[-1] == 3.0


def test_socket_bytes_counts_only_this_process():
    ss = ("ESTAB 0 0 10.231.0.1:40000 10.231.0.2:5201 users:((\"python\",pid=42,fd=7))\n"
          "\t cubic bytes_sent:1000 bytes_acked:1001 segs_out:3\n"
          "ESTAB 0 0 10.231.0.1:40001 10.231.0.2:5201 users:((\"python\",pid=421,fd=3))\n"
          "\t cubic bytes_sent:999999\n"
          "ESTAB 0 0 10.231.0.1:40002 10.231.0.2:29512 users:((\"python\",pid=42,fd=9))\n"
          "\t bbr bytes_sent:234 bytes_received:5\n")
    assert socket_bytes(ss, 42) == 1234
    assert socket_bytes(ss, 7) == 0


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


@pytest.mark.slow
def test_jobs_run_through_the_lightning_trainer_on_two_ranks(tmp_path):
    """Two long-lived ranks on loopback run plain DDP and NetSense through lightning.Trainer: same data and model,
    agreed stops and evaluations, NetSense's per-step mode and estimate."""
    pytest.importorskip("sklearn")
    from step_cost import Loopback

    d = Driver(Loopback(), str(tmp_path))
    d.start()
    try:
        cfg = dict(plan.BENCH["digits"], quality_steps=6, eval_every=3, eval_every_s=0.0)
        outs = {c: d.run(plan.job_spec("digits", c, None, cfg), None) for c in ("ddp", "netsense")}
        capped = d.run(plan.job_spec("digits", "int8", None, dict(cfg, target=0.0), stop_at_target=True), None)
    finally:
        d.stop()
    for c, out in outs.items():
        r0, r1 = out["ranks"]
        assert [s["step"] for s in r0["steps"]] == list(range(1, 7)) and r0["stop"] == "steps", c
        assert [e["step"] for e in r0["evals"]] == [0, 3, 6] == [e["step"] for e in r1["evals"]]
        assert [e["value"] for e in r0["evals"]] == [e["value"] for e in r1["evals"]]  # one model, two ranks
        assert r0["timing"]["setup_s"] >= 0 and r0["socket_bytes"] > 0
    ns = outs["netsense"]["ranks"][0]
    assert ns["steps"][0]["mode"] == "int8" and sum(ns["mode_steps"].values()) == 6  # NetSense's first step
    assert all("bw_mbit" in s and "probe_s" in s for s in ns["steps"])
    assert "mode" not in outs["ddp"]["ranks"][0]["steps"][0]
    # the same data and weights: the first evaluation is the same for both
    assert outs["ddp"]["ranks"][0]["evals"][0]["value"] == ns["evals"][0]["value"]
    assert capped["ranks"][0]["stop"] == "target" and len(capped["ranks"][0]["steps"]) == 3
