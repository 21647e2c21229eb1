"""Bandwidth probes at the step boundary: when and how large, from agreed values only.

Compressed payloads are too small to measure a link (their time is latency, scheduler noise, or a shaper's
burst), so while a lossy mode runs the state sends one ``all_reduce`` of a probe buffer at some boundaries. Every
input of a probe's size and schedule is identical on every rank - a size that differed would make the collective
hang.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from lightning_netsense.observation import LinkEstimate, Measurements, Observation, allreduce_wire_bytes

__all__ = [
    "CALM_FACTOR",
    "CALM_SECONDS",
    "ProbeScheduler",
    "probe_answered_fast",
    "probe_answered_slow",
    "probe_cap",
    "probe_size",
    "probe_wait",
]


#: factor between consecutive probes of a chain that keeps answering fast (see :func:`probe_size`)
_PROBE_GROWTH = 4.0


def probe_size(
    bandwidth: float,
    fast: bool,
    previous: float,
    step_seconds: float,
    largest: float,
    fraction: float,
    every: int,
    floor: float = 64 * 1024,
    slow: bool = False,
) -> int:
    """Bytes of the next bandwidth probe (a multiple of 4, in ``[min(floor, largest), largest]``).

    ``fraction`` of the ``every`` steps until the next probe at the estimated ``bandwidth``; four times
    ``previous`` while the last probe answered ``fast`` (:func:`probe_answered_fast`), as TCP's slow start, and
    ``largest`` itself once four times ``previous`` is more than half of it. A
    shaper's burst also answers fast, so the size grows until the probe measures the sustained rate or reaches
    ``largest`` (the hook passes the size that vouches for a recovery, see :class:`LinkEstimator`). Growth by 4,
    not 2, so that a ladder reaches the vouching size within a few steps; never the largest size straight away,
    which on a slow, unmeasured link costs seconds.

    A probe that answered ``slow`` (:func:`probe_answered_slow`) beyond a shaper's burst is followed by one of
    ``largest``: a small probe may lower the estimate but cannot replace the last vouched one, so a drop seen by
    small probes alone would be forgotten as soon as the window's small payloads passed in a burst again.
    """
    if largest <= 0:
        return 0
    floor = min(floor, largest)
    if slow:
        size = largest
    elif fast:
        size = _PROBE_GROWTH * previous
        if 2 * size > largest:
            # within a factor two of the vouching size: that size itself. A rung just below it costs nearly as
            # much and vouches for nothing
            size = largest
    elif math.isfinite(bandwidth):
        size = bandwidth * fraction * step_seconds * every
    else:
        size = 2.0 * previous
    return int(min(max(size, floor), largest)) // 4 * 4


def probe_cap(largest: float, vouch_fraction: float) -> int:
    """Largest probe worth sending: the smallest that vouches for the link (``vouch_fraction`` of the largest
    dense bucket, rounded up to whole float32 elements, never above the bucket). A probe and a dense bucket are
    both allreduced, so the ratio holds on the wire (see :class:`LinkEstimator`)."""
    return int(min(largest, 4 * math.ceil(vouch_fraction * largest / 4) + 4))


def probe_answered_fast(believed: LinkEstimate, wire: float, seconds: float) -> bool:
    """Whether a probe of ``wire`` bytes took under half the time the believed link needs for it."""
    return seconds > 0 and seconds < 0.5 * believed.time(wire)


def probe_answered_slow(believed: LinkEstimate, wire: float, seconds: float) -> bool:
    """Whether a probe of ``wire`` bytes took over twice the time the believed link needs for it."""
    return seconds > 0 and seconds > 2.0 * believed.time(wire)


#: while probes answer as believed, the wait between them doubles per probe (:func:`probe_wait`'s ``calm``), up
#: to this many times ``every`` and this many seconds of steps: a recovery is still seen within that time
CALM_FACTOR = 16
CALM_SECONDS = 4.0


def probe_wait(
    seconds: float, step_seconds: float, fraction: float, every: int, follow_up: bool = False, calm: int = 0
) -> int:
    """Steps until the next probe, after probes that took ``seconds`` in all.

    At least ``every``, and enough steps that the probes took at most ``fraction`` of them (an amortised budget
    from the measured, not the predicted, time). With ``follow_up`` (the last probe answered fast or slow, see
    :func:`probe_answered_fast` and :func:`probe_answered_slow`, and was below the vouching size) the next
    probe runs at the next step instead: the link may have changed, and each step on a wrong belief costs
    progress. Such a chain is paid for after its last probe: the hook passes the chain's total ``seconds``.

    ``calm`` probes in a row answered as believed: the wait is at least ``every * 2**calm``, up to
    :data:`CALM_FACTOR` times ``every`` and :data:`CALM_SECONDS` of steps (never below ``every``): on a steady
    link, probing at the base rate would spend the whole budget confirming what is known.
    """
    if follow_up:
        return 1
    amortised = math.ceil(seconds / (fraction * max(step_seconds, 1e-3)))
    wait = max(every, amortised)
    if calm > 0:
        most = max(every, min(every * CALM_FACTOR, int(CALM_SECONDS / max(step_seconds, 1e-3))))
        wait = max(wait, min(every << min(calm, 16), most))
    return wait



class ProbeScheduler:
    """Sizes, schedules and times the bandwidth probes.

    Args:
        every: while a lossy mode runs, probe at most every this many steps (0: never).
        fraction: share of the training time probes may take, in (0, 1].
    """

    __slots__ = ("_calm", "_chain", "_next", "every", "fraction", "last", "size")

    def __init__(self, every: int = 2, fraction: float = 0.05) -> None:
        self.every = every
        self.fraction = float(fraction)
        #: bytes of the last probe
        self.size = 0
        #: ``(wire bytes, seconds)`` of the probe at the last boundary, ``(0, 0)`` if none ran there
        self.last: tuple[float, float] = (0.0, 0.0)
        self.reset()

    def reset(self) -> None:
        """Forget the schedule (a new DDP wrapper: a resume)."""
        self._chain = 0.0  # agreed seconds of the current chain of fast-answering probes (paid after its last)
        self._calm = 0  # probes in a row that answered as believed (each doubles the wait before the next)
        self._next = 0  # first step whose boundary may probe

    def plan(
        self,
        step: int,
        observation: Observation,
        believed: LinkEstimate,
        agreed: Measurements,
        cap: int,
        changed: bool,
        vouched_by_traffic: bool,
    ) -> tuple[bool, bool]:
        """Update the schedule after a boundary's agreement; returns ``(fast, slow)``: whether the last probe
        answered faster or slower than believed (its follow-up runs at the next boundary, see :func:`probe_wait`).

        Args:
            step: the step just observed.
            observation: the agreed observation of that step.
            believed: the estimate before this step's samples.
            agreed: the agreed measurements (the last probe's size and duration among them).
            cap: the probe size that vouches for the link.
            changed: the next step runs another mode than this one (a new regime: back to the base rate).
            vouched_by_traffic: this step's own payloads measured the link (a probe now would measure it again).
        """
        self.last = (0.0, 0.0)
        below_cap = self.size < cap
        # until anything vouches for the link, a ladder of probes measures it, four times the last each boundary
        ladder = not observation.link.vouched
        wire, seconds = agreed.bw_probe_wire_bytes, agreed.bw_probe_seconds
        fast = below_cap and (ladder or probe_answered_fast(believed, wire, seconds))
        slow = below_cap and probe_answered_slow(believed, wire, seconds)
        if seconds > 0 and self.every:
            # amortise: the chain's agreed durations must fit in `fraction` of the steps until the next probe
            self._chain += seconds
            step_seconds = max(agreed.step_time, agreed.backward_time)
            self._calm = 0 if fast or slow else self._calm + 1
            wait = probe_wait(self._chain, step_seconds, self.fraction, self.every, fast or slow, self._calm)
            if not (fast or slow):
                self._chain = 0.0
            # the probe ran at the last boundary (step - 1): the next may run at the boundary of step - 1 + wait
            self._next = step + wait
        if changed:
            self._calm = 0
        if self.every and vouched_by_traffic:
            self._next = max(self._next, step + 1 + self.every)
        return fast, slow

    def due(self, step: int, earliest: int) -> bool:
        """Whether the boundary closing ``step`` may probe (not before ``earliest``)."""
        return bool(self.every) and step + 1 >= max(earliest, self._next)

    def run(
        self,
        step: int,
        observation: Observation,
        cap: int,
        fast: bool,
        slow: bool,
        group: dist.ProcessGroup | None,
        device: torch.device,
    ) -> None:
        """Time one ``all_reduce`` of a probe buffer (collective), sized from agreed values only."""
        step_seconds = max(observation.step_time, observation.backward_time)
        size = probe_size(observation.link.bandwidth, fast, self.size, step_seconds, cap, self.fraction, self.every,
                          slow=slow)
        self._next = step + 1 + self.every
        if size <= 0:
            return
        self.size = size
        buf = torch.zeros(size // 4, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.last = (allreduce_wire_bytes(size, observation.world_size), time.perf_counter() - t0)
