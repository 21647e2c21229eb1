"""Top-k sparsification: the largest magnitudes with their signs, values and indices in one allgather.

Sparse payloads cannot be summed by allreduce (ranks keep different indices), so each rank sends ``k`` float32
values bit-cast to int32 followed by their ``k`` int32 indices - one tensor, one ``all_gather_into_tensor`` - and
every rank accumulates all of them with ``index_add_``: an index kept by several ranks adds up (the prototype
this project replaces overwrote duplicates and dropped signs).

Selection is exact. On CPU ``torch.topk`` over a whole bucket is slow (0.1-0.18 s for 25 MiB at 1 %), so
large buckets first estimate the threshold from a random sample, as DGC does, keep every element at or above it
and run ``torch.topk`` on those candidates only (4-7x faster at 25 MiB, 5-15x at 100 MiB, same set: see
``benchmarks/codec_bench.py``); if the sample overestimated the threshold and fewer than ``k`` candidates remain,
it falls back to ``torch.topk`` on everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_netsense._validation import check_number
from lightning_netsense.codecs.base import BucketLayout, Codec

__all__ = ["TopKCodec", "select_topk", "topk_count"]

# buckets smaller than this use torch.topk directly: sampling would cost more than it saves
_SAMPLE_MIN_NUMEL = 1 << 16
# sample size as a fraction of the bucket, and the margin on the sampled quantile (more candidates, fewer fallbacks)
_SAMPLE_FRACTION = 0.01
_SAMPLE_MARGIN = 1.5


def topk_count(numel: int, density: float) -> int:
    """Elements kept: ``max(1, ceil(density * numel))``."""
    return max(1, math.ceil(density * numel))


def select_topk(magnitude: Tensor, k: int, method: str = "sampled", generator: torch.Generator | None = None) -> Tensor:
    """Indices of the ``k`` largest entries of ``magnitude`` (1-D, non-negative or NaN), in no particular order.

    NaN counts as the largest value (as in ``torch.topk``), so a NaN gradient is always sent.

    Args:
        magnitude: ``|x|`` of the flat gradient.
        k: number of indices, ``1 <= k <= magnitude.numel()``.
        method: ``"exact"`` (``torch.topk`` on everything) or ``"sampled"`` (threshold from a sample first; the
            result is the same set up to ties).
        generator: CPU generator of the sample (a private one keeps the training's global RNG untouched).
    """
    if method not in ("exact", "sampled"):
        raise ValueError(f"Expected `method` to be 'exact' or 'sampled', but got {method!r}")
    n = magnitude.numel()
    # on a GPU torch.topk is fast and a sample would draw from the device's global generator
    if method == "exact" or n < _SAMPLE_MIN_NUMEL or k * 4 > n or magnitude.device.type != "cpu":
        return torch.topk(magnitude, k, sorted=False).indices
    ns = min(n, max(4096, int(n * _SAMPLE_FRACTION)))
    sample = magnitude[torch.randint(0, n, (ns,), generator=generator)]
    ks = min(ns, math.ceil(ns * k / n * _SAMPLE_MARGIN) + 8)
    threshold = torch.topk(sample, ks, sorted=False).values.min()
    # `not (x < t)` rather than `x >= t`: keeps NaN among the candidates
    candidates = torch.logical_not(magnitude < threshold).nonzero().squeeze(1)
    if candidates.numel() < k:
        return torch.topk(magnitude, k, sorted=False).indices
    if candidates.numel() == k:
        return candidates
    return candidates[torch.topk(magnitude[candidates], k, sorted=False).indices]


class TopKCodec(Codec):
    """Keep the ``k = max(1, ceil(density * numel))`` largest-magnitude elements of the bucket, with signs.

    The aggregate is ``sum over ranks of the kept values, scattered and added / world_size``; with error feedback
    what was not kept is sent in later steps.

    Options:
        density: fraction of elements kept, in (0, 1].
    """

    name = "topk"
    summable = False
    default_options: Mapping[str, Any] = {"density": 0.01}

    def __init__(self) -> None:
        # private: the sample must not advance the training's global RNG (it would change shuffling/dropout)
        self._generator = torch.Generator().manual_seed(0x70F)
        # |x| of the bucket being compressed, reused across buckets and steps (the hook compresses one bucket at a
        # time, on the autograd thread). A fresh full-size tensor per call cost more than the arithmetic on CPU:
        # 25 ms against 7 ms for `abs` of a 7.2 M-element bucket of the ResNet-18-sized CNN (page faults).
        self._magnitude: Tensor | None = None

    def _abs(self, flat: Tensor) -> Tensor:
        buf = self._magnitude
        if buf is None or buf.numel() < flat.numel() or buf.device != flat.device:
            buf = self._magnitude = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
        return torch.abs(flat, out=buf[: flat.numel()])

    @classmethod
    def _check_options(cls, options: Mapping[str, Any]) -> None:
        check_number("density", options["density"], low=0, high=1, low_open=True)

    def payload_bytes(self, layout: BucketLayout, **options: Any) -> int:
        density = float(options.get("density", self.default_options["density"]))
        return 8 * topk_count(layout.numel, density)

    def compress(self, tensor: Tensor, layout: BucketLayout, **options: Any) -> tuple[Tensor, Any]:
        density = float(options.get("density", self.default_options["density"]))
        flat = tensor.reshape(-1).float()
        k = topk_count(flat.numel(), density)
        indices = select_topk(self._abs(flat), k, generator=self._generator)
        values = flat[indices]
        payload = torch.cat([values.view(torch.int32), indices.to(torch.int32)])
        return payload, k

    def decompress(self, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        k = ctx
        out = torch.zeros(layout.numel, dtype=torch.float32, device=payload.device)
        return out.index_put_((payload[k:].long(),), payload[:k].view(torch.float32))

    def subtract_sent_(self, compensated: Tensor, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        # the kept entries were sent exactly, the rest not at all: zero the k kept entries (a sparse update)
        k = ctx
        return compensated.view(-1).index_fill_(0, payload[k:].long(), 0.0).view_as(compensated)

    def residual_sq_norm(self, ref2: float, payload: Tensor, ctx: Any, layout: BucketLayout) -> float | None:
        # the k kept entries (distinct indices) are sent exactly, the rest not at all: ||c - s||^2 = ||c||^2 - ||kept||^2
        k = ctx
        kept = float(torch.linalg.vector_norm(payload[:k].view(torch.float32))) ** 2
        return max(ref2 - kept, 0.0)

    def aggregate(self, collected: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        out = torch.empty(layout.numel, dtype=torch.float32, device=collected.device)
        return self.aggregate_into(collected, ctx, layout, out)

    def aggregate_into(self, collected: Tensor, ctx: Any, layout: BucketLayout, out: Tensor) -> Tensor:
        # straight into the bucket: no full-size temporary, and the division by the world size on the k * N
        # received values rather than on every element (the CNN's two buckets: 17.5 -> 7.4 ms per step,
        # benchmarks/hook_overhead.py)
        k = ctx
        rows = collected.view(layout.world_size, 2 * k)
        values = rows[:, :k].reshape(-1).view(torch.float32) / layout.world_size
        indices = rows[:, k:].reshape(-1).long()
        flat = out.view(-1)
        # index_add_ accumulates duplicates (an index kept by several ranks); index_put_ would keep only one
        flat.zero_().index_add_(0, indices, values.to(flat.dtype))
        return out
