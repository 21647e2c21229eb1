"""fp16 and bf16 casts, summed by allreduce in the reduced precision.

torch's ``bf16_compress_hook`` refuses gloo by name, so both casts are ours; they share one helper, as
torch's ``fp16_compress_hook`` and ``bf16_compress_hook`` do.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_netsense.codecs.base import BucketLayout, Codec


class _CastCodec(Codec):
    dtype: ClassVar[torch.dtype]
    summable = True

    def payload_bytes(self, layout: BucketLayout, **options: Any) -> int:
        return layout.numel * torch.empty((), dtype=self.dtype).element_size()

    def compress(self, tensor: Tensor, layout: BucketLayout, **options: Any) -> tuple[Tensor, Any]:
        if tensor.dtype == self.dtype:  # a bucket already in this precision: what plain DDP does
            return tensor.reshape(-1).div(layout.world_size), None
        return self._cast(tensor, layout)

    def _cast(self, tensor: Tensor, layout: BucketLayout) -> tuple[Tensor, Any]:
        # Divide before the cast so that the sum of world_size halves cannot overflow where the mean would not;
        # written straight into the reduced-precision payload (no float32 temporary; same values, tested)
        payload = torch.empty(tensor.numel(), dtype=self.dtype, device=tensor.device)
        return torch.div(tensor.reshape(-1), layout.world_size, out=payload), None

    def decompress(self, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        return payload.float() * layout.world_size

    def subtract_sent_(self, compensated: Tensor, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        # one pass, the cast fused into the subtraction (no float32 copy of the payload)
        return compensated.sub_(payload.view_as(compensated), alpha=layout.world_size)

    def aggregate(self, collected: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        return collected.float()

    def aggregate_into(self, collected: Tensor, ctx: Any, layout: BucketLayout, out: Tensor) -> Tensor:
        return out.copy_(collected.view_as(out))  # the cast fused into the copy


class FP16Codec(_CastCodec):
    """Cast to IEEE half precision (11-bit mantissa, range ±65504)."""

    name = "fp16"
    dtype = torch.float16


class BF16Codec(_CastCodec):
    """Cast to bfloat16 (8-bit mantissa, fp32's range): no overflow, coarser values than fp16."""

    name = "bf16"
    dtype = torch.bfloat16
