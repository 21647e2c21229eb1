"""Measure every candidate as if it ran: each codec on a window of the real gradients, every step, unsent.

The policy must price a mode before it runs, and what a mode costs in training progress depends on the model, the
optimizer and the point of training (early in Adam's training a low-rank projection's error is a full-size step in
the wrong direction; later the same codec may cost little). So every candidate codec runs, each step, on a copy of
a small window of this rank's gradients - row blocks of a few of the model's matrices, a bounded number of elements
- with its own error-feedback residual, exactly as the hook would run it but with nothing sent.
Its update error (:mod:`~lightning_netsense.update_error`), averaged over the last steps, is what the policy prices
the mode with.

The average is taken of ``e**2``, the share of a step's progress the mode loses, so that the price is the expected
progress per step: a low-rank projection's error can swing widely from one step to the next (early in training
with Adam), and a single quiet step must neither make it look safe nor a
single bad one rule it out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_netsense.codecs import BucketLayout, Codec
from lightning_netsense.feedback import ErrorFeedback
from lightning_netsense.observation import Decision
from lightning_netsense.update_error import Preconditioner, SecondMoments, preconditioner, relative, update_terms

__all__ = ["ShadowMeter", "window_blocks"]


def window_blocks(shapes: Sequence[tuple[int, ...]], budget: int, blocks: int) -> list[tuple[int, int]]:
    """Which matrices the window samples, and how many of their rows: ``[(position, rows), ...]``.

    Up to ``blocks`` matrices (tensors of two or more dimensions), spread evenly over ``shapes`` (first, last and
    between), each contributing whole rows, evenly spaced, up to ``budget / blocks`` elements (at least one row):
    leading rows alone would be unrepresentative (the first rows of a byte embedding are control characters).
    Vectors (biases, norms) are left out: every codec treats them alike.
    """
    matrices = [i for i, s in enumerate(shapes) if len(s) >= 2 and math.prod(s) > 0]
    if not matrices:
        return []
    count = min(blocks, len(matrices))
    if count == 1:
        picked = [matrices[len(matrices) // 2]]
    else:
        picked = sorted({matrices[round(k * (len(matrices) - 1) / (count - 1))] for k in range(count)})
    share = max(budget // len(picked), 1)
    out = []
    for i in picked:
        row = math.prod(shapes[i][1:])
        out.append((i, max(1, min(shapes[i][0], share // row))))
    return out


class ShadowMeter:
    """Runs every lossy candidate codec on a window of the gradients each step and measures its update error.

    Args:
        budget: most gradient elements in the window.
        blocks: matrices the window takes row blocks from.
        smoothing: weight of the newest step in the running mean of each mode's ``e**2``, in (0, 1] (1: the last
            step alone).
    """

    __slots__ = (
        "_codecs",
        "_feedback",
        "_filled",
        "_mean_sq",
        "_params",
        "_pre_parts",
        "_rows",
        "_window",
        "blocks",
        "budget",
        "errors",
        "smoothing",
    )

    def __init__(self, budget: int = 1 << 16, blocks: int = 4, smoothing: float = 0.125) -> None:
        self.budget = budget
        self.blocks = blocks
        self.smoothing = smoothing
        self._mean_sq: dict[str, float] = {}
        self._params: list[Tensor] = []  # the window's matrices, in window order
        self._rows: dict[int, tuple[int, Tensor, int]] = {}  # id(param) -> (window offset, row indices, elements)
        self._window: Tensor | None = None
        self._filled = 0
        self._codecs: dict[str, Codec] = {}
        self._feedback = ErrorFeedback()
        self._pre_parts: list[tuple[Tensor, Tensor | None]] = []
        #: per mode, the root of the running mean of the squared update error (see
        #: :mod:`~lightning_netsense.update_error`)
        self.errors: dict[str, float] = {}

    @property
    def ready(self) -> bool:
        """Whether a window has been chosen."""
        return bool(self._params)

    def choose(self, params: Sequence[Tensor]) -> None:
        """Pick the window's matrices among ``params`` (the model's, in order; see :func:`window_blocks`)."""
        picked = window_blocks([tuple(p.shape) for p in params], self.budget, self.blocks)
        self._params = [params[i] for i, _ in picked]
        self._rows.clear()
        offset = 0
        self._pre_parts = []
        for i, rows in picked:
            p = params[i]
            cols = math.prod(p.shape[1:])
            index = torch.linspace(0, p.shape[0] - 1, rows).round().long().unique().to(p.device)
            n = index.numel() * cols
            self._rows[id(p)] = (offset, index, n)
            coords = (index[:, None] * cols + torch.arange(cols, device=p.device)).reshape(-1)
            self._pre_parts.append((p, coords))
            offset += n
        self._window = torch.zeros(offset, dtype=torch.float32, device=self._params[0].device) if offset else None
        self.reset()

    def reset(self) -> None:
        """Forget every candidate's residual (a new run, a resume, a new window)."""
        self._codecs.clear()
        self._feedback.reset()
        self._filled = 0
        self._mean_sq.clear()
        self.errors.clear()

    def capture(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """Copy the window's rows from one bucket's gradients (``params`` and ``grads`` in bucket order)."""
        if self._window is None:
            return
        for p, g in zip(params, grads):
            found = self._rows.get(id(p))
            if found is not None:
                offset, index, n = found
                rows = g.reshape(g.shape[0], -1).index_select(0, index)
                self._window[offset : offset + n].copy_(rows.reshape(-1))
                self._filled += n

    def measure(self, codecs: dict[str, Codec], decisions: Sequence[Decision], moments: SecondMoments | None) -> None:
        """Run every lossy candidate on the captured window and update :attr:`errors` (at a step boundary)."""
        window, filled = self._window, self._filled
        self._filled = 0
        if window is None or filled < window.numel():
            return  # not every block arrived this step (no synchronising backward, or a new window)
        pre = preconditioner(self._pre_parts, moments)
        layout = BucketLayout(-1, window.numel(), self._shapes(), 1)
        modes, terms = [], []
        for decision in decisions:
            proto = codecs.get(decision.mode)
            if proto is None or not proto.lossy or decision.mode in modes:
                continue
            modes.append(decision.mode)
            terms.append(self._run(decision, proto, window, layout, pre))
        if terms:
            for mode, t in zip(modes, torch.stack(terms).tolist()):
                err, _ = relative(t)
                if math.isfinite(err):
                    last = self._mean_sq.get(mode)
                    sq = err * err if last is None else last + self.smoothing * (err * err - last)
                    self._mean_sq[mode] = sq
                    self.errors[mode] = math.sqrt(sq)

    def _shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple((self._rows[id(p)][1].numel(), *p.shape[1:]) for p in self._params)

    def _run(self, decision: Decision, proto: Codec, window: Tensor, layout: BucketLayout, pre: Preconditioner):
        codec = self._codecs.get(decision.mode)
        if codec is None:
            codec = self._codecs[decision.mode] = type(proto)()
        options = type(codec).validate_options(decision.options)
        # each mode its own residual, keyed apart from the others (ErrorFeedback keys by an integer)
        key = list(self._codecs).index(decision.mode)
        compensated = self._feedback.compensate(key, window)
        target = compensated.clone()
        payload, ctx = codec.compress(compensated, layout, **options)
        sent = codec.decompress(payload, ctx, layout).reshape(-1).float()
        # the residual, and the codec's own per-step state (PowerSGD's factors) advanced as the hook would
        self._feedback.settle(key, compensated, lambda c: c.sub_(sent))
        if codec.bucket_state:
            codec.aggregate_into(payload.clone(), ctx, layout, torch.empty_like(window))
        return update_terms(window, sent, pre, target)
