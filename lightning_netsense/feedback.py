"""Error feedback ("memory" in GRACE): what a lossy codec did not send this step is added to the next step.

Kept apart from the codecs so that any codec combines with it. One float32 residual per bucket, keyed by
``bucket.index()``, whatever the bucket's own precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Per-bucket residual memory.

    Per bucket and step: ``c = grad + residual``; the codec sends ``sent``; the residual becomes ``c - sent``.
    Summed over steps, what was sent plus the final residual equals the sum of the gradients.

    The hook uses :meth:`compensate` and :meth:`settle`, which work in the residual's own memory (a fresh
    full-size tensor per bucket and step costs more than the arithmetic: page faults of the new allocation), and
    return statistics as tensors: nothing waits for the device. A step whose gradient or residual was not finite
    (an AMP step the scaler skips) is found at the step boundary, where the owner calls :meth:`discard`.

    Across a plain step, a bucket's residual is :meth:`fold`-ed into the gradient that plain DDP sends: what error
    feedback owes is delivered, not kept for a lossy mode that may come back much later.
    """

    __slots__ = ("_err2", "_residuals", "resets")

    def __init__(self) -> None:
        self._residuals: dict[int, Tensor] = {}
        # squared norm of each residual, kept when it is made (so that `norm` needs no pass over the memory)
        self._err2: dict[int, Tensor] = {}
        #: number of times a bucket's residual was dropped because its gradient or residual was not finite
        self.resets = 0

    def compensate(self, index: int, grad: Tensor) -> Tensor:
        """``grad`` plus the bucket's residual, in float32 in the residual's memory (a float32 copy if none).

        The result belongs to the feedback: pass it to :meth:`settle` after compressing it. ``grad`` is unchanged.
        """
        residual = self._residuals.pop(index, None)
        self._err2.pop(index, None)
        if residual is None or residual.shape != grad.shape or residual.device != grad.device:
            return grad.to(torch.float32, copy=True)
        return residual.add_(grad)

    def settle(
        self,
        index: int,
        compensated: Tensor,
        subtract_sent: Callable[[Tensor], Tensor],
        residual_sq_norm: Callable[[Tensor], Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Keep ``subtract_sent(compensated)`` (``compensated - sent``, in place if it can) as the residual.

        Args:
            index: the bucket.
            compensated: ``grad + residual`` from :meth:`compensate`.
            subtract_sent: forms the new residual from ``compensated`` (a codec's ``subtract_sent_``).
            residual_sq_norm: given ``||compensated||^2``, the new residual's squared norm when it is known without
                a pass over it (a codec's ``residual_sq_norm``), or ``None`` to measure it.

        Returns:
            ``(||compensated - sent||^2, ||compensated||^2)`` as 0-dimensional tensors on the bucket's device
            (non-finite where the input was).
        """
        ref2 = torch.linalg.vector_norm(compensated).square()
        residual = subtract_sent(compensated)
        known = residual_sq_norm(ref2) if residual_sq_norm is not None else None
        err2 = torch.linalg.vector_norm(residual).square() if known is None else known
        self._residuals[index] = residual
        self._err2[index] = err2
        return err2, ref2

    def fold(self, index: int, grad: Tensor) -> bool:
        """Add the bucket's residual into ``grad`` (in place) and forget it; returns whether there was one."""
        residual = self._residuals.pop(index, None)
        self._err2.pop(index, None)
        if residual is None or residual.shape != grad.shape or residual.device != grad.device:
            return False
        grad.add_(residual.view_as(grad))
        return True

    def discard(self, index: int, not_finite: bool = False) -> None:
        """Forget the bucket's residual: its layout changed, or (``not_finite``) its step was not finite."""
        if self._residuals.pop(index, None) is not None and not_finite:
            self.resets += 1
        self._err2.pop(index, None)

    def reset(self) -> None:
        """Drop every residual (e.g. on resume: residuals are per rank and are not checkpointed)."""
        self._residuals.clear()
        self._err2.clear()

    def squared_norm(self) -> Tensor | None:
        """Squared L2 norm of all residuals together, a 0-dimensional device tensor (``None`` without residuals),
        from the squared norms kept when each residual was made."""
        if not self._err2:
            return None
        return torch.stack([e.float().reshape(()) for e in self._err2.values()]).sum()

    def norm(self) -> float:
        """L2 norm of all residuals together (reads the device)."""
        total = self.squared_norm()
        return 0.0 if total is None else math.sqrt(max(float(total), 0.0))

    def residual(self, index: int) -> Tensor | None:
        return self._residuals.get(index)

    def __len__(self) -> int:
        return len(self._residuals)
