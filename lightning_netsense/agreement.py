"""The step boundary's agreement: every rank's :class:`Measurements` combined into one, identically on every rank.

The combination is conservative where ranks differ: compute times take the maximum (the slowest rank sets the
pace); a collective's duration takes the *minimum* (a rank that reached it early also timed its wait for the
others, so the last to arrive timed the transfer itself); errors take the mean over the ranks that measured one;
codec costs take the maximum.

Every such combination is a maximum, a minimum or a sum, so the agreement is two ``all_reduce`` calls (``MAX``, with
minima negated, and ``SUM``) of vectors of one fixed length: neither their size nor the work on them grows with
the world size, and ranks whose layouts differ (a misconfigured job) still complete them and then fail alike with
a clear error instead of hanging in collectives of mismatched sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_netsense.observation import Measurements

__all__ = ["AGREED_VALUES", "MODE_SLOTS", "SAMPLE_SLOTS", "agree", "combine", "finish", "pack"]

#: Collective samples shared per step. More buckets than this are merged, a group of adjacent collectives
#: into its mean (``t/n = alpha + (b/n)/B`` holds exactly when ``t`` and ``b`` are the group's sums).
SAMPLE_SLOTS = 64
#: Mode slots (the codec registry is far smaller).
MODE_SLOTS = 16

_MAX = ("backward_time", "step_time", "exposed_comm_time", "bytes_sent", "bytes_in_flight", "probe_wire_bytes",
        "bw_probe_wire_bytes")
_MIN = ("overlap_time", "comm_time", "probe_seconds", "bw_probe_seconds")
_MEAN = ("rel_error", "sign_flips")
_RMS = ("residual_norm", "update_error")  # root mean square over ranks
_HEADER = 3  # buckets, samples, modes
#: values in the two vectors the agreement reduces (for its wire bytes)
AGREED_VALUES = (
    2 * _HEADER + len(_MAX) + len(_MIN) + 2 * SAMPLE_SLOTS + MODE_SLOTS,
    2 * (len(_MEAN) + len(_RMS)) + 4 * MODE_SLOTS,
)


def _merge_samples(nbytes: Sequence[float], seconds: Sequence[float]) -> tuple[list[float], list[float]]:
    n = len(nbytes)
    if n <= SAMPLE_SLOTS:
        return [float(x) for x in nbytes], [float(x) for x in seconds]
    out_b, out_s = [], []
    for k in range(SAMPLE_SLOTS):
        lo, hi = k * n // SAMPLE_SLOTS, (k + 1) * n // SAMPLE_SLOTS
        out_b.append(sum(nbytes[lo:hi]) / (hi - lo))
        out_s.append(sum(seconds[lo:hi]) / (hi - lo))
    return out_b, out_s


def pack(local: Measurements) -> tuple[Tensor, Tensor]:
    """A rank's measurements as the two float64 vectors the agreement reduces: ``(for MAX, for SUM)``.

    MAX: the header, the header negated, the maxima, the minima negated, per sample the bytes and the seconds
    negated, per mode the cost (``-inf`` where unknown). SUM: mean values and their counts, squares for the root
    mean squares, per mode the errors and update errors with their counts (``nan`` counts 0).
    """
    nb, nm = len(local.bucket_wire_bytes), len(local.mode_errors)
    if len(local.bucket_seconds) != nb or len(local.mode_seconds_per_byte) != nm:
        raise ValueError("Expected per-bucket and per-mode sequences of matching lengths")
    if nm > MODE_SLOTS:
        raise ValueError(f"Expected at most {MODE_SLOTS} modes, but got {nm}")
    updates = local.mode_update_errors or (math.nan,) * nm
    if len(updates) != nm:
        raise ValueError("Expected one update error per mode")
    sb, ss = _merge_samples(local.bucket_wire_bytes, local.bucket_seconds)
    pad = SAMPLE_SLOTS - len(sb)
    header = [float(nb), float(len(sb)), float(nm)]
    high = [*header, *(-h for h in header)]
    high += [float(getattr(local, k)) for k in _MAX] + [-float(getattr(local, k)) for k in _MIN]
    high += sb + [-math.inf] * pad + [-x for x in ss] + [-math.inf] * pad
    costs = [x if not math.isnan(x) else -math.inf for x in local.mode_seconds_per_byte]
    high += costs + [-math.inf] * (MODE_SLOTS - nm)
    total: list[float] = []
    for k in _MEAN:
        total += _counted(float(getattr(local, k)))
    for k in _RMS:
        total += _counted(float(getattr(local, k)) ** 2)
    for seq in (local.mode_errors, updates):
        values = [_counted(float(x)) for x in seq] + [[0.0, 0.0]] * (MODE_SLOTS - nm)
        total += [v for v, _ in values] + [c for _, c in values]
    return torch.tensor(high, dtype=torch.float64), torch.tensor(total, dtype=torch.float64)


def _counted(x: float) -> list[float]:
    return [0.0, 0.0] if math.isnan(x) else [x, 1.0]


def finish(high: Tensor, total: Tensor) -> Measurements:
    """The agreed :class:`Measurements` from the reduced vectors of :func:`pack`.

    Raises:
        RuntimeError: on every rank alike, if the ranks disagree on the number of buckets or modes.
    """
    hi, tot = high.tolist(), total.tolist()
    top, bottom = hi[:_HEADER], [-x for x in hi[_HEADER : 2 * _HEADER]]
    if top != bottom:
        raise RuntimeError(
            f"Ranks disagree on the observation layout (buckets, samples, modes: between {bottom} and {top}): every"
            " rank must run the same model, bucket size and lightning_netsense version"
        )
    _, ns, nm = (int(x) for x in top)
    i = 2 * _HEADER
    values: dict = {}
    for k in _MAX:
        values[k], i = hi[i], i + 1
    for k in _MIN:
        values[k], i = -hi[i], i + 1
    values["bucket_wire_bytes"] = tuple(hi[i : i + ns])
    i += SAMPLE_SLOTS
    values["bucket_seconds"] = tuple(-x for x in hi[i : i + ns])
    i += SAMPLE_SLOTS
    values["mode_seconds_per_byte"] = tuple(x if math.isfinite(x) else math.nan for x in hi[i : i + nm])
    j = 0
    for k in _MEAN:
        values[k], j = _mean(tot[j], tot[j + 1]), j + 2
    for k in _RMS:
        values[k], j = math.sqrt(_mean(tot[j], tot[j + 1])), j + 2
    for k in ("mode_errors", "mode_update_errors"):
        sums, counts = tot[j : j + nm], tot[j + MODE_SLOTS : j + MODE_SLOTS + nm]
        values[k] = tuple(_mean(v, c) for v, c in zip(sums, counts))
        j += 2 * MODE_SLOTS
    return Measurements(**values)


def _mean(value: float, count: float) -> float:
    return value / count if count > 0 else math.nan


def combine(locals_: Sequence[Measurements]) -> Measurements:
    """Every rank's measurements combined as :func:`agree` does, in one process (for tests and simulations)."""
    if not locals_:
        raise ValueError("Expected at least one rank's measurements")
    packed = [pack(m) for m in locals_]
    high = torch.stack([h for h, _ in packed]).amax(0)
    total = torch.stack([t for _, t in packed]).sum(0)
    return finish(high, total)


def agree(local: Measurements, group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> Measurements:
    """Combine ``local`` with every rank's (collective: two ``all_reduce`` calls of fixed size)."""
    high, total = pack(local)
    if device is not None and device.type != "cpu":
        high, total = high.to(device), total.to(device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return finish(high.cpu(), total.cpu())
