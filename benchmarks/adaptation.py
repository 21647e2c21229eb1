"""How fast the link estimate follows the link, and what the probes cost: pure functions over one run's steps.

Inputs are what ``bench_trainer.py`` records per step (``wall``: ``time.time()`` after the step's boundary and
optimizer step, ``bw_mbit``: the estimate after that boundary, ``probe_bytes`` / ``probe_s``: the bandwidth probe
the boundary ran) and the trace as the driver applied it (``[wall time, kind, value]`` rows, see ``traces.py``).

* **recovery** (after a change 20 -> 1000 Mbit/s): training seconds from the change to the first step whose
  estimate is at least ``1 - tolerance`` (75 %) of the new rate - above it counts too, an infinite estimate (the
  fit saw only latency) included: the policy acts on it as on a fast link; censored at the next change when it
  never got there;
* **drop** (after a change 1000 -> 20 Mbit/s): the steps that started after the change up to and including the
  first one whose estimate is at most ``1 + tolerance`` (125 %) of the new rate; censored likewise;
* **probe cost**: the probes' seconds and wire bytes as a share of the run's training time and of the wire bytes
  the run sent (the hook's accounting, both per rank);
* **changes before the target**: rate changes applied before the step at which the run reached its target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from traces import phase_changes

__all__ = ["DROP", "RECOVERY", "TOLERANCE", "changes_before", "drops", "probe_cost", "recoveries", "train_at"]

RECOVERY = (20.0, 1000.0)
DROP = (1000.0, 20.0)
TOLERANCE = 0.25


def _up_to(step: Mapping[str, Any], rate: float, tolerance: float) -> bool:
    """Whether the estimate after ``step`` reached a recovered ``rate``: at least ``1 - tolerance`` of it."""
    bw = step.get("bw_mbit")
    return bool(step.get("bw_inf")) or (bw is not None and bw >= (1.0 - tolerance) * rate)


def _down_to(step: Mapping[str, Any], rate: float, tolerance: float) -> bool:
    """Whether the estimate after ``step`` came down to a dropped ``rate``: at most ``1 + tolerance`` of it."""
    bw = step.get("bw_mbit")
    return bw is not None and bw <= (1.0 + tolerance) * rate


def train_at(steps: Sequence[Mapping[str, Any]], since_go: float) -> float:
    """The training clock at ``since_go`` wall seconds after go (evaluations paused it; see ``excluded_s``).

    ``steps[i]`` ended at ``wall`` with the clock at ``train_s`` and ``excluded_s`` seconds of evaluation so far;
    the evaluation after a step (if any) is the growth of ``excluded_s`` to the next step.
    """
    clock, wall, excluded, end = 0.0, 0.0, 0.0, float("inf")
    for s in steps:
        if s["wall_s"] > since_go:
            end = s["train_s"]
            pause = s.get("excluded_s", 0.0) - excluded
            break
        clock, wall, excluded = s["train_s"], s["wall_s"], s.get("excluded_s", 0.0)
    else:
        pause = 0.0
    return min(end, clock + max(0.0, since_go - wall - max(pause, 0.0)))


def _phases(steps: Sequence[Mapping[str, Any]], trace_log: Sequence[Sequence], t_go: float,
            pair: tuple[float, float]) -> list[tuple[float, float, list[Mapping[str, Any]]]]:
    """Per phase entered through the change ``pair``: ``(training clock at the change, at the next change or
    infinity, the steps that ended within the phase)``."""
    timed = [dict(s, wall_s=s["wall"] - t_go, start_s=steps[i - 1]["train_s"] if i else 0.0)
             for i, s in enumerate(steps)]
    changes = phase_changes(trace_log, t_go)
    out = []
    for i, (t, old, new) in enumerate(changes):
        if (old, new) != pair:
            continue
        end = changes[i + 1][0] if i + 1 < len(changes) else float("inf")
        after = [s for s in timed if t < s["wall_s"] <= end]
        if after:
            out.append((train_at(timed, t), train_at(timed, end) if end != float("inf") else end, after))
    return out


def recoveries(steps: Sequence[Mapping[str, Any]], trace_log: Sequence[Sequence], t_go: float,
               tolerance: float = TOLERANCE) -> list[dict[str, Any]]:
    """Training seconds from each 20 -> 1000 Mbit/s change to an estimate of at least ``1 - tolerance`` of it.

    Returns ``{"at", "seconds", "censored", "mode"}`` per change (``at``: training clock of the change; ``mode``:
    the mode of the first step ending after it); a censored one did not get there before the next change or the end
    of the run, and ``seconds`` is then what was observed.
    """
    out = []
    for start, end, after in _phases(steps, trace_log, t_go, RECOVERY):
        hit = next((s for s in after if _up_to(s, RECOVERY[1], tolerance)), None)
        mode = after[0].get("mode")  # what ran when the link changed: only dense payloads measure it themselves
        if hit is not None:
            out.append({"at": start, "seconds": hit["train_s"] - start, "censored": False, "mode": mode})
        else:
            out.append({"at": start, "seconds": min(end, after[-1]["train_s"]) - start, "censored": True,
                        "mode": mode})
    return out


def drops(steps: Sequence[Mapping[str, Any]], trace_log: Sequence[Sequence], t_go: float,
          tolerance: float = TOLERANCE) -> list[dict[str, Any]]:
    """Steps from each 1000 -> 20 Mbit/s change to an estimate of at most ``1 + tolerance`` of 20 Mbit/s.

    Counts the steps that started after the change, up to and including the first whose estimate came down; 0 when
    the step the change fell into already shows it. ``{"at", "steps", "censored", "mode"}`` per change.
    """
    out = []
    for start, _, after in _phases(steps, trace_log, t_go, DROP):
        straddles = [s for s in after if s["start_s"] < start][:1]
        n = 0 if straddles and _down_to(straddles[0], DROP[1], tolerance) else None
        rest = [s for s in after if s not in straddles]
        if n is None:
            n = next((i + 1 for i, s in enumerate(rest) if _down_to(s, DROP[1], tolerance)), None)
        out.append({"at": start, "steps": n if n is not None else len(rest), "censored": n is None,
                    "mode": after[0].get("mode")})
    return out


def probe_cost(steps: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """The bandwidth probes' seconds and wire bytes, and their shares of the run's training time and wire bytes.

    ``None`` for a run without the hook's accounting. The byte share is of the hook's wire bytes plus the probes'
    (both per rank); ``dense_share`` is of the wire bytes plain DDP would have sent for the same steps; the time
    share is of the training clock, which includes the probes.
    """
    if not steps or "hook_bytes" not in steps[0]:
        return None
    seconds = sum(s.get("probe_s") or 0.0 for s in steps)
    nbytes = sum(s.get("probe_bytes") or 0.0 for s in steps)
    payload = sum(s.get("hook_bytes") or 0.0 for s in steps)
    dense = sum(s.get("dense_bytes") or 0.0 for s in steps)
    train = steps[-1]["train_s"]
    return {
        "seconds": seconds,
        "bytes": nbytes,
        "time_share": seconds / train if train > 0 else 0.0,
        "byte_share": nbytes / (payload + nbytes) if payload + nbytes > 0 else 0.0,
        # against what plain DDP would have sent for the same steps: what the probes cost next to not compressing
        "dense_share": nbytes / dense if dense > 0 else None,
        "probes": sum(1 for s in steps if (s.get("probe_s") or 0.0) > 0),
    }


def changes_before(steps: Sequence[Mapping[str, Any]], trace_log: Sequence[Sequence], t_go: float,
                   step: int | None) -> int | None:
    """Rate changes applied before the end of ``step`` (the step at which the target was reached)."""
    if step is None:
        return None
    at = next((s for s in steps if s["step"] == step), None)
    if at is None:
        return None
    return sum(1 for t, _, _ in phase_changes(trace_log, t_go) if t < at["wall"] - t_go)
