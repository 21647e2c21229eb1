"""Sense the link from the training traffic itself: fit ``t = alpha + bytes / B`` to the hook's collectives.

The maths are pure functions (tested with numbers alone); :class:`LinkEstimator` keeps a window of samples
with the ``update / compute / reset`` shape of a torchmetrics ``Metric``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from lightning_netsense.observation import LinkEstimate

__all__ = ["LinkEstimator", "fit_latency_bandwidth", "peak_in_flight", "queue_corrected_durations"]

_MIN_SECONDS = 1e-7


def queue_corrected_durations(launch: Sequence[float], end: Sequence[float]) -> list[float]:
    """Durations of collectives that share one link, each counted from when the link became free.

    A collective launched while an earlier one still runs only starts moving data when the link frees, so
    its duration is ``end - max(launch, previous end)``. Summed, the durations give the link's busy time.
    Results are in the input order.
    """
    if len(launch) != len(end):
        raise ValueError(f"Expected as many launch as end times, but got {len(launch)} and {len(end)}")
    order = sorted(range(len(launch)), key=lambda i: launch[i])
    out = [0.0] * len(launch)
    free_at = -math.inf
    for i in order:
        start = max(launch[i], free_at)
        out[i] = max(end[i] - start, _MIN_SECONDS)
        free_at = max(free_at, end[i])
    return out


def peak_in_flight(launch: Sequence[float], end: Sequence[float], nbytes: Sequence[float]) -> float:
    """Largest total of bytes belonging to collectives launched and not yet finished at one instant."""
    events = [(t, 1, b) for t, b in zip(launch, nbytes)] + [(t, 0, b) for t, b in zip(end, nbytes)]
    # at equal times, count the end first: a collective finishing as another starts is not concurrent with it
    events.sort(key=lambda e: (e[0], e[1]))
    cur = peak = 0.0
    for _, is_start, b in events:
        cur += b if is_start else -b
        peak = max(peak, cur)
    return peak


def fit_latency_bandwidth(
    nbytes: Sequence[float], seconds: Sequence[float], weights: Sequence[float] | None = None
) -> tuple[float, float]:
    """Weighted least-squares fit of ``seconds = alpha + nbytes / bandwidth``.

    Returns:
        ``(alpha, bandwidth)`` with ``alpha >= 0`` and ``bandwidth`` in bytes per second. With one distinct
        size (alpha and bandwidth cannot be told apart) or a non-positive slope, the smallest sample's time
        is taken as alpha's bound and the bandwidth follows from the rest.

    Raises:
        ValueError: on empty or mismatched input.
    """
    n = len(nbytes)
    if n == 0 or len(seconds) != n:
        raise ValueError(f"Expected equal, non-zero numbers of sizes and times, but got {n} and {len(seconds)}")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, nbytes)) / sw
    my = sum(wi * y for wi, y in zip(w, seconds)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, nbytes))
    sxy = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, nbytes, seconds))
    if sxx > 0 and sxy > 0:
        beta = sxy / sxx
        alpha = my - beta * mx
        if alpha >= 0:
            return alpha, 1.0 / beta
    # Degenerate or negative intercept: anchor alpha on the fastest small collective, fit the slope through it.
    i_min = min(range(n), key=lambda i: (nbytes[i], seconds[i]))
    alpha = max(0.0, min(seconds[i_min], min(seconds)))
    num = sum(wi * x * (y - alpha) for wi, x, y in zip(w, nbytes, seconds))
    den = sum(wi * x * x for wi, x in zip(w, nbytes))
    if num <= 0 or den <= 0:
        return alpha, math.inf
    return alpha, den / num


class LinkEstimator:
    """Windowed estimate of per-collective latency and bandwidth from the hook's own collectives.

    Each :meth:`update` adds one step's samples (wire bytes and queue-corrected duration per collective, as
    agreed by all ranks). :meth:`compute` fits ``t = alpha + bytes / B`` by least squares over the last
    ``window_steps`` steps, each step's samples weighted ``decay ** age`` so the fit follows drops and
    recoveries within a few steps. Because small samples pin alpha, heavily compressed traffic still
    measures the bandwidth instead of collapsing it into latency.

    Args:
        window_steps: steps of samples kept.
        decay: weight ratio between a step and the one after it, in (0, 1].

    Raises:
        ValueError: if an argument is out of range.
    """

    def __init__(self, window_steps: int = 8, decay: float = 0.6) -> None:
        if not isinstance(window_steps, int) or window_steps < 1:
            raise ValueError(f"Expected `window_steps` to be an integer >= 1, but got {window_steps!r}")
        if not (0.0 < decay <= 1.0):
            raise ValueError(f"Expected `decay` in (0, 1], but got {decay!r}")
        self.window_steps = window_steps
        self.decay = decay
        self._steps: deque[tuple[tuple[float, ...], tuple[float, ...]]] = deque(maxlen=window_steps)

    def update(self, nbytes: Sequence[float], seconds: Sequence[float]) -> None:
        """Add one step's samples; samples with no bytes or non-finite values are ignored."""
        if len(nbytes) != len(seconds):
            raise ValueError(f"Expected as many sizes as times, but got {len(nbytes)} and {len(seconds)}")
        keep = [
            (float(b), float(s))
            for b, s in zip(nbytes, seconds)
            if b > 0 and s > 0 and math.isfinite(b) and math.isfinite(s)
        ]
        self._steps.append((tuple(b for b, _ in keep), tuple(s for _, s in keep)))

    def compute(self) -> LinkEstimate:
        xs: list[float] = []
        ys: list[float] = []
        ws: list[float] = []
        for age, (b, s) in enumerate(reversed(self._steps)):
            weight = self.decay**age
            xs += b
            ys += s
            ws += [weight] * len(b)
        if not xs:
            return LinkEstimate()
        alpha, bandwidth = fit_latency_bandwidth(xs, ys, ws)
        return LinkEstimate(
            alpha=alpha,
            bandwidth=bandwidth,
            max_bandwidth=max(x / y for x, y in zip(xs, ys)),
            min_rtt=min(ys),
            samples=len(xs),
        )

    def reset(self) -> None:
        self._steps.clear()

    def state_dict(self) -> dict:
        return {"steps": [[list(b), list(s)] for b, s in self._steps]}

    def load_state_dict(self, state: dict) -> None:
        self._steps.clear()
        for b, s in state.get("steps", []):
            self._steps.append((tuple(float(x) for x in b), tuple(float(x) for x in s)))
