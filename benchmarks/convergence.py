"""Quality per step of every mode and of the default policy, on each workload (2 gloo ranks on loopback).

    python benchmarks/convergence.py [--workloads gpt,digits,cnn] [--contenders none,fp16,...,netsense]
                                     [--seeds 0,1] [--steps 100] [--every 10] [--out results.json]

The link is not shaped: this measures what each mode does to training, step for step, with the same model, data
order and seed for every contender. ``netsense`` is ``NetSensePolicy()`` with default arguments; each codec name is
``FixedPolicy`` with NetSensePolicy's default options for it (PowerSGD rank 8 in bfloat16, top-k 1 %);
``torch_fp16`` is torch's own ``fp16_compress_hook``. Printed per contender and seed: the evaluation at each
checkpoint (validation loss in nats for ``gpt``, test accuracy for ``digits``, training loss for ``cnn``), the
modes run, and the mean relative gradient and update errors the hook measured.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from queue import Empty
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CODEC_MODES = ("none", "fp16", "bf16", "int8", "powersgd", "topk")
CONTENDERS = (*CODEC_MODES, "netsense", "torch_fp16")


def make_policy(name: str) -> Any:
    """The policy of contender ``name`` (``None`` for a contender that is one of torch's hooks)."""
    from lightning_netsense import FixedPolicy, NetSensePolicy

    if name == "netsense":
        return NetSensePolicy()
    if name.startswith("seq:"):
        return _Sequence(name[4:])
    if name in CODEC_MODES:
        options = NetSensePolicy().candidates()
        decision = next(d for d in options if d.mode == name)
        return FixedPolicy(mode=name, **dict(decision.options))
    return None


class _SequencePolicy:
    pass


def _Sequence(spec: str) -> Any:
    """``"bf16x1+powersgdx3+none"``: modes for a number of steps each, the last one for the rest."""
    from lightning_netsense import Decision, NetSensePolicy, Policy

    defaults = {d.mode: d for d in NetSensePolicy().candidates()}
    plan = []
    for part in spec.split("+"):
        mode, _, count = part.partition("x")
        plan.append((defaults[mode], int(count) if count else None))

    class SequencePolicy(Policy):
        uses_link_estimate = True

        def __init__(self) -> None:
            self.step = 0

        def candidates(self):
            return tuple({d.mode: d for d, _ in plan}.values())

        def _at(self, step: int) -> Decision:
            for decision, count in plan:
                if count is None or step < count:
                    return decision
                step -= count
            return plan[-1][0]

        def first_decision(self, allowed, world_size):
            return self._at(0)

        def decide(self, observation):
            self.step = observation.step + 1
            return self._at(self.step)

    return SequencePolicy()


def _train(
    rank: int, name: str, workload: str, seed: int, steps: int, every: int, options: dict[str, Any]
) -> dict[str, Any]:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
    from torch.nn.parallel import DistributedDataParallel as DDP
    from workloads import make_workload

    from lightning_netsense.hook import NetSenseState, netsense_hook

    work = make_workload(workload, rank, 2, seed=seed, **options)
    model = DDP(work.model, forward_sync_buffers=False)
    policy = make_policy(name)
    state = None
    if policy is not None:
        state = NetSenseState(policy=policy)
        model.register_comm_hook(state, netsense_hook)
    elif name == "torch_fp16":
        model.register_comm_hook(None, fp16_compress_hook)
    opt = work.make_optimizer(model)
    if state is not None:
        from lightning_netsense.update_error import SecondMoments

        state.second_moments = SecondMoments([opt])
    evaluate = work.evaluate
    if evaluate is None:  # throughput workload: the mean training loss of the last `every` steps
        window: list[float] = []
        evaluate = lambda m: statistics.fmean(window[-every:])
    curve, update_errors, rel_errors, trace = [], [], [], []
    if rank == 0 and work.evaluate is not None:
        curve.append((0, evaluate(work.model)))
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = next(work.batches)
        opt.zero_grad(set_to_none=True)
        if state is not None:
            state.begin_step()
        loss = work.loss(model(x), y)
        if state is not None:
            state.begin_backward()
        loss.backward()
        if state is not None:
            state.end_step()
            obs = state.last_observation
            rel_errors.append(obs.rel_error)
            update_errors.append(obs.update_error)
            trace.append(
                (obs.decision.mode, round(obs.update_error, 3), round(obs.sign_flips, 3),
                 {m: (None if p.update_error is None else round(p.update_error, 3)) for m, p in obs.codecs.items()})
            )
        opt.step()
        if work.evaluate is None:
            window.append(float(loss))
        if step % every == 0 and rank == 0:
            curve.append((step, evaluate(work.model)))
    seconds = time.perf_counter() - t0
    return {
        "metric": work.metric if work.evaluate is not None else "loss",
        "curve": curve,
        "modes": dict(state.mode_steps) if state is not None else {name: steps},
        "rel_error": rel_errors,
        "update_error": update_errors,
        "trace": trace,
        "seconds": seconds,
    }


def _rank(rank: int, port: int, jobs: list[tuple], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for job in jobs:
        out = _train(rank, *job)
        if rank == 0:
            queue.put((job, out))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(jobs: list[tuple], timeout: float = 3600.0):
    """Run ``(contender, workload, seed, steps, every)`` jobs on 2 ranks; yield ``(job, result)`` as they end."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, jobs, queue)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for _ in jobs:
        while True:  # a rank that fails must not leave this waiting for its result
            try:
                yield queue.get(timeout=1.0)
                break
            except Empty:
                failed = [proc.exitcode for proc in procs if proc.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    for proc in procs:
                        proc.kill()
                    raise RuntimeError(f"a rank failed or timed out (exit codes {failed})") from None
    for proc in procs:
        proc.join()


def _mean(xs: list[float]) -> float:
    vals = [x for x in xs if x == x]
    return statistics.fmean(vals) if vals else float("nan")


#: progress per step credited to PowerSGD and top-k before this measurement replaced it (``1 - e**2`` of the fixed
#: priors 0.8 and 0.9 that had been fitted to the digits benchmark)
OLD_PRIORS = {"powersgd": 1 - 0.8**2, "topk": 1 - 0.9**2}


def steps_to(curve: list, target: float, higher: bool) -> int | None:
    """First evaluated step whose value reaches ``target`` (``None`` if none does)."""
    return next((step for step, v in curve if (v >= target if higher else v <= target) and step > 0), None)


def summary(results: list[dict], at: float = 0.5) -> list[dict]:
    """Per workload and seed: the target is what plain DDP reaches at ``at`` of the run; per mode, the steps to it,
    the observed progress per step (plain DDP's steps over the mode's), the progress the measured update error
    predicts (the mean of ``1 - e**2`` over the mode's steps) and the old fixed prior's."""
    rows = []
    for (workload, seed) in sorted({(r["workload"], r["seed"]) for r in results}):
        runs = {r["contender"]: r for r in results if (r["workload"], r["seed"]) == (workload, seed)}
        plain = runs.get("none")
        if plain is None:
            continue
        higher = plain["metric"] == "accuracy"
        checkpoint = max(step for step, _ in plain["curve"]) * at
        target = next(v for step, v in plain["curve"] if step >= checkpoint)
        reference = steps_to(plain["curve"], target, higher)
        for name, run in runs.items():
            reached = steps_to(run["curve"], target, higher)
            errors = [e for e in run["update_error"] if e == e]
            rows.append({
                "workload": workload, "seed": seed, "contender": name, "target": target, "steps": reached,
                "observed": (reference / reached) if reached else 0.0,
                "predicted": _mean([max(1 - e * e, 0.0) for e in errors]) if name in CODEC_MODES else float("nan"),
                "old_prior": OLD_PRIORS.get(name, float("nan")),
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="gpt")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--out", default=None, help="write every curve to this JSON file")
    p.add_argument("--trace", action="store_true", help="print the measured errors of some steps")
    p.add_argument("--option", action="append", default=[], help="workload option NAME=VALUE (repeatable)")
    args = p.parse_args(argv)
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    jobs = [
        (name, workload, int(seed), args.steps, args.every, options)
        for workload in args.workloads.split(",")
        for seed in args.seeds.split(",")
        for name in args.contenders.split(",")
    ]
    results = []
    for (name, workload, seed, *_), out in run(jobs):
        curve = " ".join(f"{v:.3f}" for _, v in out["curve"])
        print(
            f"{workload:6} {name:10} seed {seed}: {curve} | modes {out['modes']} | grad err "
            f"{_mean(out['rel_error']):.3f} update err {_mean(out['update_error']):.3f} | {out['seconds']:.1f} s",
            flush=True,
        )
        if args.trace:
            for i, t in enumerate(out["trace"]):
                if i < 12 or i % 10 == 0:
                    print("   ", i + 1, t)
        results.append({"workload": workload, "contender": name, "seed": seed, **out})
    print("\nprogress per step against plain DDP (steps to plain DDP's value at half the run):")
    print(f"{'workload':8} {'seed':>4} {'contender':>10} {'target':>7} {'steps':>5} {'observed':>8} {'predicted':>9} "
          f"{'old prior':>9}")
    rows = summary(results)
    for row in rows:
        print(f"{row['workload']:8} {row['seed']:>4} {row['contender']:>10} {row['target']:7.3f} "
              f"{row['steps'] if row['steps'] is not None else '-':>5} {row['observed']:8.2f} {row['predicted']:9.2f} "
              f"{row['old_prior']:9.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": results, "summary": rows}, f)


if __name__ == "__main__":
    main()
