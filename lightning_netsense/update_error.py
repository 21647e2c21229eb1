"""The error the optimizer applies: a compressed gradient's effect on the update, not only on the gradient.

Adam-family optimizers divide every coordinate of the gradient by the square root of its second-moment estimate,
so an error on a coordinate whose gradient is small - invisible in ``||g - g_hat|| / ||g||`` - becomes an error of
the same size as any other coordinate's step, and in the first steps, when the estimate rests on a few gradients,
the update is close to ``sign(g_hat)``. The update error compares the update the optimizer would take from what
was sent with the one it would take from the exact gradient:

    d = sqrt((beta2 * v + (1 - beta2) * g**2) / (1 - beta2**t)) + eps
    update error e:  e**2 = sum((g_hat - g)**2 / d) / sum(g**2 / d)

where ``g`` is this rank's exact gradient, ``g_hat`` what it sent, ``v`` the optimizer's second-moment state before
its step ``t`` (zero before its first step), and ``beta2``, ``eps`` and the bias correction the optimizer's own: ``d``
is the divisor Adam applies to this step. ``e`` is the error of the step ``g_hat / d`` against ``g / d`` in the
optimizer's own geometry, ``d`` standing for the curvature: in the quadratic model the optimizer assumes, a step
from ``g_hat`` makes ``1 - e**2`` of the loss decrease of the exact step - 1 for the exact step, 0 for no step,
below 0 for a step that does harm. The policy credits each mode with that share of progress. A coordinate's error
counts in proportion to its gradient over ``d`` (about ``|g|`` for Adam): the rounding of tiny gradients to zero
(int8's, fp16's underflow) costs in proportion to how little they move the loss, and a step in a wrong direction -
a low-rank projection early in training, when ``d`` rests on a few gradients - costs in full. For SGD ``d = 1``:
the plain relative error of the gradient.

Statistics are taken on a fixed random sample of each bucket's coordinates, as device tensors with no host
synchronisation; they are read once per step, at the boundary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CURVATURE_FLOOR", "UPDATE_TERMS", "BucketSample", "Preconditioner", "SecondMoments", "relative", "update_terms"]

_ADAM_FAMILY = ("Adam", "AdamW", "NAdam", "RAdam")


@dataclass(frozen=True)
class _Moments:
    """How one parameter's optimizer scales its step: second moment ``beta2 * v + gain * g**2``."""

    state: dict
    key: str | None  # state key of the second moment, None without one
    beta2: float
    gain: float
    eps: float = 0.0
    bias_correction: bool = False


class SecondMoments:
    """Where each parameter's optimizer keeps its moments (read, never written).

    The strategy builds it from ``trainer.optimizers``; outside Lightning, build it from your optimizers and assign
    it to ``NetSenseState.second_moments``. Recognised: torch's Adam family (``exp_avg_sq``, ``betas``), ``RMSprop``
    (``square_avg``, ``alpha``) and ``Adagrad`` (``sum``); the parameters of SGD and of any optimizer not
    recognised are measured with the plain error.

    Args:
        optimizers: the optimizers whose states are read.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self._groups: dict[int, tuple[torch.optim.Optimizer, dict, str]] = {}
        #: every parameter of the optimizers, in their order (the shadow measurement picks its window from them)
        self.params: list[Tensor] = []
        for opt in optimizers:
            family = _family(opt)
            for group in opt.param_groups:
                for p in group["params"]:
                    self.params.append(p)
                    if family is not None:
                        self._groups[id(p)] = (opt, group, family)

    def moments(self, param: Tensor) -> _Moments | None:
        """How ``param``'s update is formed, or ``None`` where its optimizer is not recognised."""
        found = self._groups.get(id(param))
        if found is None:
            return None
        opt, group, family = found
        state = opt.state[param]
        eps = float(group.get("eps", 0.0))
        if family == "adam":
            beta2 = float(group["betas"][1])
            return _Moments(state, "exp_avg_sq", beta2, 1.0 - beta2, eps, True)
        if family == "rmsprop":
            alpha = float(group["alpha"])
            return _Moments(state, "square_avg", alpha, 1.0 - alpha, eps)
        if family == "adagrad":
            return _Moments(state, "sum", 1.0, 1.0, eps)
        return _Moments(state, None, 0.0, 0.0)  # sgd


def _family(opt: torch.optim.Optimizer) -> str | None:
    name = type(opt).__name__
    if name in _ADAM_FAMILY:
        return "adam"
    return {"RMSprop": "rmsprop", "Adagrad": "adagrad", "SGD": "sgd"}.get(name)


@dataclass(frozen=True)
class Preconditioner:
    """Per coordinate: ``a = beta2 * v``, ``gain = 1 - beta2``, the bias correction and ``eps`` of the optimizer's
    divisor (see the module docstring); ``a == 1``, ``gain == 0``, ``eps == 0`` where there is no second moment."""

    a: Tensor
    gain: Tensor
    bias_correction: Tensor
    eps: Tensor

    def weights(self, grad: Tensor) -> Tensor:
        """``1 / d`` of the module docstring for this step's exact ``grad``: ``d`` is the optimizer's
        ``sqrt(v_hat) + eps``, at least :data:`CURVATURE_FLOOR` of its median (``1`` without a second moment).
        A coordinate with neither gradient nor history weighs 0: it tells nothing of the loss (a weight on an input
        that is always zero), and the optimizer has no scale for it."""
        d = ((self.a + self.gain * grad * grad) / self.bias_correction).sqrt_()
        dead = d == 0
        if d.numel():
            d = torch.maximum(d, d.median() * CURVATURE_FLOOR)
        return d.add_(self.eps).reciprocal_().masked_fill_(dead, 0.0)


