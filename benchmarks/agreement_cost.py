"""Per-rank cost of the step boundary's agreement at simulated world sizes, against an all_gather of every rank's.

    python benchmarks/agreement_cost.py [--worlds 2,64,512,4096] [--repeats 200]

The agreement reduces two fixed-length vectors (``lightning_netsense.agreement``): what each rank does around the
collective - pack its measurements, read the reduced vectors - is the same at any world size; only the collective
itself (a reduction of about 3 kB, logarithmic in the world size over a tree or ring) sees it. An agreement by
``all_gather`` instead leaves every rank with ``world`` vectors to unpack and combine. Both are timed here without a
process group: the reduction's input is emulated by one vector per rank (its element-wise maximum and sum is the
collective's work, not the rank's, and is not counted), the gather's by the gathered rows it would combine.
Prints the median milliseconds per step of each, with the spread over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_netsense.agreement import finish, pack
from lightning_netsense.observation import Measurements


def _local(seed: int) -> Measurements:
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(300, generator=g).tolist()
    return Measurements(
        backward_time=r[0], overlap_time=r[1], step_time=r[2], bytes_sent=1e6 * r[3], rel_error=r[4],
        bucket_wire_bytes=tuple(1e6 * x for x in r[10:30]), bucket_seconds=tuple(r[30:50]),
        mode_errors=tuple(r[50:56]), mode_seconds_per_byte=tuple(1e-9 * x for x in r[56:62]),
        mode_update_errors=tuple(r[62:68]),
    )


def _time(fn, repeats: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))] - samples[int(0.1 * (len(samples) - 1))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="2,64,512,4096")
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    local = _local(0)
    print(f"{'world':>6} {'reduce: rank ms':>16} {'spread':>7} {'all_gather: rank ms':>20} {'spread':>7}")
    for world in (int(w) for w in args.worlds.split(",")):
        high, total = pack(local)
        reduced = (high.clone(), total.clone())  # what the collective hands back

        def by_reduction(reduced: tuple = reduced) -> None:
            pack(local)
            finish(*reduced)

        # the gather: every rank's row arrives (the same values as the reduction's, one row per rank); each rank
        # reads them all and combines them column by column
        gathered = torch.stack([torch.cat(pack(_local(i % 64))) for i in range(world)])

        def by_gather(gathered: torch.Tensor = gathered) -> None:
            pack(local)
            rows = gathered.tolist()
            [max(column) for column in zip(*rows)]

        reduce_ms, reduce_spread = _time(by_reduction, args.repeats)
        gather_ms, gather_spread = _time(by_gather, max(3, args.repeats // max(1, world // 16)))
        print(f"{world:>6} {reduce_ms:16.3f} {reduce_spread:7.3f} {gather_ms:20.3f} {gather_spread:7.3f}", flush=True)


if __name__ == "__main__":
    main()
