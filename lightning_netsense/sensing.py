"""Sense the link from the training traffic itself: fit ``t = alpha + bytes / B`` to the hook's collectives.

The maths are pure functions (tested with numbers alone); :class:`LinkEstimator` keeps a window of per-step
samples with the ``update / compute / reset`` shape of a torchmetrics ``Metric``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_netsense._validation import check_int, check_number
from lightning_netsense.observation import LinkEstimate

__all__ = [
    "LinkEstimator",
    "fit_latency_bandwidth",
    "peak_in_flight",
    "queue_corrected_durations",
    "step_fit",
    "weighted_median",
]

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


def weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    """The value at which the cumulative weight of the sorted values first reaches half of the total.

    When the half falls exactly on a boundary between two values, their mean is returned, so that the
    result does not depend on the input order.

    Raises:
        ValueError: on empty or mismatched input, or weights that are negative or all zero.
    """
    if not values or len(values) != len(weights):
        raise ValueError(f"Expected equal, non-zero numbers of values and weights, got {len(values)}, {len(weights)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"Expected non-negative weights with a positive sum, but got {list(weights)}")
    pairs = sorted(zip(values, weights))
    half = 0.5 * sum(w for _, w in pairs)
    cum = 0.0
    for i, (v, w) in enumerate(pairs):
        cum += w
        if math.isclose(cum, half, rel_tol=1e-12) and i + 1 < len(pairs):
            return 0.5 * (v + pairs[i + 1][0])
        if cum > half:
            return v
    return pairs[-1][0]


def fit_latency_bandwidth(
    nbytes: Sequence[float],
    seconds: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    alpha: float | None = None,
) -> tuple[float, float]:
    """Weighted least-squares fit of ``seconds = alpha + nbytes / bandwidth`` with ``alpha, 1/bandwidth >= 0``.

    Args:
        nbytes: wire bytes of each sample.
        seconds: duration of each sample.
        weights: weight of each sample (default: all 1).
        alpha: a known latency; when given, only the slope is fitted (through ``alpha``). Needed when every
            sample has the same size: latency and bandwidth cannot be told apart from one size alone.

    Returns:
        ``(alpha, bandwidth)``, ``bandwidth`` in bytes per second (``math.inf`` when the times do not grow
        with size). With one distinct size and no ``alpha``, all of the time is attributed to the bandwidth
        (``alpha = 0``): the plain delivery rate, a lower bound of the bandwidth.

    Raises:
        ValueError: on empty or mismatched input.
    """
    n = len(nbytes)
    if n == 0 or len(seconds) != n or (weights is not None and len(weights) != n):
        raise ValueError(f"Expected equal, non-zero numbers of sizes and times, but got {n} and {len(seconds)}")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    sw = sum(w)
    if alpha is None and max(nbytes) - min(nbytes) > 1e-9 * max(nbytes):
        mx = sum(wi * x for wi, x in zip(w, nbytes)) / sw
        my = sum(wi * y for wi, y in zip(w, seconds)) / sw
        sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, nbytes))
        sxy = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, nbytes, seconds))
        beta = sxy / sxx
        if beta <= 0:
            # times do not grow with size: pure latency at this resolution
            return max(0.0, my), math.inf
        if my - beta * mx >= 0:
            return my - beta * mx, 1.0 / beta
        alpha = 0.0  # a negative intercept is noise: refit through the origin
    alpha = max(0.0, 0.0 if alpha is None else float(alpha))
    num = sum(wi * x * (y - alpha) for wi, x, y in zip(w, nbytes, seconds))
    den = sum(wi * x * x for wi, x in zip(w, nbytes))
    if num <= 0 or den <= 0:
        return alpha, math.inf
    return alpha, den / num


def step_fit(
    nbytes: Sequence[float], seconds: Sequence[float], alpha: float | None, min_size_ratio: float = 2.0
) -> tuple[float | None, float]:
    """Latency and seconds-per-byte of one step's samples.

    When the sizes span at least ``min_size_ratio`` (in practice: the tiny latency probe next to the
    gradient buckets), both are fitted from the step alone. Otherwise latency cannot be separated from
    bandwidth and ``alpha`` (the estimate from other steps) is subtracted from every sample instead.

    Returns:
        ``(alpha_or_None, beta)``: the step's own latency (``None`` when it could not be fitted) and its
        seconds per byte ``beta >= 0`` (``0`` means faster than the timer can resolve).
    """
    if max(nbytes) >= min_size_ratio * min(nbytes):
        a, bandwidth = fit_latency_bandwidth(nbytes, seconds)
        return a, 0.0 if math.isinf(bandwidth) else 1.0 / bandwidth
    base = 0.0 if alpha is None else alpha
    busy = sum(seconds) - base * len(seconds)
    return None, max(0.0, busy / sum(nbytes))


class LinkEstimator:
    """Windowed estimate of per-collective latency and bandwidth from the hook's own collectives.

    Each :meth:`update` adds one step's samples: wire bytes and queue-corrected duration of every gradient
    collective, plus the tiny latency probe (the previous step's agreement ``all_gather``), as agreed by all
    ranks. :meth:`compute`:

    1. fits ``t = alpha_j + beta_j * bytes`` per step ``j`` (:func:`step_fit`). The probe's few hundred bytes
       next to the buckets pin ``alpha_j``, so heavily compressed traffic still measures ``beta_j`` instead of
       collapsing the bandwidth into latency (``bytes / t`` would, once ``t`` is mostly latency);
    2. takes the weighted median over the window of ``alpha_j`` (steps that could fit it; else the last
       fitted value is held; never above the window's fastest collective) and of ``beta_j`` (steps that could
       not fit alpha subtract that estimate), each step weighted ``decay ** age``, and for ``beta_j`` also by
       the largest payload it moved (a compressed step's few kilobytes carry little information on the link).

    The weighted median is why one straggler or a first-step connection set-up does not move the estimate
    (with ``decay > 0.5`` no single step holds half the weight) while a real change of the link - a drop or a
    recovery, compressed or not - takes over as soon as its steps hold half the weight: two steps with the
    defaults. Samples expire after ``window_steps`` steps, and :attr:`LinkEstimate.max_bandwidth` /
    :attr:`LinkEstimate.min_rtt` are BBR's windowed max delivery rate and min duration over the same window.

    Args:
        window_steps: steps of samples kept (>= 1).
        decay: weight ratio between a step and the one after it, in (0, 1]. Above 0.5 a single outlying step
            never holds the median; closer to 1, more steps are needed to follow a change.
        min_size_ratio: largest over smallest sample size (> 1) from which a step fits its own latency.
        resolution: seconds (>= 0) below which the transfer time a step attributes to bandwidth is taken as
            timer/scheduling noise (the step then votes "faster than measurable"). 1 ms suits gloo on CPU;
            CUDA event timing resolves far less.
        fast_drop: ratio (> 1) by which the newest step must be slower than the median to be taken at once...
        fast_drop_time: ... provided its transfer took at least this many seconds (a stall is milliseconds).
            ``math.inf`` for either turns the fast drop off.
        max_filter_steps: a step among this many recent ones (>= 1) whose transfer time was below
            ``resolution`` makes the estimate "faster than measurable" (infinite), whatever the median says.
        vouch_fraction: a window whose largest sample is below this fraction (in (0, 1]) of the largest
            sample ever seen may *lower* the bandwidth estimate but not raise it above the last estimate of a
            window that moved larger payloads. Small payloads pass a token bucket (a shaper's burst, a
            switch buffer) at line rate: a few kilobytes of PowerSGD behind a shaper read as an infinite
            bandwidth, and relaxing on that estimate costs a dense step on the slow link.

    Raises:
        ValueError: if an argument is out of range.
    """

    def __init__(
        self,
        window_steps: int = 8,
        decay: float = 0.7,
        min_size_ratio: float = 2.0,
        resolution: float = 1e-3,
        max_filter_steps: int = 3,
        fast_drop: float = 4.0,
        fast_drop_time: float = 0.05,
        vouch_fraction: float = 0.25,
    ) -> None:
        self.window_steps = check_int("window_steps", window_steps, low=1)
        self.decay = check_number("decay", decay, low=0, high=1, low_open=True)
        self.min_size_ratio = check_number("min_size_ratio", min_size_ratio, low=1, low_open=True)
        self.resolution = check_number("resolution", resolution, low=0, unit="of seconds")
        self.max_filter_steps = check_int("max_filter_steps", max_filter_steps, low=1)
        # math.inf turns the fast drop off
        self.fast_drop = check_number("fast_drop", fast_drop, low=1, low_open=True, allow_inf=True)
        self.fast_drop_time = check_number("fast_drop_time", fast_drop_time, low=0, allow_inf=True, unit="of seconds")
        self.vouch_fraction = check_number("vouch_fraction", vouch_fraction, low=0, high=1, low_open=True)
        self._steps: deque[tuple[tuple[float, ...], tuple[float, ...]]] = deque(maxlen=window_steps)
        # fits of the window's steps with spread sizes, by (sizes, seconds): such a fit does not depend on the
        # latency estimate, and refitting every step of the window at every compute() dominated the boundary
        self._fits: dict[tuple[tuple[float, ...], tuple[float, ...]], tuple[float | None, float]] = {}
        # last latency fitted from a step with spread sizes: used once every such step has left the window
        self._held_alpha: float | None = None
        # largest sample ever seen, and the bandwidth of the last window whose payloads were comparable to it
        self._ref_bytes = 0.0
        self._held_bandwidth: float | None = None
        # the newest step's samples are provisional (see `update`)
        self._provisional = False

    def update(
        self,
        nbytes: Sequence[float],
        seconds: Sequence[float],
        reference: float | None = None,
        provisional: bool = False,
    ) -> None:
        """Add one step's samples; samples with no bytes or non-finite values are ignored.

        Args:
            nbytes: wire bytes of each sample.
            seconds: duration of each sample.
            reference: wire bytes of the largest *dense* payload of the current layout (the hook passes its
                largest bucket). Samples are compared with it for ``vouch_fraction``; without it, the largest
                sample ever seen is the reference (DDP's first-step buckets differ from the rebuilt ones).
            provisional: the step's samples stand only until the next step's arrive, and never vouch: a process
                group's first collectives also pay its set-up (connections, buffers, TCP's slow start).
        """
        if len(nbytes) != len(seconds):
            raise ValueError(f"Expected as many sizes as times, but got {len(nbytes)} and {len(seconds)}")
        if self._provisional and self._steps:
            self._steps.pop()
        self._provisional = provisional
        keep = [
            (float(b), float(s))
            for b, s in zip(nbytes, seconds)
            if b > 0 and s > 0 and math.isfinite(b) and math.isfinite(s)
        ]
        before = self.compute() if self._steps else None
        self._steps.append((tuple(b for b, _ in keep), tuple(s for _, s in keep)))
        if before is not None and keep and math.isfinite(before.bandwidth):
            # A drop that cannot be a stall: this step is `fast_drop` times slower than the estimate *and* spent
            # at least `fast_drop_time` on the transfer. The older steps describe a link that is gone: drop them
            # rather than wait for the median (each slow step costs seconds on a slow link; a scheduler stall
            # costs milliseconds).
            b_new, s_new = self._steps[-1]
            alpha = before.alpha
            newest = self._resolved_beta(b_new, s_new, alpha)
            spread = max(b_new) - (min(b_new) if max(b_new) >= self.min_size_ratio * min(b_new) else 0.0)
            if newest >= self.fast_drop / before.bandwidth and newest * spread >= self.fast_drop_time:
                last = self._steps[-1]
                self._steps.clear()
                self._steps.append(last)
        if len(self._fits) > 2 * self.window_steps:
            window = set(self._steps)
            self._fits = {k: v for k, v in self._fits.items() if k in window}
        # hold the newest fitted latency now, so that it survives its step leaving the window
        alpha = self._alpha()
        if alpha is not None:
            self._held_alpha = alpha
        largest = self._window_largest()
        if reference is not None and reference > 0 and math.isfinite(reference):
            self._ref_bytes = float(reference)
        if largest > 0 and reference is None:
            self._ref_bytes = max(self._ref_bytes, largest)
        if not provisional and self.vouches(max(self._steps[-1][0], default=0.0)):
            # only a step that itself moved a vouching payload updates the held estimate: recomputed at every
            # step while an old vouching sample aged in the window, it would follow the small payloads' burst-fed
            # rates
            self._held_bandwidth = self._window_estimate().bandwidth

    def compute(self) -> LinkEstimate:
        """The current estimate; ``LinkEstimate()`` (``samples == 0``, infinite bandwidth) before any sample.

        The window's estimate, but never above the estimate taken at the last step that moved a vouching payload
        (at least ``vouch_fraction`` of the largest dense bucket): small payloads may lower the bandwidth, only
        vouching ones raise it. Before any step could vouch the estimate says so (``vouched=False``): it may rest
        on a burst.
        """
        est = self._window_estimate()
        held = self._held_bandwidth
        if held is None:
            return dataclasses.replace(est, vouched=False)
        if est.bandwidth > held:
            return dataclasses.replace(est, bandwidth=held)
        return est

    @property
    def provisional(self) -> bool:
        """Whether the newest step's samples are provisional (see :meth:`update`)."""
        return self._provisional

    @property
    def vouched(self) -> bool:
        """Whether a window whose payloads could measure the link has been seen (see ``vouch_fraction``)."""
        return self._held_bandwidth is not None

    def vouches(self, nbytes: float) -> bool:
        """Whether a sample of ``nbytes`` wire bytes may raise the estimate (see ``vouch_fraction``)."""
        return nbytes > 0 and nbytes >= self.vouch_fraction * self._ref_bytes

    def _window_largest(self) -> float:
        return max((max(b) for b, _ in self._steps if b), default=0.0)

    def _window_estimate(self) -> LinkEstimate:
        steps = [(b, s, self.decay**age) for age, (b, s) in enumerate(reversed(self._steps)) if b]
        if not steps:
            return LinkEstimate()
        all_b = [x for b, _, _ in steps for x in b]
        all_s = [x for _, s, _ in steps for x in s]
        alpha = self._alpha()
        if alpha is None:
            alpha = self._held_alpha
        if alpha is not None:
            # t = alpha + b / B >= alpha for every sample: a slow, tiny collective (the boundary's agreement,
            # delayed by the scheduler) must not push the latency above what a whole bucket took
            alpha = min(alpha, min(all_s))
        betas = [self._resolved_beta(b, s, alpha) for b, s, _ in steps]
        # A step informs the slope in proportion to the bytes it moved: a compressed step's few kilobytes are
        # mostly latency and noise, a dense step's megabytes are mostly transfer.
        beta = weighted_median(betas, [w * max(b) for b, _, w in steps])
        # A max filter for what medians handle badly: delay spikes (a stalled backend thread on a loaded
        # machine) only ever make a step look slower, and when they cluster they outvote the steps whose
        # transfer was too fast to measure. A step of the last `max_filter_steps` that could not resolve any
        # transfer time shows the link faster than measurable at its sizes: take that. Steps that resolve a
        # rate stay with the median (a tbf burst makes single steps look faster than the link).
        # Only steps that moved bytes comparable to the window's largest sample may vouch for "faster than
        # measurable": a compressed step's few kilobytes are unmeasurable on a slow link as well.
        largest = max(max(b) for b, _, _ in steps)
        recent = zip(betas[: self.max_filter_steps], steps[: self.max_filter_steps])
        if any(beta_j == 0.0 and max(b) >= self.vouch_fraction * largest for beta_j, (b, _, _) in recent):
            beta = 0.0

        return LinkEstimate(
            alpha=0.0 if alpha is None else alpha,
            bandwidth=math.inf if beta <= 0 else 1.0 / beta,
            max_bandwidth=max(x / y for x, y in zip(all_b, all_s)),
            min_rtt=min(all_s),
            samples=len(all_b),
        )

    def _resolved_beta(self, nbytes: tuple[float, ...], seconds: tuple[float, ...], alpha: float | None) -> float:
        """A step's seconds per byte, or 0 ("faster than measurable") when its transfer time is below resolution.

        The time a step attributes to bandwidth is ``beta_j`` times the size spread it was fitted over. Below
        ``resolution`` that is scheduler and timer noise: on a fast link, or with tiny compressed payloads, a
        noise-made slope would read as a slow link and keep compression on for good. Such a step votes
        "fast" instead; the policy then probes less compression and the larger payloads measure the link.
        On a slow link even compressed payloads take long enough to resolve, so a drop is seen at once.
        """
        beta = self._step_fit(nbytes, seconds, alpha)[1]
        spread = max(nbytes) - (min(nbytes) if max(nbytes) >= self.min_size_ratio * min(nbytes) else 0.0)
        return beta if beta * spread >= self.resolution else 0.0

    def _step_fit(
        self, nbytes: tuple[float, ...], seconds: tuple[float, ...], alpha: float | None
    ) -> tuple[float | None, float]:
        """:func:`step_fit` of one window step, memoised for steps that fit their own latency."""
        if max(nbytes) < self.min_size_ratio * min(nbytes):
            return step_fit(nbytes, seconds, alpha, self.min_size_ratio)  # depends on `alpha`: closed form, cheap
        key = (nbytes, seconds)
        fit = self._fits.get(key)
        if fit is None:
            fit = self._fits[key] = step_fit(nbytes, seconds, None, self.min_size_ratio)
        return fit

    def _alpha(self) -> float | None:
        """Weighted median of the latencies fitted by the window's steps (``None`` if no step could fit one)."""
        alphas: list[float] = []
        weights: list[float] = []
        for age, (b, s) in enumerate(reversed(self._steps)):
            if b:
                a, _ = self._step_fit(b, s, None)
                if a is not None:
                    alphas.append(a)
                    weights.append(self.decay**age)
        return weighted_median(alphas, weights) if alphas else None

    def reset(self) -> None:
        """Forget every sample and the held latency."""
        self._steps.clear()
        self._fits.clear()
        self._held_alpha = None
        self._ref_bytes = 0.0
        self._held_bandwidth = None
        self._provisional = False

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (loads with ``torch.load(weights_only=True)``)."""
        held = self._held_bandwidth
        return {
            "steps": [[list(b), list(s)] for b, s in self._steps],
            "held_alpha": self._held_alpha,
            "ref_bytes": self._ref_bytes,
            # inf is a float; weights_only loading accepts it
            "held_bandwidth": held,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._steps.clear()
        self._fits.clear()
        for b, s in state.get("steps", []):
            self._steps.append((tuple(float(x) for x in b), tuple(float(x) for x in s)))
        held = state.get("held_alpha")
        self._held_alpha = None if held is None else float(held)
        self._ref_bytes = float(state.get("ref_bytes", 0.0))
        held_bw = state.get("held_bandwidth")
        self._held_bandwidth = None if held_bw is None else float(held_bw)

    def __repr__(self) -> str:
        return (
            f"LinkEstimator(window_steps={self.window_steps}, decay={self.decay:g}, "
            f"min_size_ratio={self.min_size_ratio:g}, resolution={self.resolution:g}, "
            f"max_filter_steps={self.max_filter_steps}, vouch_fraction={self.vouch_fraction:g})"
        )
