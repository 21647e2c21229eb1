"""int8 codes with one float32 scale per chunk, exchanged by allgather.

int8 codes cannot be summed by allreduce: two codes overflow int8, and codes of different ranks carry different
scales, so their sum means nothing. Each rank therefore sends its codes *and* its scales in one byte payload
(``[scales as bytes | codes]``, one ``all_gather_into_tensor``) and every rank decodes and averages all of them.

Rounding is to nearest: the error-feedback residual carries the rounding error into the next step, so the
unbiasedness of stochastic rounding buys nothing and would add variance (and random draws that must be kept
out of the ranks' shared generator).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_netsense._validation import check_int
from lightning_netsense.codecs.base import BucketLayout, Codec

__all__ = ["Int8Codec"]

_LEVELS = 127.0  # symmetric: -127..127, so that the scale of a chunk is max|x| / 127


class Int8Codec(Codec):
    """Quantise to int8 with a per-chunk scale ``max|x| / 127`` (error per element at most ``scale / 2``).

    A non-finite element makes its chunk's scale non-finite; the decoded chunk is then NaN on every rank, so
    AMP's ``GradScaler`` sees the overflow everywhere and skips the step on all ranks alike.

    Options:
        chunk_size: elements sharing one scale (>= 1). Smaller chunks follow the gradient's local magnitude
            more closely at 4 bytes per chunk.
    """

    name = "int8"
    summable = False
    default_options: Mapping[str, Any] = {"chunk_size": 1024}

    @classmethod
    def _check_options(cls, options: Mapping[str, Any]) -> None:
        # an integral float is accepted: checkpoints store a decision's options as floats
        check_int("chunk_size", options["chunk_size"], low=1, integral_float=True)

    def payload_bytes(self, layout: BucketLayout, **options: Any) -> int:
        chunk = int(options.get("chunk_size", self.default_options["chunk_size"]))
        return layout.numel + 4 * math.ceil(layout.numel / chunk)

    def compress(self, tensor: Tensor, layout: BucketLayout, **options: Any) -> tuple[Tensor, Any]:
        chunk = int(options.get("chunk_size", self.default_options["chunk_size"]))
        flat = tensor.reshape(-1).float()
        amax = _chunk_amax(flat, chunk)
        # a zero chunk gets inv = 0 (codes 0); an inf chunk gets inv = 0 and scale inf, so it decodes as NaN
        inv = torch.where(amax > 0, _LEVELS / amax, torch.zeros_like(amax))
        codes = _scale_chunks(flat, inv, chunk).nan_to_num_(0.0).round_().clamp_(-_LEVELS, _LEVELS)
        scales = amax / _LEVELS
        # scales first: at offset 0 their bytes stay 4-aligned, so the receiver can view them as float32
        payload = torch.cat([scales.view(torch.uint8), codes.to(torch.int8).view(torch.uint8)])
        return payload, chunk

    def decompress(self, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        return _decode(payload.view(1, -1), ctx, layout.numel)[0]

    def aggregate(self, collected: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        rows = collected.view(layout.world_size, -1)
        return _decode(rows, ctx, layout.numel).sum(0).div_(layout.world_size)

    def aggregate_into(self, collected: Tensor, ctx: Any, layout: BucketLayout, out: Tensor) -> Tensor:
        # rank by rank, in rank order, codes times scales accumulated straight into the bucket: no (world, numel)
        # float copy, and the same sums on every rank
        chunk, numel = ctx, layout.numel
        nchunks = math.ceil(numel / chunk)
        full = numel // chunk * chunk
        flat = out.view(-1)
        for r, row in enumerate(collected.view(layout.world_size, -1)):
            scales = row[: 4 * nchunks].clone().view(torch.float32)  # a copy: row r > 0 may be misaligned
            codes = row[4 * nchunks :].view(torch.int8)
            if full:
                target = flat[:full].view(-1, chunk)
                blocks = codes[:full].view(-1, chunk)
                if r == 0:
                    torch.mul(blocks, scales[: full // chunk, None], out=target)
                else:
                    target.addcmul_(blocks, scales[: full // chunk, None])
            if full < numel:
                if r == 0:
                    torch.mul(codes[full:], scales[-1], out=flat[full:])
                else:
                    flat[full:].add_(codes[full:] * scales[-1])
        return out.div_(layout.world_size)


def _chunk_amax(flat: Tensor, chunk: int) -> Tensor:
    """Per-chunk ``max |x|`` (NaN if the chunk holds a NaN: ``amax`` propagates it); the last chunk may be short."""
    full = flat.numel() // chunk * chunk
    parts = []
    if full:
        parts.append(flat[:full].view(-1, chunk).abs().amax(1))
    if full < flat.numel():
        parts.append(flat[full:].abs().amax().reshape(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _scale_chunks(flat: Tensor, per_chunk: Tensor, chunk: int) -> Tensor:
    """``flat * per_chunk`` broadcast over chunks, as a new tensor (``per_chunk[..., c]`` scales chunk ``c``)."""
    lead = per_chunk.shape[:-1]
    n = flat.shape[-1]
    full = n // chunk * chunk
    out = torch.empty(*lead, n, dtype=per_chunk.dtype, device=flat.device)
    nfull = full // chunk
    if full:
        torch.mul(
            flat[..., :full].reshape(*lead, nfull, chunk),
            per_chunk[..., :nfull, None],
            out=out[..., :full].view(*lead, nfull, chunk),
        )
    if full < n:
        torch.mul(flat[..., full:], per_chunk[..., nfull:], out=out[..., full:])
    return out


def _decode(rows: Tensor, chunk: int, numel: int) -> Tensor:
    """Decode ``(ranks, payload bytes)`` into ``(ranks, numel)`` float32 values."""
    nchunks = math.ceil(numel / chunk)
    scales = rows[:, : 4 * nchunks].reshape(-1).view(torch.float32).view(rows.shape[0], nchunks)
    codes = rows[:, 4 * nchunks :].view(torch.int8).float()
    return _scale_chunks(codes, scales, chunk)
