"""What one step's hook calls recorded - times, bytes and statistics - read once, at the step boundary.

On CPU the clock is the host's. On CUDA every time the policy reads comes from CUDA events recorded in stream
order (a host clock there would time kernel launches, and a collective's future completes when it is enqueued),
and the statistics (compression errors, update errors, non-finite buckets) stay device tensors, summed as the
buckets go: the hook body and its completion callback never wait for the device. :meth:`StepRecorder.finish`
reads everything at the boundary, in one transfer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["RecordedStep", "StepRecorder"]

# entries of the per-step statistics vector
_ERR2, _REF2, _BAD = 0, 1, 2
_UPDATE = 3  # then the update error's terms (see lightning_netsense.update_error.update_terms)
_STATS = _UPDATE + 4


class _Clock:
    """A point in time: a host timestamp, or a CUDA event recorded on the current stream."""

    __slots__ = ("event", "host")

    def __init__(self, cuda: bool) -> None:
        self.host = time.perf_counter()
        self.event = None
        if cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()

    def seconds_since(self, start: _Clock) -> float:
        if self.event is not None and start.event is not None:
            return start.event.elapsed_time(self.event) / 1e3
        return self.host - start.host


@dataclass
class RecordedStep:
    """One step as this rank recorded it, in host numbers (seconds, bytes).

    Attributes:
        step_time: from the step's start (``begin_step``, else the last boundary) to its boundary.
        backward_time: from the backward's start to the last bucket's hook.
        overlap_time: from the first bucket's hook to the last's.
        exposed_comm_time: from the last bucket's hook to the boundary.
        launch: per collective, its launch time relative to the backward's start.
        end: per collective, its completion time on the same axis.
        wire: per collective, its wire bytes.
        index: per collective, the bucket's index.
        numel: per collective, the bucket's elements.
        itemsize: per collective, the bucket's bytes per element.
        codec_seconds: time spent in the codec (compress, error feedback, aggregate).
        err2: summed squared compression error over the lossy buckets (``nan`` if any was not finite).
        ref2: summed squared norm of what they were asked to send.
        bad_buckets: indices of the buckets whose gradient or residual was not finite.
        update_terms: summed update-error terms of the lossy buckets, or ``None``.
        cold: a lossy bucket found no error-feedback residual (its error is optimistic).
    """

    step_time: float = 0.0
    backward_time: float = 0.0
    overlap_time: float = 0.0
    exposed_comm_time: float = 0.0
    launch: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    wire: list[float] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    numel: list[int] = field(default_factory=list)
    itemsize: list[int] = field(default_factory=list)
    codec_seconds: float = 0.0
    err2: float = 0.0
    ref2: float = 0.0
    bad_buckets: list[int] = field(default_factory=list)
    update_terms: list[float] | None = None
    cold: bool = False

    @property
    def dense_bytes(self) -> float:
        """Bytes of the step's gradients (what plain DDP's buckets hold)."""
        return float(sum(n * s for n, s in zip(self.numel, self.itemsize)))


class StepRecorder:
    """Collects one step's records; :meth:`finish` reads them at the boundary and starts the next step.

    Args:
        cuda: record CUDA events (the buckets live on a CUDA device) rather than host times.
    """

    __slots__ = (
        "_backward",
        "_boundary",
        "_bucket_bad",
        "_codec",
        "_end",
        "_first",
        "_has_update",
        "_index",
        "_itemsize",
        "_last",
        "_launch",
        "_numel",
        "_optimizer_end",
        "_start",
        "_stats",
        "_wire",
        "cold",
        "cuda",
    )

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self._boundary: _Clock | None = None  # the end of the last boundary's work
        self._optimizer_end: _Clock | None = None  # the end of the optimizer step after it
        self._reset()

    def _reset(self) -> None:
        self._start: _Clock | None = None
        self._backward: _Clock | None = None
        self._first: _Clock | None = None
        self._last: _Clock | None = None
        self._launch: list[_Clock] = []
        self._end: list[_Clock | None] = []
        self._wire: list[float] = []
        self._index: list[int] = []
        self._numel: list[int] = []
        self._itemsize: list[int] = []
        # (start, end) pairs around codec work; appended from the hook body and the completion callback (the
        # autograd thread and, on gloo, the backend's: list.append is atomic under the GIL, += is not)
        self._codec: list[tuple[_Clock, _Clock]] = []
        self._stats: Tensor | None = None
        self._bucket_bad: list[tuple[int, Tensor]] = []
        self._has_update = False
        #: a lossy bucket found no error-feedback residual in this step
        self.cold = False

    # ------------------------------------------------------------------ marks
    @property
    def started(self) -> bool:
        """Whether this step's start was marked (:meth:`begin_step`)."""
        return self._start is not None

    @property
    def collectives(self) -> int:
        """Collectives recorded in this step (0 after a backward that did not synchronise)."""
        return len(self._launch)

    def begin_step(self) -> None:
        """Mark the step's start (before its forward); with gradient accumulation the first call counts."""
        if self._start is None:
            self._start = _Clock(self.cuda)

    def begin_backward(self) -> None:
        """Mark the start of a backward pass (else the first bucket's hook stands for it)."""
        self._backward = _Clock(self.cuda)

    def end_optimizer_step(self) -> None:
        """Mark the end of the optimizer step after the last boundary: from that boundary to here counts in the
        next step's time."""
        if self._boundary is not None:
            self._optimizer_end = _Clock(self.cuda)

    def bucket(self) -> None:
        """Mark a bucket's hook call (its gradients are ready)."""
        now = _Clock(self.cuda)
        if self._first is None:
            self._first = now
            if self._backward is None:
                self._backward = now
        self._last = now

    def codec_start(self) -> _Clock:
        return _Clock(self.cuda)

    def codec_end(self, start: _Clock) -> None:
        self._codec.append((start, _Clock(self.cuda)))

    def launch(self, index: int, numel: int, itemsize: int, wire: float) -> int:
        """Record a collective about to be issued; returns its slot for :meth:`completed`."""
        self._launch.append(_Clock(self.cuda))
        self._end.append(None)
        self._wire.append(float(wire))
        self._index.append(index)
        self._numel.append(numel)
        self._itemsize.append(itemsize)
        return len(self._launch) - 1

    def completed(self, slot: int) -> None:
        """Record a collective's completion (from its future's callback, in stream order on CUDA)."""
        self._end[slot] = _Clock(self.cuda)

    # ------------------------------------------------------------------ statistics (device tensors)
    def add_error(self, index: int, err2: Tensor, ref2: Tensor) -> None:
        """Add a lossy bucket's squared error and reference norm; a non-finite one marks the bucket bad."""
        stats = self._statistics(err2.device)
        stats[_ERR2] += err2.float()
        stats[_REF2] += ref2.float()
        self._bucket_bad.append((index, ~torch.isfinite(err2 + ref2)))

    def add_update_terms(self, terms: Tensor) -> None:
        stats = self._statistics(terms.device)
        stats[_UPDATE:] += terms
        self._has_update = True

    def _statistics(self, device: torch.device) -> Tensor:
        if self._stats is None:
            self._stats = torch.zeros(_STATS, dtype=torch.float32, device=device)
        return self._stats

    # ------------------------------------------------------------------ the boundary
    def finish(self, last_boundary: float | None = None) -> RecordedStep:
        """Read this step's records (one transfer from the device) and start recording the next step.

        Args:
            last_boundary: host time of the previous boundary, for a step whose start was not marked.
        """
        boundary = _Clock(self.cuda)
        out = RecordedStep(wire=self._wire, index=self._index, numel=self._numel, itemsize=self._itemsize,
                           cold=self.cold)
        flags = [bad for _, bad in self._bucket_bad]
        if self._stats is not None:
            values = torch.cat([self._stats, torch.stack(flags).float()] if flags else [self._stats]).tolist()
            out.err2, out.ref2 = values[_ERR2], values[_REF2]
            out.update_terms = values[_UPDATE:_STATS] if self._has_update else None
            out.bad_buckets = [i for (i, _), bad in zip(self._bucket_bad, values[_STATS:]) if bad]
        elif self.cuda:
            boundary.event.synchronize()
        origin = self._backward or self._first or boundary
        out.launch = [c.seconds_since(origin) for c in self._launch]
        out.end = [(c or boundary).seconds_since(origin) for c in self._end]
        first, last = self._first or boundary, self._last or boundary
        out.backward_time = max(0.0, last.seconds_since(origin))
        out.overlap_time = max(0.0, last.seconds_since(first))
        out.exposed_comm_time = max(0.0, boundary.seconds_since(last))
        out.codec_seconds = sum(max(0.0, b.seconds_since(a)) for a, b in self._codec)
        if self._start is not None:
            optimizer = 0.0
            if self._optimizer_end is not None and self._boundary is not None:
                optimizer = max(0.0, self._optimizer_end.seconds_since(self._boundary))
            out.step_time = boundary.seconds_since(self._start) + optimizer
        elif last_boundary is not None:
            out.step_time = boundary.host - last_boundary
        else:
            out.step_time = boundary.seconds_since(origin)
        self._boundary, self._optimizer_end = None, None
        self._reset()
        return out

    def boundary_done(self) -> None:
        """Mark the end of the boundary's own work (agreement, calibration, probes): the optimizer step follows."""
        self._boundary = _Clock(self.cuda)

    def discard(self) -> None:
        """Forget this step's records (a backward that did not synchronise)."""
        self._reset()
