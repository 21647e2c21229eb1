"""Gradient codecs, one file each, and the registry that maps a mode name to its codec class."""

from __future__ import annotations

from lightning_netsense.codecs.base import BucketLayout, Codec
from lightning_netsense.codecs.halfprec import BF16Codec, FP16Codec
from lightning_netsense.codecs.int8 import Int8Codec
from lightning_netsense.codecs.none import NoneCodec
from lightning_netsense.codecs.powersgd import PowerSGDCodec
from lightning_netsense.codecs.topk import TopKCodec

__all__ = [
    "CODECS",
    "BF16Codec",
    "BucketLayout",
    "Codec",
    "FP16Codec",
    "Int8Codec",
    "NoneCodec",
    "PowerSGDCodec",
    "TopKCodec",
    "codec_class",
]

#: Every built-in mode, in the order of :data:`lightning_netsense.observation.MODE_CODES`.
CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (NoneCodec, FP16Codec, BF16Codec, Int8Codec, PowerSGDCodec, TopKCodec)
}


def codec_class(mode: str) -> type[Codec]:
    """Return the codec class of ``mode``; raise ``ValueError`` listing the accepted modes."""
    try:
        return CODECS[mode]
    except (KeyError, TypeError):
        raise ValueError(f"Expected `mode` to be one of {sorted(CODECS)}, but got {mode!r}") from None
