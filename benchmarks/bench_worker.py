"""One rank of the shaped-link benchmark, started inside a network namespace by ``shaped_bench.py``.

The process lives for the whole benchmark (importing torch and Lightning costs 5-15 s on this machine; paying it
once per rank instead of once per run keeps the quick run short) and runs jobs the driver hands it through files
in ``--control``:

1. wait for ``job_<i>.json`` (or ``quit``); build the workload and the contender (same seed everywhere);
2. write ``ready_<i>_<rank>`` and wait for ``go_<i>``: meanwhile the driver puts the link into the trace's
   starting state (model set-up, e.g. DDP's initial broadcast, runs on an unshaped link);
3. train up to ``steps`` steps or until the *training* clock (wall time minus evaluation) passes ``cap_s``.
   The ranks agree on stopping and on evaluating with a two-float ``all_reduce`` after every step, so that they
   stop and evaluate at the same steps (one rank stopping alone would leave the other in a collective). At
   step 0, every ``eval_every`` steps, once ``eval_every_s`` training seconds passed since the last evaluation,
   and at the end, both ranks evaluate on the test split (outside the training clock);
4. write ``result_<i>_<rank>.json``: per step the training clock, wall time (``time.time()``, comparable with
   the driver's clock across namespaces), the mode used and the link estimate (hook-based contenders), the
   bytes the veth sent and received; the evaluations; the steps per mode; the TCP payload this process sent on
   its own sockets during training (``socket_bytes``: competing flows excluded).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))


def _wait_for(path: str, timeout: float, also: str | None = None) -> str | None:
    """Poll until ``path`` (or ``also``) exists; return the one found, ``None`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return path
        if also and os.path.exists(also):
            return also
        time.sleep(0.005)
    return None


def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)  # the driver never reads a half-written file


class _Counters:
    """Byte counters of this namespace's veth (``/sys`` is this namespace's under ``ip netns exec``)."""

    def __init__(self, ifname: str | None) -> None:
        self.paths = None
        if ifname:
            base = f"/sys/class/net/{ifname}/statistics"
            self.paths = (f"{base}/tx_bytes", f"{base}/rx_bytes")

    def read(self) -> tuple[int, int]:
        if self.paths is None:
            return 0, 0
        out = []
        for p in self.paths:
            with open(p) as f:
                out.append(int(f.read()))
        return out[0], out[1]


def socket_bytes(ss_output: str, pid: int) -> int:
    """Sum of ``bytes_sent`` over the TCP sockets of process ``pid`` in ``ss -tinpH`` output.

    Counting this process's own sockets (gloo's connections) keeps the competing flows of the congestion trace,
    which cross the same veth, out of the count; it is TCP payload, without headers and ACKs.
    """
    total = 0
    mine = False
    for line in ss_output.splitlines():
        if not line.startswith((" ", "\t")):  # a socket's first line: addresses and owning processes
            mine = f"pid={pid}," in line
        elif mine:
            m = re.search(r"\bbytes_sent:(\d+)", line)
            if m:
                total += int(m.group(1))
    return total


def _own_socket_bytes() -> int:
    try:
        out = subprocess.run(["ss", "-tinpH"], check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return socket_bytes(out, os.getpid())


def run_job(job: dict[str, Any], rank: int, world: int, control: str, counters: _Counters) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from contenders import build
    from workloads import loss_fn, make_workload

    jid = job["id"]
    work = make_workload(job["workload"], rank, world, seed=job["seed"], **job.get("workload_options", {}))
    contender = build(job["contender"], work.model, torch_powersgd=job.get("torch_powersgd", False),
                      bucket_cap_mb=job.get("bucket_cap_mb"))
    model = contender.model
    opt = work.make_optimizer(model)
    eval_module = work.model  # DDP shares the module: evaluating it needs no collective
    accuracy = work.evaluate  # None for throughput-only workloads
    synced = job["contender"] != "ideal"

    if synced:
        dist.barrier()
    open(os.path.join(control, f"ready_{jid}_{rank}"), "w").close()
    if _wait_for(os.path.join(control, f"go_{jid}"), job.get("go_timeout", 120.0)) is None:
        raise RuntimeError(f"no go_{jid} from the driver")

    steps: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    flag = torch.zeros(2)  # [time cap reached, evaluation due]
    eval_every_s = float(job.get("eval_every_s") or float("inf"))
    t_go = time.time()
    train = 0.0
    tx0, rx0 = counters.read()
    sock0 = _own_socket_bytes() if synced else 0
    stop_reason = "steps"

    def evaluate(step: int) -> None:
        if accuracy is None:
            return
        t = time.perf_counter()
        acc = accuracy(eval_module)
        evals.append({"step": step, "train_s": train, "acc": acc, "eval_s": time.perf_counter() - t})

    evaluate(0)
    for step in range(1, job["steps"] + 1):
        x, y = next(work.batches)  # drawn outside the clock: data loading is not what is measured
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        contender.begin_step()
        loss = loss_fn(model(x), y)
        contender.begin_backward()
        loss.backward()
        contender.end_step()
        opt.step()
        train += time.perf_counter() - t0
        tx, rx = counters.read()
        rec = {"step": step, "train_s": train, "wall": time.time(), "loss": float(loss.detach()),
               "tx": tx - tx0, "rx": rx - rx0}
        rec.update(contender.step_info())
        steps.append(rec)
        # stop together: the slowest clock decides (a rank stopping alone would hang the other). The same
        # all_reduce agrees on evaluating: every `eval_every` steps, or once `eval_every_s` training seconds
        # passed since the last evaluation, so that time to accuracy has the same resolution in seconds for
        # slow contenders (a 4 s step at 20 Mbit/s) as for fast ones
        t0 = time.perf_counter()
        flag[0] = 1.0 if train >= job["cap_s"] else 0.0
        flag[1] = 1.0 if accuracy is not None and train - evals[-1]["train_s"] >= eval_every_s else 0.0
        if synced:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        train += time.perf_counter() - t0
        if flag[0] > 0:
            stop_reason = "cap"
            break
        if step < job["steps"] and (step % job["eval_every"] == 0 or flag[1] > 0):
            evaluate(step)
    if not evals or evals[-1]["step"] != steps[-1]["step"]:
        evaluate(steps[-1]["step"])
    state = contender.state
    sock1 = _own_socket_bytes() if synced else 0
    result = {
        "id": jid,
        "rank": rank,
        "job": job,
        "t_go": t_go,
        "t_end": time.time(),
        "stop": stop_reason,
        "params": sum(p.numel() for p in work.model.parameters()),
        "batch_size": work.batch_size,
        "standin": contender.standin,
        "steps": steps,
        "evals": evals,
        "mode_steps": dict(state.mode_steps) if state is not None else {contender.fixed_mode: len(steps)},
        "hook_bytes": state.total_bytes_sent if state is not None else None,
        "socket_bytes": sock1 - sock0,
    }
    del contender, model, opt, work, state
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--port", type=int, default=29511)
    p.add_argument("--ifname", default="", help="veth inside this namespace (gloo binds to it; byte counters)")
    p.add_argument("--control", required=True)
    p.add_argument("--first-job", type=int, default=0, help="index of the first job (after a restart)")
    p.add_argument("--idle-timeout", type=float, default=900.0, help="exit when no job comes for this long")
    args = p.parse_args(argv)
    os.environ.update(MASTER_ADDR=args.master_addr, MASTER_PORT=str(args.port), OMP_NUM_THREADS="1")
    if args.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = args.ifname
    sys.path.insert(0, _HERE)
    import torch
    import torch.distributed as dist

    import lightning_netsense  # noqa: F401  - imported once here, not inside the first job's clock

    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world_size, timeout=timedelta(seconds=600))
    counters = _Counters(args.ifname or None)
    open(os.path.join(args.control, f"alive_{args.rank}"), "w").close()
    i = args.first_job
    while True:
        job_path = os.path.join(args.control, f"job_{i}.json")
        found = _wait_for(job_path, args.idle_timeout, also=os.path.join(args.control, "quit"))
        if found != job_path:
            break
        with open(job_path) as f:
            job = json.load(f)
        try:
            result = run_job(job, args.rank, args.world_size, args.control, counters)
        except Exception:
            _write_json(os.path.join(args.control, f"error_{job['id']}_{args.rank}.json"),
                        {"error": traceback.format_exc()[-4000:]})
            raise
        _write_json(os.path.join(args.control, f"result_{job['id']}_{args.rank}.json"), result)
        i += 1
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
