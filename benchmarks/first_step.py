"""Steps to a target accuracy on the digits MLP for each first-step mode, PowerSGD after (2 gloo ranks, loopback).

    python benchmarks/first_step.py [--modes int8,powersgd,topk,none] [--seeds 0,1,2] [--steps 200]

The first step of a DDP wrapper runs on provisional buckets without error feedback (see ``NetSenseState``); this
measures what that step's mode costs in convergence, the link aside: every later step runs PowerSGD rank 8 in
bfloat16 (NetSensePolicy's default), the same data, seed and model for every mode. Measured here (seeds 0/1/2,
first evaluation >= 95 %, every 5 steps): int8 60/75/60, PowerSGD 50/55/70, top-k 1 % 60/50/70, plain 60/75/60.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from queue import Empty

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_OPTIONS = {"powersgd": {"rank": 8, "bits": 16}, "topk": {"density": 0.01}}


def _rank(rank: int, port: int, mode: str, seed: int, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.nn.parallel import DistributedDataParallel as DDP
    from workloads import loss_fn, make_workload

    from lightning_netsense import Decision, Policy
    from lightning_netsense.hook import NetSenseState, netsense_hook

    later = Decision("powersgd", _OPTIONS["powersgd"])
    first = Decision(mode, _OPTIONS.get(mode, {}))

    class FirstThenPowerSGD(Policy):
        # as NetSensePolicy: the state probes the link, and so lets any candidate run in the first step
        uses_link_estimate = True

        def candidates(self):
            return (later,) if first.mode in ("none", "powersgd") else (later, first)

        def first_decision(self, allowed, world_size):
            return first

        def decide(self, observation):
            return later

    work = make_workload("digits", rank, 2, seed=seed)
    model = DDP(work.model, forward_sync_buffers=False)
    state = NetSenseState(policy=FirstThenPowerSGD())
    model.register_comm_hook(state, netsense_hook)
    opt = work.make_optimizer(model)
    accs = []
    for step in range(1, steps + 1):
        x, y = next(work.batches)
        opt.zero_grad(set_to_none=True)
        state.begin_step()
        loss = loss_fn(model(x), y)
        state.begin_backward()
        loss.backward()
        state.end_step()
        opt.step()
        if step % 5 == 0:
            accs.append((step, work.evaluate(work.model)))
    if rank == 0:
        queue.put((accs, dict(state.mode_steps)))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="int8,powersgd,topk,none")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--target", type=float, default=0.95)
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    for mode in args.modes.split(","):
        found = []
        for seed in (int(s) for s in args.seeds.split(",")):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            queue = ctx.Queue()
            procs = [ctx.Process(target=_rank, args=(r, port, mode, seed, args.steps, queue)) for r in (0, 1)]
            for proc in procs:
                proc.start()
            while True:  # a rank that fails must not leave this waiting for its result
                try:
                    accs, modes = queue.get(timeout=1.0)
                    break
                except Empty:
                    failed = [proc.exitcode for proc in procs if proc.exitcode not in (None, 0)]
                    if failed:
                        for proc in procs:
                            proc.kill()
                        raise RuntimeError(f"a rank failed ({mode}, seed {seed}; exit codes {failed})") from None
            for proc in procs:
                proc.join()
            reached = next((step for step, acc in accs if acc >= args.target), None)
            found.append("-" if reached is None else str(reached))
            print(f"{mode:9} seed {seed}: {args.target:.0%} at step {found[-1]}, modes {modes}", flush=True)
        print(f"{mode:9} steps to {args.target:.0%} over seeds {args.seeds}: {'/'.join(found)}", flush=True)


if __name__ == "__main__":
    main()
