"""Plain averaged allreduce: exactly what DDP does without a hook."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_netsense.codecs.base import BucketLayout, Codec


class NoneCodec(Codec):
    """No compression. Divides in place, then the hook sums with allreduce, as torch's ``allreduce_hook``."""

    name = "none"
    summable = True
    lossy = False

    def payload_bytes(self, layout: BucketLayout, **options: Any) -> int:
        return layout.numel * layout.itemsize

    def compress(self, tensor: Tensor, layout: BucketLayout, **options: Any) -> tuple[Tensor, Any]:
        # Dividing before the sum (and in place, in the bucket buffer) reproduces DDP's own reducer bit for bit.
        return tensor.div_(layout.world_size), None

    def decompress(self, payload: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        return payload.float() * layout.world_size

    def aggregate(self, collected: Tensor, ctx: Any, layout: BucketLayout) -> Tensor:
        return collected
