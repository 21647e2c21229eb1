"""Error feedback ("memory" in GRACE): what a lossy codec did not send this step is added to the next step.

Kept apart from the codecs so that any codec combines with it. One residual per bucket, keyed by
``bucket.index()``; a non-finite gradient (an AMP step the scaler will skip) resets that bucket's residual
instead of poisoning every later step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Per-bucket residual memory.

    Per bucket and step: ``g = grad + residual``; the codec sends ``sent``; the residual becomes ``g - sent``.
    Summed over steps, what was sent plus the final residual equals the sum of the gradients.
    """

    __slots__ = ("_residuals", "resets")

    def __init__(self) -> None:
        self._residuals: dict[int, Tensor] = {}
        #: number of residuals dropped because a gradient or residual was not finite
        self.resets = 0

    def apply(self, index: int, grad: Tensor) -> Tensor:
        """Return ``grad`` plus the bucket's residual (``grad`` itself, unchanged, when there is none)."""
        residual = self._residuals.get(index)
        if residual is None or residual.shape != grad.shape or residual.device != grad.device:
            return grad
        return grad + residual

    def update(self, index: int, compensated: Tensor, sent: Tensor) -> tuple[float, float]:
        """Keep ``compensated - sent`` as the bucket's residual.

        Returns:
            ``(||compensated - sent||^2, ||compensated||^2)`` for the error statistic, or ``(nan, nan)`` if
            the input was not finite (the residual is then reset).
        """
        residual = compensated - sent
        # float32 norms: a statistic, not arithmetic that feeds back (a float64 copy of a 25 MB bucket is not free)
        err2 = float(torch.linalg.vector_norm(residual)) ** 2
        ref2 = float(torch.linalg.vector_norm(compensated)) ** 2
        if not (math.isfinite(err2) and math.isfinite(ref2)):
            if self._residuals.pop(index, None) is not None:
                self.resets += 1
            return math.nan, math.nan
        self._residuals[index] = residual
        return err2, ref2

    def discard(self, index: int) -> None:
        self._residuals.pop(index, None)

    def reset(self) -> None:
        """Drop every residual (e.g. on resume: residuals are per rank and are not checkpointed)."""
        self._residuals.clear()

    def norm(self) -> float:
        """L2 norm of all residuals together."""
        total = sum(float(torch.linalg.vector_norm(r)) ** 2 for r in self._residuals.values())
        return math.sqrt(total)

    def residual(self, index: int) -> Tensor | None:
        return self._residuals.get(index)

    def __len__(self) -> int:
        return len(self._residuals)

    def state_tensors(self) -> dict[int, Tensor]:
        return {k: v.detach().clone() for k, v in self._residuals.items()}

    def load_state_tensors(self, state: dict[int, Tensor]) -> None:
        self._residuals = {int(k): torch.as_tensor(v).clone() for k, v in state.items()}
