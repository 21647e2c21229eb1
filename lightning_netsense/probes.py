"""Bandwidth probes at the step boundary: when and how large, from agreed values only.

Compressed payloads are too small to measure a link (their time is latency, scheduler noise, or a shaper's
burst), so while a lossy mode runs the state sends one ``all_reduce`` of a probe buffer at some boundaries. Every
input of a probe's size and schedule is identical on every rank - a size that differed would make the collective
hang.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from lightning_netsense.observation import LinkEstimate, Measurements, Observation, allreduce_wire_bytes
from lightning_netsense.sensing import probe_answered_fast, probe_answered_slow, probe_size, probe_wait

__all__ = ["ProbeScheduler"]


class ProbeScheduler:
    """Sizes, schedules and times the bandwidth probes.

    Args:
        every: while a lossy mode runs, probe at most every this many steps (0: never).
        fraction: share of the training time probes may take, in (0, 1].
    """

    __slots__ = ("every", "fraction", "size", "last", "_chain", "_calm", "_next")

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
