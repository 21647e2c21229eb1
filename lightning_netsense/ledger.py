"""The codec ledger: codec instances, the buckets' layouts and samples, and what is known of every mode.

What the policy prices a mode with comes from here: its payload per bucket, its compute cost per dense byte
(calibrated once on one bucket, then measured while it runs), its last measured compression error, and its
update error (measured for every candidate each step by :class:`~lightning_netsense.shadow.ShadowMeter`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_netsense.codecs import CODECS, BucketLayout, Codec
from lightning_netsense.feedback import ErrorFeedback
from lightning_netsense.observation import CodecProfile, Decision
from lightning_netsense.shadow import ShadowMeter
from lightning_netsense.update_error import BucketSample

__all__ = ["CodecLedger"]

# weight of the newest measurement in a mode's running cost per byte
_COST_EMA = 0.3
# coordinates sampled per bucket for the update error of the mode that runs
_SAMPLE_SIZE = 4096


class CodecLedger:
    """Codec instances and per-bucket layouts, and per mode: cost, compression error and update error."""

    __slots__ = ("_layouts", "_samples", "calibrated", "codecs", "costs", "errors", "shadow")

    def __init__(self) -> None:
        #: one instance per registered mode (codecs with per-bucket state keep it here)
        self.codecs: dict[str, Codec] = {name: cls() for name, cls in CODECS.items()}
        #: every lossy candidate measured on a window of the gradients, unsent
        self.shadow = ShadowMeter()
        self._layouts: dict[int, BucketLayout] = {}
        self._samples: dict[int, BucketSample] = {}
        #: per mode, compute seconds per dense byte (calibrated, then a running average of the steps it ran)
        self.costs: dict[str, float] = {}
        #: per mode, its last measured compression error ``||c - sent|| / ||c||``
        self.errors: dict[str, float] = {}
        self.calibrated = False

    # ------------------------------------------------------------------ buckets
    def layout(
        self, index: int, buffer: Tensor, shapes: tuple[tuple[int, ...], ...], world_size: int
    ) -> tuple[BucketLayout, bool]:
        """The bucket's layout, and whether it replaces another: a rebuilt bucket (DDP rebuilds them after the first
        step) resets the codecs' per-bucket state."""
        layout = self._layouts.get(index)
        if layout is not None and (layout.numel, layout.shapes, layout.dtype) == (buffer.numel(), shapes, buffer.dtype):
            return layout, False
        if layout is not None:
            for codec in self.codecs.values():
                codec.reset()
        new = BucketLayout(index, buffer.numel(), shapes, world_size, buffer.dtype)
        self._layouts[index] = new
        return new, layout is not None

    def sample(self, layout: BucketLayout, device: torch.device) -> BucketSample:
        """The bucket's fixed sample of coordinates for the update error (a new one for a new layout)."""
        sample = self._samples.get(layout.index)
        if sample is None or sample.layout != layout or sample.indices.device != device:
            sizes = [math.prod(shape) for shape in layout.shapes]
            sample = BucketSample(layout.numel, sizes, _SAMPLE_SIZE, device, seed=layout.index)
            sample.layout = layout
            self._samples[layout.index] = sample
        return sample

    def layouts(self, indices: Sequence[int] = ()) -> list[BucketLayout]:
        """The layouts of ``indices`` (a step's buckets, in its order), else every known layout."""
        if indices:
            return [self._layouts[i] for i in indices if i in self._layouts]
        return [self._layouts[i] for i in sorted(self._layouts)]

    def reset(self) -> None:
        """Forget the layouts and every codec's per-bucket state (a new DDP wrapper rebuilds its buckets)."""
        self._layouts.clear()
        self._samples.clear()
        for codec in self.codecs.values():
            codec.reset()
        self.shadow.reset()
        self.calibrated = False

    # ------------------------------------------------------------------ what is known of each mode
    def record_cost(self, mode: str, seconds: float, dense_bytes: float) -> None:
        """Fold one step's codec time into the mode's running cost per dense byte (plain DDP's averaging is the
        baseline every mode pays: it costs 0)."""
        if dense_bytes <= 0 or seconds <= 0 or not self.codecs[mode].lossy:
            return
        cost = seconds / dense_bytes
        prev = self.costs.get(mode)
        self.costs[mode] = cost if prev is None else (1 - _COST_EMA) * prev + _COST_EMA * cost

    def profiles(
        self,
        decisions: Sequence[Decision],
        layouts: Sequence[BucketLayout],
        errors: Sequence[float],
        costs: Sequence[float],
        updates: Sequence[float],
    ) -> dict[str, CodecProfile]:
        """One :class:`CodecProfile` per decision's mode from the agreed per-mode values (registry order)."""
        modes = list(self.codecs)
        out = {}
        for decision in decisions:
            codec = self.codecs.get(decision.mode)
            if codec is None or decision.mode in out:
                continue
            i = modes.index(decision.mode)
            err, cost, upd = (v[i] if i < len(v) else math.nan for v in (errors, costs, updates))
            out[decision.mode] = CodecProfile(
                mode=decision.mode,
                summable=codec.summable,
                lossy=codec.lossy,
                payload_bytes=tuple(codec.payload_bytes(layout, **decision.options) for layout in layouts),
                rel_error=None if math.isnan(err) else (err if codec.lossy else 0.0),
                seconds_per_byte=0.0 if math.isnan(cost) or not codec.lossy else cost,
                update_error=None if math.isnan(upd) else (upd if codec.lossy else 0.0),
            )
        return out

    def per_mode(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """This rank's compression errors, costs and update errors, one per registered mode (``nan``: unknown)."""
        modes = list(self.codecs)
        return (
            tuple(self.errors.get(m, math.nan) for m in modes),
            tuple(self.costs.get(m, math.nan) for m in modes),
            tuple(self.shadow.errors.get(m, math.nan) for m in modes),
        )

    # ------------------------------------------------------------------ calibration
    def calibrate(self, layout: BucketLayout, decisions: Sequence[Decision], device: torch.device) -> dict[str, float]:
        """Time each candidate codec on one bucket's worth of random data on ``device``; seed its cost per byte.

        Per mode: compress and the error-feedback settle, then the aggregation of one payload, counted once for a
        summed payload and ``world_size`` times for gathered ones (no payload is replicated: the cost does not
        grow with the world size). A private generator leaves the training's randomness untouched; the faster of
        two passes counts (a codec's first call pays one-time costs that a mode never run again would carry).
        Returns the measured seconds per dense byte, by mode.
        """
        self.calibrated = True
        dense = layout.numel * layout.itemsize
        if dense == 0:
            return {}
        one = BucketLayout(-2, layout.numel, layout.shapes, 1, layout.dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        base = torch.randn(layout.numel, generator=gen, device=device, dtype=torch.float32).to(layout.dtype)
        out = {}
        feedback = ErrorFeedback()  # scratch: the training's residuals are not touched
        for decision in decisions:
            if decision.mode in out or decision.mode not in self.codecs or not self.codecs[decision.mode].lossy:
                continue
            codec = type(self.codecs[decision.mode])()
            options = type(codec).validate_options(decision.options)
            passes = []
            for _ in range(2):
                grad = base.clone()
                _sync(device)
                t0 = time.perf_counter()
                compensated = feedback.compensate(0, grad) if codec.lossy else grad
                payload, ctx = codec.compress(compensated, one, **options)
                if codec.lossy:
                    bound = {"payload": payload, "ctx": ctx, "layout": one}
                    feedback.settle(0, compensated, functools.partial(codec.subtract_sent_, **bound))
                _sync(device)
                t1 = time.perf_counter()
                target = torch.empty(layout.numel, dtype=torch.float32, device=device)
                codec.aggregate_into(payload.clone(), ctx, one, target)
                _sync(device)
                t2 = time.perf_counter()
                gathers = 1 if codec.summable else layout.world_size
                passes.append((t1 - t0) + gathers * (t2 - t1))
                feedback.reset()
            out[decision.mode] = min(passes) / dense
        for mode, cost in out.items():
            self.costs.setdefault(mode, cost)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"mode_errors": dict(self.errors), "mode_cost": dict(self.costs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.errors = {str(k): float(v) for k, v in state.get("mode_errors", {}).items()}
        self.costs = {str(k): float(v) for k, v in state.get("mode_cost", {}).items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
