"""One rank of a training run across a kernel-shaped link (launched by tests/test_shaped.py inside a namespace).

Plain DDP with ``netsense_hook`` registered (faster to start than a Lightning Trainer; the strategy is tested
elsewhere), on synthetic data. After every step it appends one JSON line to ``--out``: the step, wall-clock
start and end (``time.time()``, comparable across namespaces), the link estimate, the mode the step used and
the decision for the next one, the wire bytes the hook accounted and the bytes the veth really sent.

With ``--pause-at K`` every rank stops after step K, writes ``{"event": "paused", "step": K}`` and waits for
the file ``<control>/resume_K``: the test changes the shaping between two steps that both ranks reached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from datetime import timedelta
from typing import Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--ifname", required=True, help="interface gloo binds to (GLOO_SOCKET_IFNAME)")
    p.add_argument("--out", required=True, help="JSON-lines file written after every step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--policy", choices=("fixed", "netsense"), default="fixed")
    p.add_argument("--modes", default="", help="NetSensePolicy candidate modes, comma-separated (default: all)")
    p.add_argument("--width", type=int, default=512, help="width of the square linear layers")
    p.add_argument("--depth", type=int, default=4, help="number of square linear layers")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bucket-cap-mb", type=float, default=1.0)
    p.add_argument("--pause-at", default="", help="comma-separated steps after which to wait for the test")
    p.add_argument("--control", default="", help="folder where the test writes resume_<step>")
    p.add_argument("--pause-timeout", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=120.0, help="process-group timeout, s (the failure budget)")
    p.add_argument("--straggle", type=float, default=0.0, help="seconds this rank sleeps before each forward")
    return p.parse_args(argv)


def _counters(ifname: str) -> tuple[int, int]:
    # /sys is remounted by `ip netns exec`: these are this namespace's veth counters
    base = f"/sys/class/net/{ifname}/statistics"
    with open(f"{base}/tx_bytes") as tx, open(f"{base}/rx_bytes") as rx:
        return int(tx.read()), int(rx.read())


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    os.environ.update(
        MASTER_ADDR=args.master_addr,
        MASTER_PORT=str(args.port),
        GLOO_SOCKET_IFNAME=args.ifname,
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist
    from torch import nn

    from lightning_netsense.hook import NetSenseState, netsense_hook
    from lightning_netsense.policy import FixedPolicy

    if args.policy == "netsense":
        from lightning_netsense.adaptive import NetSensePolicy

        policy = NetSensePolicy(modes=tuple(args.modes.split(","))) if args.modes else NetSensePolicy()
    else:
        policy = FixedPolicy()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world_size, timeout=timedelta(seconds=args.timeout))
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.depth):
        layers += [nn.Linear(args.width, args.width), nn.Tanh()]
    model = nn.Sequential(*layers)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
    state = NetSenseState(policy=policy)
    ddp.register_comm_hook(state, netsense_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1 + args.rank)
    x = torch.randn(args.batch, args.width, generator=gen)
    y = torch.randn(args.batch, args.width, generator=gen)
    pauses = {int(s) for s in args.pause_at.split(",") if s}
    n_params = sum(p.numel() for p in model.parameters())

    with open(args.out, "a", buffering=1) as out:
        out.write(json.dumps({"event": "start", "rank": args.rank, "params": n_params, "t": time.time()}) + "\n")
        for step in range(args.steps):
            tx0, rx0 = _counters(args.ifname)
            t0 = time.time()
            opt.zero_grad(set_to_none=True)
            if args.straggle:
                time.sleep(args.straggle)  # a slower rank: its buckets reach the collectives late
            state.begin_backward()
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            decision = state.end_step()
            opt.step()
            t1 = time.time()
            tx1, rx1 = _counters(args.ifname)
            obs = state.last_observation
            link = obs.link
            last = state.estimator.state_dict()["steps"][-1]
            record = {
                "event": "step",
                "rank": args.rank,
                "step": step,
                "t_start": t0,
                "t_end": t1,
                "bandwidth_mbit": link.bandwidth * 8 / 1e6,
                "max_bandwidth_mbit": link.max_bandwidth * 8 / 1e6,
                "alpha": link.alpha,
                "mode": obs.decision.mode,
                "decision": decision.key if decision is not None else None,
                "bytes_sent": obs.bytes_sent,
                "comm_time": obs.comm_time,
                "backward_time": obs.backward_time,
                "overlap_time": obs.overlap_time,
                "exposed_comm_time": obs.exposed_comm_time,
                "step_time": obs.step_time,
                "tx_bytes": tx1 - tx0,
                "rx_bytes": rx1 - rx0,
                "sample_bytes": last[0],
                "sample_seconds": last[1],
            }
            out.write(json.dumps(record) + "\n")
            if step in pauses:
                out.write(json.dumps({"event": "paused", "rank": args.rank, "step": step}) + "\n")
                flag = os.path.join(args.control, f"resume_{step}")
                deadline = time.monotonic() + args.pause_timeout
                while not os.path.exists(flag):
                    if time.monotonic() > deadline:
                        sys.exit(f"rank {args.rank}: no {flag} within {args.pause_timeout} s")
                    time.sleep(0.01)
        dist.barrier()
        # the replicas' parameters, bit for bit (the fault tests compare them across ranks)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
        out.write(json.dumps({"event": "done", "rank": args.rank, "t": time.time(), "params_sha256": digest}) + "\n")
    # Leave without tearing the process group down: rank 0 (the TCPStore host) hung in destroy_process_group /
    # interpreter shutdown once the other rank had gone. Everything is written and the barrier passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def read_lines(path: str) -> list[dict[str, Any]]:
    """Parsed JSON lines of one rank's output file (a partly written last line is skipped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out


