"""Low-rank compression in the spirit of PowerSGD, with one allreduce per bucket.

torch's PowerSGD needs two collectives per bucket (``P = M Q``, then ``Q = M^T P`` after orthogonalising the
summed ``P``); the second, issued from a callback, hangs or mismatches on gloo with several buckets. This codec
issues one, and runs the two halves of the power iteration on alternate steps. Per
matrix ``M`` (a gradient reshaped to ``(shape[0], prod(shape[1:]))``) every rank keeps the same orthonormal
factors ``P`` (``n x r``) and ``Q`` (``m x r``):

1. odd steps send ``A = M Q`` (``n r`` floats); every rank rebuilds ``g = mean(A) Q^T = mean(M) Q Q^T`` and
   takes ``P = orth(mean A)``;
2. even steps send ``B = M^T P`` (``m r`` floats); ``g = P mean(B)^T = P P^T mean(M)`` and ``Q = orth(mean B)``.

Both halves are linear in ``M``, so the allreduce sum gives the projection of the *mean* gradient exactly, and
``||mean(M) - g|| <= ||mean(M)||``. The factors are built from allreduced values only, so they stay identical on
every rank with no extra communication, and they warm-start the next step. At equal bytes per step (rank ``2r``
here against ``r`` in torch's two-stage maths) the error is lower (``benchmarks/codec_bench.py`` compares them).

The initial factors come from a seeded generator (identical on every rank). A factor is replaced only by a
valid orthonormal one: a non-finite or zero half (an AMP overflow, a frozen layer) keeps the previous factor, so
a bad step never poisons the warm start. Error feedback is the hook's (:class:`ErrorFeedback`), as for every lossy
codec. Vectors, and matrices where rank ``r`` would not at least halve the bytes, travel uncompressed in the same
payload. The payload alternates between ``sum(n) r`` and ``sum(m) r`` floats: :meth:`PowerSGDCodec.payload_bytes`
returns the size of the bucket's *next* step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_netsense._validation import check_choice, check_int
from lightning_netsense.codecs.base import BucketLayout, Codec

__all__ = ["PowerSGDCodec"]

_SEED = 0x5D6


@dataclass(frozen=True)
class _Group:
    """Compressed matrices of one shape ``(n, m)``, batched; ``offsets`` into the flat bucket."""

    n: int
    m: int
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class _Plan:
    groups: tuple[_Group, ...]
    raw: tuple[tuple[int, int], ...]  # (offset, length) sent uncompressed
    raw_numel: int

    def payload_numel(self, rank: int, left: bool) -> int:
        """Floats in the payload: ``A = M Q`` (``n r`` per matrix) when ``left``, else ``B = M^T P`` (``m r``)."""
        return sum(len(g.offsets) * (g.n if left else g.m) * rank for g in self.groups) + self.raw_numel


@dataclass
class _BucketState:
    shapes: tuple[tuple[int, ...], ...]
    numel: int
    rank: int
    plan: _Plan
    p: list[Tensor] = field(default_factory=list)  # per group (b, n, r), orthonormal columns
    q: list[Tensor] = field(default_factory=list)  # per group (b, m, r)
    left: bool = True  # the next step sends A = M Q (else B = M^T P)


def _plan(layout: BucketLayout, rank: int) -> _Plan:
    """Which gradients of the bucket are compressed (grouped by shape), and which travel as they are."""
    groups: dict[tuple[int, int], list[int]] = {}
    raw: list[tuple[int, int]] = []
    offset = 0
    for shape in layout.shapes:
        numel = math.prod(shape)
        if len(shape) >= 2 and numel > 0:
            n, m = shape[0], numel // shape[0]
            # both halves must save bytes (n r < n m and m r < n m) and average at most half of n m
            if (n + m) * rank <= n * m:
                groups.setdefault((n, m), []).append(offset)
                offset += numel
                continue
        if numel:
            if raw and raw[-1][0] + raw[-1][1] == offset:
                raw[-1] = (raw[-1][0], raw[-1][1] + numel)
            else:
                raw.append((offset, numel))
        offset += numel
    if offset < layout.numel:  # a buffer longer than its gradients: send the tail as is
        raw.append((offset, layout.numel - offset))
    packed = tuple(_Group(n, m, tuple(offs)) for (n, m), offs in groups.items())
    return _Plan(packed, tuple(raw), sum(length for _, length in raw))


def _orthonormal(matrices: Tensor) -> Tensor:
    """Orthonormalised copy of a batch ``(b, rows, r)``: Gram-Schmidt on the columns, as torch's PowerSGD does.

    A zero or non-finite column gives NaN rather than an error (no data-dependent branch, nothing waits for the
    device); :func:`_advance` keeps the previous factor then.
    """
    out = matrices.clone(memory_format=torch.contiguous_format)  # the halves arrive as transposed views
    for i in range(out.shape[2]):
        col = out[:, :, i : i + 1]
        col.div_(torch.linalg.vector_norm(col, dim=1, keepdim=True))
        if i + 1 < out.shape[2]:
            rest = out[:, :, i + 1 :]
            rest.sub_(col * (col * rest).sum(dim=1, keepdim=True))
    return out


def _valid(factors: Tensor) -> Tensor:
    """Per batch element: finite with unit columns (Gram-Schmidt of a zero column gives NaN, not an error)."""
    norms = torch.linalg.vector_norm(factors, dim=1)
    return torch.isfinite(factors).flatten(1).all(1) & ((norms - 1).abs() < 1e-3).all(1)


class PowerSGDCodec(Codec):
    """Rank-``r`` projection of each gradient matrix, one half of a power iteration per step, one allreduce.

    Options:
        rank: ``r`` >= 1. An ``n x m`` matrix costs ``n r`` floats on odd steps and ``m r`` on even steps; matrices
            where ``(n + m) r > n m`` are sent uncompressed.
        bits: 32 (float32 payload, torch's PowerSGD) or 16 (bfloat16: half the bytes). The factors, the
            orthogonalisation and the rebuilt gradient stay float32; only the payload is rounded, and error
            feedback carries the rounding into the next step (it is small against the low-rank projection's own
            error). bfloat16, not float16: a half's elements are products of gradients with orthonormal factors,
            whose magnitudes float16's range does not bound.
    """

    name = "powersgd"
    summable = True
    bucket_state = True
    default_options: Mapping[str, Any] = {"rank": 4, "bits": 32}

    def __init__(self) -> None:
        self._states: dict[int, _BucketState] = {}

    @classmethod
    def _check_options(cls, options: Mapping[str, Any]) -> None:
        # integral floats are accepted: checkpoints store a decision's options as floats
        check_int("rank", options["rank"], low=1, integral_float=True)
        check_choice("bits", options["bits"], (16, 32), why="16: bfloat16 payload, 32: float32")

    def reset(self) -> None:
        self._states.clear()

    def payload_bytes(self, layout: BucketLayout, **options: Any) -> int:
        rank = int(options.get("rank", self.default_options["rank"]))
        width = int(options.get("bits", self.default_options["bits"])) // 8
        state = self._states.get(layout.index)
        if state is not None and self._matches(state, layout, rank):
            return width * state.plan.payload_numel(rank, state.left)
        return width * _plan(layout, rank).payload_numel(rank, True)  # a new state starts with the left half

    def compress(self, tensor: Tensor, layout: BucketLayout, **options: Any) -> tuple[Tensor, Any]:
        state = self._state(layout, int(options.get("rank", self.default_options["rank"])), tensor.device)
        flat = tensor.reshape(-1).float()
        rank = state.rank
        payload = torch.empty(state.plan.payload_numel(rank, state.left), dtype=torch.float32, device=flat.device)
        pos = 0
        for group, p, q in zip(state.plan.groups, state.p, state.q):
            size = group.n * group.m
            rows = group.n if state.left else group.m
            for j, off in enumerate(group.offsets):
                # each matrix's half straight into its slice of the payload: no stacked copy of the gradients.
                # The half travels transposed, (r, rows): on CPU the products with the thin factor on the left
                # are several times faster than with it on the right
                mat = flat[off : off + size].view(group.n, group.m)
                target = payload[pos : pos + rows * rank].view(rank, rows)
                if state.left:
                    torch.mm(q[j].T, mat.T, out=target)
                else:
                    torch.mm(p[j].T, mat, out=target)
                pos += rows * rank
        for off, length in state.plan.raw:
            payload[pos : pos + length] = flat[off : off + length]
            pos += length
        exact = payload
        if int(options.get("bits", self.default_options["bits"])) == 16:
            payload = payload.to(torch.bfloat16)
        # the factors and half used now travel in ctx: aggregate must rebuild with them, not with updated ones;
        # the float32 payload stays for the error statistic (`residual_sq_norm`)
        return payload, (state, state.left, list(state.p), list(state.q), exact)

    def decompress(self, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        state, left, p, q, _ = ctx
        return _rebuild(payload, state.plan, left, p, q, layout.numel)[0]

    def subtract_sent_(self, compensated: Tensor, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        # each matrix's low-rank product subtracted in place (addmm_), no full-size decompressed copy
        state, left, p, q, _ = ctx
        _rebuild(payload, state.plan, left, p, q, layout.numel, out=compensated.view(-1), subtract=True)
        return compensated

    def residual_sq_norm(self, ref2: Tensor, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor | None:
        # Per matrix the half A = M Q (or B = M^T P) projects on orthonormal factors, so M - A Q^T is orthogonal to
        # what was sent and ||M - A~ Q^T||^2 = ||M||^2 - ||A||^2 + ||A - A~||^2 (A~: A rounded to the payload's
        # dtype); uncompressed entries are sent as they are, up to the same rounding. Summed over the payload
        # ``p`` (float32) and what was sent ``p~``: ``||c||^2 - ||p||^2 + ||p - p~||^2``, from a payload of a few
        # hundred kB instead of a pass over the bucket.
        exact = ctx[4]
        err2 = ref2 - torch.linalg.vector_norm(exact).square()
        if payload.dtype != exact.dtype:
            err2 = err2 + torch.linalg.vector_norm(exact - payload.float()).square()
        return err2.clamp_min(0.0)

    def aggregate(self, collected: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        return self.aggregate_into(collected, ctx, layout, None)

    def aggregate_into(self, collected: Tensor, ctx: Any, layout: BucketLayout, out: Tensor | None) -> Tensor:
        state, left, p, q, _ = ctx
        mean = collected.float() / layout.world_size  # (a bfloat16 sum is rebuilt in float32)
        flat = None if out is None else out.view(-1)
        out, halves = _rebuild(mean, state.plan, left, p, q, layout.numel, out=flat)
        if self._states.get(layout.index) is state:  # not reset while the collective was in flight
            for i, half in enumerate(halves):
                if left:
                    state.p[i] = _advance(half, p[i])
                else:
                    state.q[i] = _advance(half, q[i])
            state.left = not left
        return out

    @staticmethod
    def _matches(state: _BucketState, layout: BucketLayout, rank: int) -> bool:
        return state.rank == rank and state.shapes == layout.shapes and state.numel == layout.numel

    def _state(self, layout: BucketLayout, rank: int, device: torch.device) -> _BucketState:
        state = self._states.get(layout.index)
        if state is None or not self._matches(state, layout, rank) or (state.p and state.p[0].device != device):
            plan = _plan(layout, rank)
            state = _BucketState(layout.shapes, layout.numel, rank, plan)
            for i, group in enumerate(plan.groups):
                # seeded by bucket, group and rank, drawn on the CPU: identical factors on every rank
                gen = torch.Generator().manual_seed(_SEED + 1_000_003 * layout.index + 7919 * i + rank)
                b = len(group.offsets)
                state.p.append(_orthonormal(torch.randn(b, group.n, rank, generator=gen)).to(device))
                state.q.append(_orthonormal(torch.randn(b, group.m, rank, generator=gen)).to(device))
            self._states[layout.index] = state
        return state


def _rebuild(
    payload: Tensor,
    plan: _Plan,
    left: bool,
    p: list[Tensor],
    q: list[Tensor],
    numel: int,
    out: Tensor | None = None,
    subtract: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """The flat gradient a payload stands for, and each group's half (``A`` if ``left`` else ``B``).

    Written into ``out`` (flat, ``numel`` float32) if given - or subtracted from it with ``subtract`` - one
    matrix product at a time straight into its slice: no full-size temporary (each cost page faults).
    """
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=payload.device)
    payload = payload.float()  # a bfloat16 payload (``bits=16``): the products run in float32
    halves = []
    pos = 0
    for group, pg, qg in zip(plan.groups, p, q):
        b, r = len(group.offsets), pg.shape[2]
        rows = group.n if left else group.m
        half = payload[pos : pos + b * rows * r].view(b, r, rows).transpose(1, 2)  # sent as (r, rows) per matrix
        pos += half.numel()
        halves.append(half)
        size = group.n * group.m
        for j, off in enumerate(group.offsets):
            # A Q^T = M Q Q^T (rows projected on span Q), or P B^T = P P^T M (columns projected on span P)
            a, bt = (half[j], qg[j].T) if left else (pg[j], half[j].T)
            target = out[off : off + size].view(group.n, group.m)
            if subtract:
                target.addmm_(a, bt, alpha=-1.0)
            else:
                torch.mm(a, bt, out=target)
    for off, length in plan.raw:
        if subtract:
            out[off : off + length] -= payload[pos : pos + length]
        else:
            out[off : off + length] = payload[pos : pos + length]
        pos += length
    return out, halves


def _advance(half: Tensor, previous: Tensor) -> Tensor:
    """The next warm-start factor: ``orth(half)`` where that is a valid orthonormal basis, else ``previous``."""
    new = _orthonormal(half)
    return torch.where(_valid(new)[:, None, None], new, previous)