def preconditioner(parts: Sequence[tuple[Tensor, Tensor | None]], moments: SecondMoments | None) -> Preconditioner:
    """The :class:`Preconditioner` of the coordinates ``parts`` lists, concatenated.

    Args:
        parts: ``(parameter, positions)`` pairs: the coordinates of each parameter, in order (``None``: all of them).
        moments: where the optimizers keep their moments (``None``: the plain error on every coordinate).
    """
    cols: list[list[Tensor]] = [[], [], [], []]
    for param, local in parts:
        n = param.numel() if local is None else local.numel()
        device = param.device
        m = moments.moments(param) if moments is not None else None

        def full(value: float) -> Tensor:
            return torch.full((n,), value, dtype=torch.float32, device=device)  # noqa: B023

        if m is None or m.key is None:  # the plain error
            for col, value in zip(cols, (1.0, 0.0, 1.0, 0.0)):
                col.append(full(value))
            continue
        v = m.state.get(m.key)
        if v is None:  # before the optimizer's first step: the estimate is this step's alone
            a = full(0.0)
        else:
            flat = v.detach().reshape(-1)
            a = (flat if local is None else flat.index_select(0, local)).float() * m.beta2
        if m.bias_correction:  # 1 - beta2 ** (t + 1) for the optimizer's coming step t + 1
            step = m.state.get("step", 0)
            if isinstance(step, Tensor) and step.device.type != "cpu":  # a capturable optimizer: stay on the device
                bc = (1.0 - m.beta2 ** (step.detach().to(device=device, dtype=torch.float32) + 1)).expand(n)
            else:  # a count in host memory (torch's default): read without waiting for the device
                count = step.detach().tolist() if isinstance(step, Tensor) else step
                bc = full(1.0 - m.beta2 ** (float(count) + 1))
        else:
            bc = full(1.0)
        for col, value in zip(cols, (a, full(m.gain), bc, full(m.eps))):
            col.append(value)
    if not parts:
        return Preconditioner(*(torch.empty(0) for _ in cols))
    return Preconditioner(*(torch.cat(col) for col in cols))


class BucketSample:
    """A fixed random sample of one bucket's coordinates, where each falls in the bucket's gradients, and the
    momenta of the exact and of the sent gradient on it.

    Args:
        numel: elements of the flat bucket.
        sizes: elements of each gradient in the bucket, in bucket order.
        size: coordinates sampled (all of them when the bucket is smaller).
        device: the bucket's device.
        seed: seed of the sample (local to this rank: the statistics are agreed afterwards, not the sample).
    """

    def __init__(self, numel: int, sizes: Sequence[int], size: int, device: torch.device, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(0x5A3 + seed)
        #: the bucket layout the sample was drawn for (set by its owner; a new layout needs a new sample)
        self.layout: object = None
        flat = torch.arange(numel) if numel <= size else torch.randperm(numel, generator=gen)[:size].sort().values
        self.indices = flat.to(device)
        #: per gradient with sampled coordinates: its position in the bucket and the positions inside it
        self.parts: list[tuple[int, Tensor]] = []
        lo = offset = 0
        for i, n in enumerate(sizes):
            hi = lo + int(torch.searchsorted(flat[lo:], offset + n))
            if hi > lo:
                self.parts.append((i, (flat[lo:hi] - offset).to(device)))
            lo, offset = hi, offset + n

    def gather(self, flat: Tensor) -> Tensor:
        """The sampled coordinates of a flat bucket-sized tensor, as float32."""
        return flat.reshape(-1).index_select(0, self.indices).float()

    def preconditioner(self, params: Sequence[Tensor], moments: SecondMoments | None) -> Preconditioner:
        """The :class:`Preconditioner` of the sampled coordinates (``params``: the bucket's, in bucket order)."""
        return preconditioner([(params[i], local) for i, local in self.parts], moments)

    def step(self, exact: Tensor, sent: Tensor, pre: Preconditioner, target: Tensor | None = None) -> Tensor:
        """:func:`update_terms` of this step's gradients at the sampled coordinates."""
        return update_terms(exact, sent, pre, target)


#: entries of :func:`update_terms`
UPDATE_TERMS = ("error", "exact", "flips", "count")
#: ``d`` counts at least this share of its median: a coordinate with a gradient and history far below the others'
#: would otherwise weigh without bound
CURVATURE_FLOOR = 1e-2


def update_terms(exact: Tensor, sent: Tensor, pre: Preconditioner, target: Tensor | None = None) -> Tensor:
    """The sums behind :func:`relative`, as one float32 tensor of :data:`UPDATE_TERMS` on the inputs' device.

    With ``1 / d = pre.weights(exact)`` and ``c = target`` (what the codec was asked to send: the exact gradient plus
    the error-feedback residual it owes; ``exact`` by default): ``sum (sent - c)^2 / d``, ``sum c^2 / d``, the sign
    flips (coordinates where ``sent`` and ``exact`` have opposite signs) and the number of coordinates.
    """
    c = exact if target is None else target
    w = pre.weights(exact)
    flips = (exact * sent < 0).sum().float()
    count = exact.new_full((), float(exact.numel()))
    return torch.stack([((sent - c).square() * w).sum(), (c.square() * w).sum(), flips, count])


def relative(terms: Sequence[float]) -> tuple[float, float]:
    """``(update error, fraction of flipped signs)`` from summed :func:`update_terms` (``nan`` if none measured)."""
    num, den, flips, count = (float(x) for x in terms)
    if count <= 0 or not (math.isfinite(num) and math.isfinite(den)):
        return math.nan, math.nan
    if den <= 0:
        return (0.0 if num == 0 else math.inf), flips / count
    return math.sqrt(num / den), flips / count
