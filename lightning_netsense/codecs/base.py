"""The codec interface: compress a flat gradient bucket, aggregate every rank's payload, decompress.

Modelled on GRACE's compressor (three methods, ``compress`` returns ``(payload, ctx)`` and only the payload
crosses the wire), with two additions the policy needs: whether the payload can be *summed* by allreduce, and
its exact size for a given bucket (the cost model prices each candidate before running it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["BucketLayout", "Codec"]


@dataclass(frozen=True)
class BucketLayout:
    """Where a flat bucket comes from: its index, size and the shapes of the gradients packed into it.

    Attributes:
        index: ``bucket.index()`` (stable from the second step on, after DDP rebuilds its buckets).
        numel: number of elements of the flat bucket.
        shapes: shape of each gradient in the bucket, in bucket order (low-rank codecs need them).
        world_size: number of ranks in the process group.
        dtype: the bucket's element type (the parameters' gradients: float32, bfloat16 or float16).
    """

    index: int
    numel: int
    shapes: tuple[tuple[int, ...], ...]
    world_size: int
    dtype: torch.dtype = torch.float32

    @property
    def itemsize(self) -> int:
        """Bytes per element of the bucket."""
        return torch.empty((), dtype=self.dtype).element_size()


class Codec(ABC):
    """A gradient codec used by :func:`lightning_netsense.hook.netsense_hook`.

    The hook calls, per bucket and step: :meth:`compress` on this rank's gradient (with the error-feedback
    residual added: then float32, else the bucket itself, in the bucket's dtype), :meth:`subtract_sent_` to form
    the new residual, then one collective - ``all_reduce`` of the payload if :attr:`summable`, else
    ``all_gather_into_tensor`` - and :meth:`aggregate_into`, which writes the *average* of the ranks'
    contributions into a flat float32 tensor of ``layout.numel`` elements.

    Gradients reach the hook unscaled by world size; averaging is the codec's job (dividing before a summing
    collective keeps fp16 from overflowing). Codecs never wait for the device: statistics they return are
    tensors, and no operation has an output whose size depends on the data.

    Subclasses set :attr:`name`, :attr:`summable`, :attr:`lossy` and :attr:`default_options`.
    """

    #: mode name under which the codec is selected (``FixedPolicy(mode=name)``)
    name: ClassVar[str]
    #: payload can be summed by allreduce (fp16: yes; int8 codes or top-k indices: no)
    summable: ClassVar[bool]
    #: loses information (error feedback and error measurement apply)
    lossy: ClassVar[bool] = True
    #: options and their defaults, e.g. ``{"density": 0.01}``; a decision may override them per step
    default_options: ClassVar[Mapping[str, float]] = {}
    #: keeps per-bucket state of its own across steps (PowerSGD's warm start); such a codec does not run in the
    #: warm-up, while DDP may still rebuild its buckets (error-feedback residuals are checked per bucket layout)
    bucket_state: ClassVar[bool] = False

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Return ``options`` merged over the defaults; raise ``ValueError`` naming a bad or unknown option."""
        unknown = sorted(set(options) - set(cls.default_options))
        if unknown:
            accepted = ", ".join(f"`{k}`" for k in cls.default_options) or "none"
            raise ValueError(f"Option `{unknown[0]}` does not apply to mode {cls.name!r} (accepted: {accepted})")
        merged = {**cls.default_options, **options}
        cls._check_options(merged)
        return merged

    @classmethod
    def _check_options(cls, options: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the option whose value is out of range."""

    def reset(self) -> None:
        """Forget per-bucket state (warm starts); called when the buckets or options change."""

    @abstractmethod
    def payload_bytes(self, layout: BucketLayout, **options: Any) -> int:
        """Bytes one rank contributes to the collective for this bucket (before the collective's own cost)."""

    @abstractmethod
    def compress(self, tensor: Tensor, layout: BucketLayout, **options: Any) -> tuple[Tensor, Any]:
        """Turn this rank's flat gradient into ``(payload, ctx)``; only ``payload`` (1-D) crosses the wire.

        ``tensor`` may be the bucket's own buffer: a codec may overwrite it only if it is not lossy.
        """

    @abstractmethod
    def decompress(self, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        """This rank's own contribution as the others will see it, unscaled (same scale as the input)."""

    def subtract_sent_(self, compensated: Tensor, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        """``compensated`` minus this rank's own contribution (what :meth:`decompress` returns): the new residual.

        May work in place in ``compensated`` (the error-feedback memory, which the codec no longer needs once
        the payload is built) and return it. The default decompresses and subtracts; codecs override it where
        the residual is cheaper to form directly (a cast: one fused pass; top-k: zero the kept entries).
        """
        return compensated.sub_(self.decompress(payload, ctx, layout).view_as(compensated))

    def residual_sq_norm(self, ref2: Tensor, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor | None:
        """``||compensated - own contribution||^2`` from ``ref2 = ||compensated||^2`` and the payload, or ``None``.

        A codec whose contribution is an orthogonal projection of the compensated gradient knows the new residual's
        norm without a pass over it (Pythagoras: ``||c - s||^2 = ||c||^2 - ||s||^2`` when ``c - s`` is orthogonal to
        ``s``): top-k sends some entries exactly, PowerSGD projects on orthonormal factors. The hook then skips one
        full-size norm per bucket and step (the error statistic). ``ref2`` and the result are 0-dimensional
        tensors on the bucket's device. The default, ``None``, makes the hook measure the residual.
        """
        return None

    @abstractmethod
    def aggregate(self, collected: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        """Average of all ranks' contributions from the collective's output, flat, ``layout.numel`` elements.

        ``collected`` is the summed payload for a summable codec, else the ``world_size`` payloads laid end
        to end (the output tensor of ``all_gather_into_tensor``).
        """

    def aggregate_into(self, collected: Tensor, ctx: Any, layout: BucketLayout, out: Tensor) -> Tensor:
        """:meth:`aggregate`, written into ``out`` (float32, ``layout.numel`` elements); returns ``out``.

        The hook calls this one (with the bucket itself where it is float32). The default copies :meth:`aggregate`'s
        result (nothing when it already is ``out``); codecs override it to write the average straight into the
        bucket without a full-size copy.
        """
        result = self.aggregate(collected, ctx, layout)
        if result.data_ptr() != out.data_ptr():
            out.copy_(result.view_as(out))
        return out
