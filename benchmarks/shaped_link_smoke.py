"""Smoke run across a kernel-shaped link: one rank per namespace, a rate schedule, the estimate per step.

As root::

    python benchmarks/shaped_link_smoke.py --rates 50,200 --steps-per-rate 8
    python benchmarks/shaped_link_smoke.py --rates 1000,20,1000 --policy netsense

Prints, per step of rank 0, the shaped rate, the estimated bandwidth and latency, the mode used, the hook's
accounted wire bytes against the bytes the veth really sent, and the step time. Everything it creates
(namespaces, veth, qdiscs, processes) is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from shaped_worker import drive

from lightning_netsense.netem import ShapedLink, available, cleanup_stale


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="50,200", help="Mbit/s per phase, comma-separated")
    p.add_argument("--steps-per-rate", type=int, default=8)
    p.add_argument("--policy", choices=("fixed", "netsense"), default="fixed")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bucket-cap-mb", type=float, default=1.0)
    p.add_argument("--keep", default="", help="folder to keep the ranks' JSON lines in (default: a temporary one)")
    args = p.parse_args(argv)
    ok, why = available()
    if not ok:
        sys.exit(f"cannot shape a link here: {why}")
    cleanup_stale()
    rates = [float(r) for r in args.rates.split(",")]
    n = args.steps_per_rate
    worker = ["--policy", args.policy, "--width", str(args.width), "--depth", str(args.depth),
              "--batch", str(args.batch), "--bucket-cap-mb", str(args.bucket_cap_mb)]
    with ShapedLink(rate_mbit=rates[0]) as link, tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or tmp
        schedule = {(i + 1) * n - 1: (lambda r=r: link.set_rate(r)) for i, r in enumerate(rates[1:])}
        result = drive(link, tmp, steps=n * len(rates), schedule=schedule, worker_args=worker, timeout=600)
    steps = [e for e in result["ranks"][0] if e["event"] == "step"]
    params = next(e["params"] for e in result["ranks"][0] if e["event"] == "start")
    print(f"{params} parameters ({params * 4 / 1e6:.2f} MB), run {result['seconds']:.1f} s")
    print(f"{'step':>4} {'rate':>6} {'est Mbit/s':>10} {'est/rate':>8} {'alpha ms':>8} {'mode':>8} "
          f"{'wire MB':>8} {'veth tx MB':>10} {'comm s':>7} {'step s':>7}")
    for e in steps:
        rate = rates[min(e["step"] // n, len(rates) - 1)]
        print(f"{e['step']:>4} {rate:>6g} {e['bandwidth_mbit']:>10.1f} {e['bandwidth_mbit'] / rate:>8.3f} "
              f"{e['alpha'] * 1e3:>8.2f} {e['mode']:>8} {e['bytes_sent'] / 1e6:>8.3f} {e['tx_bytes'] / 1e6:>10.3f} "
              f"{e['comm_time']:>7.3f} {e['step_time']:>7.3f}")


if __name__ == "__main__":
    main()
