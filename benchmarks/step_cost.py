"""Per-step cost of contenders on loopback: what each strategy costs when the link costs nothing.

    python benchmarks/step_cost.py --workload gpt --contenders ddp,netsense,int8,bf16 --steps 60 --repeats 2

Two long-lived ranks on 127.0.0.1 (no namespaces, no shaping, no root), the same jobs and Trainer as the shaped-link
benchmark (``bench_trainer.py``), interleaved repeat by repeat. Printed per run: milliseconds per step after the
first five (DDP's bucket rebuild, the codecs' calibration) and the steps per mode. NetSense running ``none``
against plain DDP is the price of its hook, measurements and agreement; a twin against plain DDP, its codec's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import plan
from bench_driver import Driver
from names import CONTENDERS

__all__ = ["Loopback", "main"]

_SKIP = 5


class Loopback:
    """What :class:`bench_driver.Driver` needs of a ``ShapedLink``, on loopback: no namespaces, no shaping."""

    def address(self, side: int) -> str:
        return "127.0.0.1"

    def ifname(self, side: int) -> str:
        return "lo"

    def popen(self, side: int, args: list[str], **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(args, **kwargs)

    def set_rate(self, rate: float | None) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="gpt", choices=list(plan.BENCH))
    p.add_argument("--contenders", default="ddp,netsense,int8,bf16,powersgd")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown or args.steps <= _SKIP or args.repeats < 1:
        p.error(f"contenders from {CONTENDERS}, --steps > {_SKIP}, --repeats >= 1")
    cfg = dict(plan.BENCH[args.workload], quality_steps=args.steps, steps=args.steps, eval_every=10**9,
               eval_every_s=0.0, cap_s=600.0, metric=None)
    with tempfile.TemporaryDirectory(prefix="step_cost_") as control:
        driver = Driver(Loopback(), control)
        driver.start()
        try:
            for rep in range(args.repeats):
                for c in contenders:
                    r0 = driver.run(plan.job_spec(args.workload, c, None, cfg), None)["ranks"][0]
                    st = r0["steps"]
                    per = (st[-1]["train_s"] - st[_SKIP - 1]["train_s"]) / (len(st) - _SKIP)
                    print(f"{args.workload} {c:14} repeat {rep}: {1e3 * per:7.1f} ms/step after step {_SKIP}, "
                          f"modes {r0['mode_steps']}", flush=True)
        finally:
            driver.stop()


if __name__ == "__main__":
    main()
