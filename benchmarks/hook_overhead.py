"""Per-step codec cost of the hook's error-feedback path on the ResNet-18-sized CNN's buckets (no communication).

    python benchmarks/hook_overhead.py [--threads 1] [--steps 6]

For each lossy codec, per step (both DDP-sized buckets of ~25 MB): the compensation ``grad + residual``
(``ErrorFeedback.compensate``), ``compress``, the new residual with the error statistics (``ErrorFeedback.settle``
with ``Codec.subtract_sent_``) and ``Codec.aggregate_into`` the bucket - what ``netsense_hook`` runs around its
collective. Prints seconds per step (mean over the steps after two warm-up steps). Measured on this 2-core
machine, one thread: fp16 0.048-0.057 s, PowerSGD r4 0.055-0.069 s (0.075-0.081 s before its halves were computed as
``P^T M`` and ``Q^T M^T``: compress 24-28 ms, now 9-13 ms), top-k 1 % 0.068 s (0.088-0.101 s before its
|x| buffer and in-place aggregate), int8 0.11-0.13 s per step (before the in-place path: 0.109, 0.115, 0.135 and
0.253 s).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import resnet18

from lightning_netsense.codecs import CODECS, BucketLayout
from lightning_netsense.feedback import ErrorFeedback

_OPTIONS = {"fp16": {}, "bf16": {}, "powersgd": {"rank": 4}, "topk": {"density": 0.01}, "int8": {}}


def buckets(cap_bytes: float = 25e6) -> list[tuple[tuple[tuple[int, ...], ...], int]]:
    """DDP-like buckets of the CNN's parameters in reverse order (as gradients become ready), ``cap_bytes`` each."""
    out, shapes, size = [], [], 0
    for p in reversed(list(resnet18(stem="cifar").parameters())):
        shapes.append(tuple(p.shape))
        size += p.numel()
        if size * 4 >= cap_bytes:
            out.append((tuple(shapes), size))
            shapes, size = [], 0
    if shapes:
        out.append((tuple(shapes), size))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layout_list = buckets()
    print(f"buckets (elements): {[n for _, n in layout_list]}, {args.threads} thread(s)")
    for mode, options in _OPTIONS.items():
        codec, feedback = CODECS[mode](), ErrorFeedback()
        parts = {"compensate": 0.0, "compress": 0.0, "settle": 0.0, "aggregate_into": 0.0}
        for step in range(args.steps):
            for index, (shapes, numel) in enumerate(layout_list):
                layout = BucketLayout(index, numel, shapes, 2)
                bucket = torch.randn(numel)
                t0 = time.perf_counter()
                grad = feedback.compensate(index, bucket)
                t1 = time.perf_counter()
                payload, ctx = codec.compress(grad, layout, **options)
                t2 = time.perf_counter()
                bound = {"payload": payload, "ctx": ctx, "layout": layout}
                feedback.settle(index, grad, functools.partial(codec.subtract_sent_, **bound),
                                functools.partial(codec.residual_sq_norm, **bound))
                t3 = time.perf_counter()
                collected = payload.clone() if codec.summable else payload.repeat(2)  # as two ranks' collective
                codec.aggregate_into(collected, ctx, layout, bucket)
                t4 = time.perf_counter()
                if step >= 2:
                    for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                        parts[key] += dt / (args.steps - 2)
        detail = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items())
        print(f"{mode:9} {sum(parts.values()):.3f} s per step ({detail})")


if __name__ == "__main__":
    main()
