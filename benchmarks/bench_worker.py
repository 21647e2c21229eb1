"""One rank of the shaped-link benchmark, started inside a network namespace by ``shaped_bench.py``.

The process lives for the whole benchmark (importing torch and Lightning costs 5-15 s on this machine; paying it
once per rank instead of once per run keeps the quick run short) and runs jobs the driver hands it through files
in ``--control``:

1. wait for ``job_<i>.json`` (or ``quit``);
2. run it through a fresh ``lightning.Trainer`` (``bench_trainer.run_job``): the Trainer wraps the model in DDP on
   the unshaped link, then the rank writes ``ready_<i>_<rank>`` and waits for ``go_<i>`` while the driver puts
   the link into the trace's starting state, and trains until the step budget, the time cap or the target;
3. write ``result_<i>_<rank>.json``: per step the training clock, wall time (``time.time()``, comparable with
   the driver's clock across namespaces), the mode that ran, the link estimate and the probe of the boundary
   (``NetSenseStrategy`` contenders); the evaluations; the steps per mode; the TCP payload this process sent on
   its own sockets during training (``socket_bytes``: competing flows excluded), and the veth's byte counters.

The process group is initialised once, here; every job's Trainer finds it initialised and uses it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
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
    import lightning  # noqa: F401  - imported once here, not inside the first job's clock
    import torch
    import torch.distributed as dist

    import lightning_netsense  # noqa: F401

    # the Trainer's banner lines and per-job warnings (no GPU, infinite dataset, few loader workers) say nothing
    # about the benchmark: keep the logs to what does
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    from bench_trainer import run_job

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
            tx0, rx0 = counters.read()
            result = run_job(job, args.rank, args.world_size, args.control, sent_bytes=_own_socket_bytes)
            tx1, rx1 = counters.read()
            result["veth_tx"], result["veth_rx"] = tx1 - tx0, rx1 - rx0
        except Exception:
            _write_json(os.path.join(args.control, f"error_{job['id']}_{args.rank}.json"),
                        {"error": traceback.format_exc()[-4000:]})
            raise
        _write_json(os.path.join(args.control, f"result_{job['id']}_{args.rank}.json"), result)
        del result
        gc.collect()  # the last job's model, optimizer and Trainer, before the next one is built
        i += 1
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
