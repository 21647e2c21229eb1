"""Every mode on CUDA/NCCL: milliseconds per step, host-device syncs inside the backward pass, bytes, estimate.

    python benchmarks/gpu_check.py [--steps 30] [--dtypes float32,bfloat16] [--size 2048]

Runs on one GPU (world size 1, NCCL) and, where the machine has several, on all of them (one process per GPU).
A model of four ``size x size`` layers trains for ``--steps`` steps per mode and dtype through the hook; from the
fifth step on (buckets rebuilt, codec state built), the forward and backward passes - the hook body and its
completion callbacks - run under ``torch.cuda.set_sync_debug_mode("warn")``, and every synchronisation the device
reports is counted. The step boundary (``NetSenseState.end_step``) reads the step's statistics once, by design, and
runs outside it. Needs a CUDA device; CI and the tests do not use it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

MODES = {
    "none": {},
    "fp16": {},
    "bf16": {},
    "int8": {},
    "powersgd": {"rank": 8, "bits": 16},
    "topk": {"density": 0.01},
}
_STEADY = 4


def _run_mode(mode: str, dtype: torch.dtype, steps: int, size: int, device: torch.device) -> dict:
    from lightning_netsense import FixedPolicy
    from lightning_netsense.hook import NetSenseState, netsense_hook
    from lightning_netsense.update_error import SecondMoments

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(size, size), nn.GELU())]).to(device, dtype)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    state = NetSenseState(policy=FixedPolicy(mode=mode, **MODES[mode]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state.second_moments = SecondMoments([opt])
    ddp.register_comm_hook(state, netsense_hook)
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    syncs, times = 0, []
    for step in range(steps):
        x = torch.randn(64, size, device=device, dtype=dtype, generator=gen)
        steady = step >= _STEADY
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if steady:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.zero_grad(set_to_none=True)
                state.begin_step()
                loss = ddp(x).float().square().mean()
                state.begin_backward()
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs += sum("synchroniz" in str(w.message) for w in caught) if steady else 0
        state.end_step()
        opt.step()
        torch.cuda.synchronize(device)
        if steady:
            times.append(time.perf_counter() - t0)
    obs = state.last_observation
    return {
        "ms": 1e3 * sorted(times)[len(times) // 2] if times else float("nan"),
        "syncs": syncs,
        "bytes": obs.bytes_sent,
        "dense": obs.dense_bytes,
        "estimate_mbit": obs.link.bandwidth * 8 / 1e6,
        "update_error": obs.update_error,
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    try:
        for dtype_name in args.dtypes.split(","):
            for mode in MODES:
                try:
                    out = _run_mode(mode, getattr(torch, dtype_name), args.steps, args.size, device)
                except Exception as err:  # noqa: BLE001 - reported per mode, the others still run
                    out = {"error": f"{type(err).__name__}: {err}"}
                if rank == 0:
                    queue.put((world, dtype_name, mode, out))
    finally:
        dist.destroy_process_group()
        if rank == 0:
            queue.put(None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--size", type=int, default=2048)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA device")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s)", flush=True)
    worlds = [1] + ([torch.cuda.device_count()] if torch.cuda.device_count() > 1 else [])
    ctx = mp.get_context("spawn")
    print(f"{'world':>5} {'dtype':>9} {'mode':>9} {'ms/step':>8} {'syncs':>5} {'MB sent':>8} {'ratio':>6} "
          f"{'est Mbit/s':>10} {'upd err':>7}", flush=True)
    for world in worlds:
        queue = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
        for proc in procs:
            proc.start()
        while (item := queue.get(timeout=600)) is not None:
            w, dtype_name, mode, out = item
            if "error" in out:
                print(f"{w:>5} {dtype_name:>9} {mode:>9} ERROR {out['error']}", flush=True)
                continue
            ratio = out["dense"] / out["bytes"] if out["bytes"] > 0 else float("nan")
            print(f"{w:>5} {dtype_name:>9} {mode:>9} {out['ms']:8.2f} {out['syncs']:5d} {out['bytes'] / 1e6:8.2f} "
                  f"{ratio:6.1f} {out['estimate_mbit']:10.0f} {out['update_error']:7.3f}"
                  f"{'' if out['finite'] else '  NON-FINITE'}", flush=True)
        for proc in procs:
            proc.join()


if __name__ == "__main__":
    main()
