"""The link traces of the shaped-link benchmark: schedules of rates and competing flows, and their phase changes.

=============  =====================================================================================================
``1g``         a static 1000 Mbit/s (both directions shaped with ``tc tbf``)
``100m``       a static 100 Mbit/s
``20m``        a static 20 Mbit/s
``unshaped``   no shaping at all: the veth pair as it is (about 6 Gbit/s for gloo here)
``dynamic``    a cycle of rates per workload (:data:`DYNAMIC`), with phases shorter than the time to target, so
               that a run crosses several changes before it gets there: 20 -> 1000 -> 100 -> 1000 -> (20 ...)
               Mbit/s. Each cycle has a recovery (20 -> 1000) and a drop (1000 -> 20), the two sensing measures.
``congestion`` 100 Mbit/s; from the 5th second, 2 competing TCP flows in each direction, on for 10 s, off for 5 s
=============  =====================================================================================================

Nothing here touches the link: :func:`trace_events` is the schedule the driver applies on its wall clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["CONGESTION", "DYNAMIC", "STATIC", "TRACES", "phase_changes", "rate_at", "trace_events"]

#: rates of the static traces, Mbit/s (``None``: unshaped)
STATIC: Mapping[str, float | None] = {"1g": 1000.0, "100m": 100.0, "20m": 20.0, "unshaped": None}
TRACES: tuple[str, ...] = ("20m", "100m", "1g", "unshaped", "dynamic", "congestion")
#: the dynamic trace of each workload: a cycle of (Mbit/s, seconds), repeated. Phases are shorter than the time
#: to target of every contender (digits: NetSense reaches 97 % in 4-6 s here; gpt: its target loss in 8-15 s; cnn:
#: its step budget in 6-10 s), so that a run passes at least four changes before the target. The 1 Gbit/s phases
#: last longer than the recovery target (1 s of training clock; evaluations pause the clock, not the link), so
#: that a recovery that did not come within the phase is a miss, not a censored measurement
DYNAMIC: Mapping[str, tuple[tuple[float, float], ...]] = {
    "digits": ((20.0, 1.0), (1000.0, 1.25), (100.0, 1.0), (1000.0, 1.25)),
    # its evaluations take a quarter of the wall time: 2 s at 1 Gbit/s leave 1.5 s of training clock
    "gpt": ((20.0, 1.5), (1000.0, 2.0), (100.0, 1.5), (1000.0, 2.0)),
    "cnn": ((20.0, 1.5), (1000.0, 1.5), (100.0, 1.5), (1000.0, 1.5)),
}
#: the congestion trace: this rate, and ``flows`` competing TCP connections per direction, on for ``on_s``
#: seconds every ``on_s + off_s`` seconds from ``first_s`` on
CONGESTION: Mapping[str, float] = {"rate": 100.0, "flows": 2, "first_s": 5.0, "on_s": 10.0, "off_s": 5.0}


def trace_events(trace: str, horizon_s: float, workload: str = "digits") -> list[tuple[float, str, float | None]]:
    """Schedule of ``trace`` up to ``horizon_s``: ``(seconds after start, "rate" | "flows", value)``, sorted.

    ``("rate", r)`` sets both ends to ``r`` Mbit/s (``None``: unshaped); ``("flows", s)`` starts the competing flows
    for ``s`` seconds. The first event is at 0 and sets the starting rate. ``workload`` picks the dynamic cycle.
    """
    if trace in STATIC:
        return [(0.0, "rate", STATIC[trace])]
    if trace == "dynamic":
        cycle = DYNAMIC[workload]
        out: list[tuple[float, str, float | None]] = []
        t, i = 0.0, 0
        while t < horizon_s:
            rate, seconds = cycle[i % len(cycle)]
            out.append((t, "rate", rate))
            t, i = t + seconds, i + 1
        return out
    if trace == "congestion":
        c = CONGESTION
        out = [(0.0, "rate", c["rate"])]
        t = c["first_s"]
        while t < horizon_s:
            out.append((t, "flows", c["on_s"]))
            t += c["on_s"] + c["off_s"]
        return out
    raise ValueError(f"Expected `trace` to be one of {TRACES}, but got {trace!r}")


def rate_at(events: Sequence[tuple[float, str, float | None]], t: float) -> float | None:
    """Shaped rate at ``t`` seconds after the start of a schedule from :func:`trace_events` (``None``: unshaped)."""
    rate = None
    for when, kind, value in events:
        if when > t:
            break
        if kind == "rate":
            rate = value
    return rate


def phase_changes(trace_log: Sequence[Sequence], t_go: float) -> list[tuple[float, float | None, float | None]]:
    """The rate changes the driver applied after go: ``(seconds since go, old rate, new rate)``.

    ``trace_log`` rows are ``[wall time, kind, value]`` as the driver records them (the starting rate is applied
    just before go and is no change).
    """
    out = []
    rate = None
    started = False
    for wall, kind, value in trace_log:
        if kind != "rate":
            continue
        if started and value != rate:
            out.append((wall - t_go, rate, value))
        rate, started = value, True
    return out
