"""Top-k sparsification: the largest magnitudes with their signs, values and indices in one allgather.

Sparse payloads cannot be summed by allreduce (ranks keep different indices), so each rank sends ``k`` float32
values bit-cast to int32 followed by their ``k`` int32 indices - one tensor, one ``all_gather_into_tensor`` - and
every rank adds them up, rank by rank in rank order: an index kept by several ranks adds up (the prototype this
project replaces overwrote duplicates and dropped signs), and the sums are the same on every rank, bit for bit.

On CPU ``torch.topk`` over a large bucket is slow, so large buckets there first estimate the threshold from a
random sample, as DGC does, take a fixed number of candidates at or above it (``nonzero_static``: no output whose
size depends on the data) and run ``torch.topk`` on those. When the sample overestimates the threshold and fewer
than ``k`` candidates pass it, the rest of the payload carries index 0 with the value 0: it adds nothing, and the
coordinates not kept stay in the error-feedback residual.
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
# candidates taken at or above the sampled threshold, per kept element (about 1.5 pass it)
_CANDIDATES = 3


def topk_count(numel: int, density: float) -> int:
    """Elements kept: ``max(1, ceil(density * numel))``."""
    return max(1, math.ceil(density * numel))


def select_topk(magnitude: Tensor, k: int, method: str = "sampled", generator: torch.Generator | None = None) -> Tensor:
    """Indices of ``k`` largest entries of ``magnitude`` (1-D, non-negative or NaN), in no particular order.

    NaN counts as the largest value (as in ``torch.topk``), so a NaN gradient is always sent.

    Args:
        magnitude: ``|x|`` of the flat gradient.
        k: number of indices, ``1 <= k <= magnitude.numel()``.
        method: ``"exact"`` (``torch.topk`` on everything) or ``"sampled"`` (on CPU, a threshold from a sample
            first; the same set unless fewer than ``k`` entries pass the threshold, where the missing indices are
            ``-1``).
        generator: CPU generator of the sample (a private one keeps the training's global RNG untouched).
    """
    if method not in ("exact", "sampled"):
        raise ValueError(f"Expected `method` to be 'exact' or 'sampled', but got {method!r}")
    n = magnitude.numel()
    # on a GPU torch.topk is fast, and a sample would draw from the device's global generator
    if method == "exact" or n < _SAMPLE_MIN_NUMEL or k * 4 > n or magnitude.device.type != "cpu":
        return torch.topk(magnitude, k, sorted=False).indices
    ns = min(n, max(4096, int(n * _SAMPLE_FRACTION)))
    sample = magnitude[torch.randint(0, n, (ns,), generator=generator)]
    ks = min(ns, math.ceil(ns * k / n * _SAMPLE_MARGIN) + 8)
    threshold = torch.topk(sample, ks, sorted=False).values.min()
    # `not (x < t)` rather than `x >= t`: keeps NaN among the candidates; a fixed number of them (padded with n)
    cap = min(n, _CANDIDATES * k)
    candidates = torch.nonzero_static(torch.logical_not(magnitude < threshold), size=cap, fill_value=n).squeeze(1)
    padded = torch.cat([magnitude, magnitude.new_full((1,), -1.0)])  # the padding ranks below every magnitude
    chosen = candidates[torch.topk(padded[candidates], k, sorted=False).indices]
    return torch.where(chosen < n, chosen, -1)


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
        # time, on the autograd thread). A fresh full-size tensor per call costs more than the arithmetic on CPU
        # (page faults of the new allocation).
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
        # a missing index (-1, see `select_topk`) sends index 0 with the value 0: it adds nothing anywhere
        missing = indices < 0
        indices = indices.clamp_min(0)
        values = flat[indices].masked_fill_(missing, 0.0)
        payload = torch.cat([values.view(torch.int32), indices.to(torch.int32)])
        return payload, k

    def decompress(self, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        k = ctx
        out = torch.zeros(layout.numel, dtype=torch.float32, device=payload.device)
        return out.index_add_(0, payload[k:].long(), payload[:k].view(torch.float32))

    def subtract_sent_(self, compensated: Tensor, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        # the kept entries were sent exactly, the rest not at all: subtract what was sent (a sparse update; the
        # padding adds 0)
        k = ctx
        flat = compensated.view(-1)
        return flat.index_add_(0, payload[k:].long(), payload[:k].view(torch.float32), alpha=-1.0).view_as(compensated)

    def residual_sq_norm(self, ref2: Tensor, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor | None:
        # the kept entries (distinct indices) are sent exactly, the rest not at all: ||c - s||^2 = ||c||^2 - ||kept||^2
        k = ctx
        kept = torch.linalg.vector_norm(payload[:k].view(torch.float32)).square()
        return (ref2 - kept).clamp_min(0.0)

    def aggregate(self, collected: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        out = torch.empty(layout.numel, dtype=torch.float32, device=collected.device)
        return self.aggregate_into(collected, ctx, layout, out)

    def aggregate_into(self, collected: Tensor, ctx: Any, layout: BucketLayout, out: Tensor) -> Tensor:
        # straight into the bucket, with the division by the world size on the k * N received values rather than
        # on every element. One rank at a time, in rank order: within a rank's payload the indices are distinct
        # (the padding adds 0 at index 0), so every element receives its additions in the same order on every
        # rank; one index_add_ of all payloads would add an index kept by several ranks in an order CUDA's atomics
        # leave open, and the replicas would drift apart.
        k = ctx
        rows = collected.view(layout.world_size, 2 * k)
        flat = out.view(-1).zero_()
        for row in rows:
            flat.index_add_(0, row[k:].long(), (row[:k].view(torch.float32) / layout.world_size).to(flat.dtype))
        return out