def drive(
    link: Any,
    out_dir: str,
    steps: int,
    schedule: Mapping[int, Callable[[], None]] | None = None,
    worker_args: Sequence[str] = (),
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Run one rank in each namespace of ``link`` and apply ``schedule`` between steps.

    ``schedule[K]`` (e.g. ``lambda: link.set_rate(20)``) runs once both ranks have finished step K and are
    waiting; the ranks resume when it returns. Returns ``{"ranks": [records of rank 0, of rank 1],
    "changes": {K: time.time() when applied}, "seconds": wall time}``.

    Raises:
        RuntimeError: if a rank fails or the run exceeds ``timeout`` (with the ranks' error output).
    """
    schedule = dict(schedule or {})
    os.makedirs(out_dir, exist_ok=True)
    outs = [os.path.join(out_dir, f"rank{r}.jsonl") for r in (0, 1)]
    t_begin = time.time()
    procs = []
    with ExitStack() as stack:
        errs = [stack.enter_context(open(os.path.join(out_dir, f"rank{r}.err"), "w")) for r in (0, 1)]
        for r in (0, 1):
            cmd = [
                sys.executable, os.path.abspath(__file__),
                "--rank", str(r), "--master-addr", link.address(0), "--ifname", link.ifname(r),
                "--out", outs[r], "--steps", str(steps), "--control", out_dir,
                "--pause-at", ",".join(str(k) for k in sorted(schedule)), *worker_args,
            ]
            procs.append(link.popen(r, cmd, stdout=errs[r], stderr=subprocess.STDOUT))
        changes: dict[int, float] = {}
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            for k in sorted(set(schedule) - set(changes)):
                paused = [any(e.get("event") == "paused" and e["step"] == k for e in read_lines(o)) for o in outs]
                if all(paused):
                    schedule[k]()
                    changes[k] = time.time()
                    open(os.path.join(out_dir, f"resume_{k}"), "w").close()
            time.sleep(0.02)
        codes = [p.poll() for p in procs]
        if codes != [0, 0]:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            tails = []
            for r in (0, 1):
                errs[r].flush()
                with open(errs[r].name) as f:
                    tails.append(f"--- rank {r} (exit {codes[r]}):\n" + f.read()[-3000:])
            reason = "timed out" if None in codes else "failed"
            raise RuntimeError(f"shaped run {reason} after {time.time() - t_begin:.0f} s\n" + "\n".join(tails))
    return {"ranks": [read_lines(o) for o in outs], "changes": changes, "seconds": time.time() - t_begin}


if __name__ == "__main__":
    main()
