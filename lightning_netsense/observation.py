"""Plain data that flows from the hook to a policy: what one step measured and what the policy decides.

Nothing here touches ``torch.distributed``: a policy is unit-tested by building an :class:`Observation` by hand.
The only torch-aware pieces are :func:`pack_local` / :func:`unpack_locals`, which turn a rank's measurements into a
fixed-layout float64 vector so that one ``all_gather`` shares them with every rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from lightning_netsense._validation import check_mapping, refuse

__all__ = [
    "MODE_CODES",
    "PACKED_SIZE",
    "CodecProfile",
    "Decision",
    "LinkEstimate",
    "LocalObservation",
    "Observation",
    "allgather_wire_bytes",
    "allreduce_wire_bytes",
    "combine_locals",
    "pack_local",
    "unpack_locals",
    "wire_bytes",
]

#: Numeric code of each built-in mode, ordered by how strongly it compresses (0 = plain DDP). Logged by the monitor.
MODE_CODES: Mapping[str, int] = MappingProxyType(
    {"none": 0, "fp16": 1, "bf16": 2, "int8": 3, "powersgd": 4, "topk": 5}
)


def allreduce_wire_bytes(payload_bytes: float, world_size: int) -> float:
    """Bytes one rank puts on the wire for a ring allreduce of ``payload_bytes``: ``2 (N-1)/N * payload``."""
    if world_size <= 1:
        return 0.0
    return 2.0 * (world_size - 1) / world_size * payload_bytes


def allgather_wire_bytes(payload_bytes: float, world_size: int) -> float:
    """Bytes one rank receives for an allgather of ``payload_bytes`` from each rank: ``(N-1) * payload``."""
    if world_size <= 1:
        return 0.0
    return float(world_size - 1) * payload_bytes


def wire_bytes(payload_bytes: float, world_size: int, summable: bool) -> float:
    """Per-rank wire bytes of one collective: allreduce when the payload is summable, allgather otherwise."""
    if summable:
        return allreduce_wire_bytes(payload_bytes, world_size)
    return allgather_wire_bytes(payload_bytes, world_size)


@dataclass(frozen=True)
class Decision:
    """What a policy decides for the next step: a mode name and that codec's options (e.g. ``{"density": 0.01}``)."""

    mode: str = "none"
    options: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or not self.mode:
            raise refuse("mode", "a non-empty string", self.mode)
        # the values are the codec's to check (Codec.validate_options), when the decision is applied
        options = check_mapping("options", self.options)
        object.__setattr__(self, "options", MappingProxyType(options))

    @property
    def key(self) -> str:
        """Stable text form, e.g. ``"topk(density=0.01)"``."""
        if not self.options:
            return self.mode
        inner = ",".join(f"{k}={self.options[k]:g}" for k in sorted(self.options))
        return f"{self.mode}({inner})"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "options": {k: float(v) for k, v in self.options.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> Decision:
        return cls(mode=str(d["mode"]), options=dict(d.get("options", {})))

    def __reduce__(self):  # MappingProxyType does not pickle; the decision must (spawn start method)
        return (Decision, (self.mode, dict(self.options)))


@dataclass(frozen=True)
class LinkEstimate:
    """The link as the estimator sees it: ``t(bytes) = alpha + bytes / bandwidth`` per collective.

    Attributes:
        alpha: latency per collective, seconds.
        bandwidth: bytes per second (``math.inf`` when nothing has been measured yet).
        max_bandwidth: windowed maximum of per-sample delivery rate, bytes per second (BBR's BtlBw).
        min_rtt: windowed minimum collective duration, seconds (BBR's RTprop).
        samples: number of samples the estimate rests on.
        vouched: whether samples large enough to measure the link (a quarter of the largest dense bucket, see
            :class:`~lightning_netsense.sensing.LinkEstimator`) ever entered the estimate. Small payloads alone
            pass a shaper's burst or a switch buffer at line rate: an estimate that rests on them may read a
            slow link as a fast one.
    """

    alpha: float = 0.0
    bandwidth: float = math.inf
    max_bandwidth: float = math.inf
    min_rtt: float = 0.0
    samples: int = 0
    vouched: bool = True

    def time(self, nbytes: float) -> float:
        """Predicted seconds for one collective moving ``nbytes`` on the wire."""
        if nbytes <= 0:
            return 0.0
        return self.alpha + (nbytes / self.bandwidth if math.isfinite(self.bandwidth) else 0.0)

    @property
    def bdp(self) -> float:
        """Bandwidth-delay product in bytes (``max_bandwidth * min_rtt``)."""
        if not math.isfinite(self.max_bandwidth):
            return math.inf
        return self.max_bandwidth * self.min_rtt


@dataclass(frozen=True)
class CodecProfile:
    """What the policy knows about one candidate mode for the current model.

    Attributes:
        mode: codec name.
        summable: payload is summed by allreduce (else exchanged by allgather).
        lossy: whether the codec loses information (all but ``"none"``).
        payload_bytes: payload bytes per bucket, in bucket order, with the candidate's options.
        rel_error: last measured ``||g - g_hat|| / ||g||`` (mean over ranks), ``None`` if never run.
        seconds_per_byte: measured compress + aggregate + decompress time per dense gradient byte (max over ranks).
        rel_error_age: steps since ``rel_error`` was measured (0: in the step just observed).
        rel_error_cold: ``rel_error`` was measured in a step where error feedback had no residual yet (the
            mode's first step after plain or warm-up steps): the residual that error feedback carries over has
            not built up, so the error is optimistic.
        update_error: last measured error of the update the optimizer applies (mean over ranks; see
            :mod:`~lightning_netsense.update_error`), ``None`` if never measured. Measured while the mode runs, and
            for the other candidates on a window of this step's real gradients without sending them.
    """

    mode: str
    summable: bool
    lossy: bool
    payload_bytes: tuple[int, ...]
    rel_error: float | None = None
    seconds_per_byte: float = 0.0
    rel_error_age: int = 0
    rel_error_cold: bool = False
    update_error: float | None = None

    @property
    def total_payload_bytes(self) -> int:
        return int(sum(self.payload_bytes))


@dataclass(frozen=True)
class Observation:
    """One step as all ranks agree on it. Identical on every rank, so every rank decides the same.

    Times are seconds, sizes bytes. Where ranks differ the combination is conservative (see
    :func:`combine_locals`).
    """

    step: int
    world_size: int
    decision: Decision
    bucket_bytes: tuple[int, ...]
    backward_time: float
    overlap_time: float
    step_time: float
    comm_time: float
    exposed_comm_time: float
    bytes_sent: float
    dense_bytes: float
    bytes_in_flight: float
    rel_error: float
    residual_norm: float
    link: LinkEstimate
    codecs: Mapping[str, CodecProfile] = field(default_factory=dict)
    update_error: float = 0.0
    sign_flips: float = 0.0

    @property
    def compression_ratio(self) -> float:
        """Plain-DDP wire bytes over the bytes actually sent this step (1.0 for ``"none"``)."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent > 0 else 1.0


@dataclass
class LocalObservation:
    """What one rank measured during one step, before the ranks agree.

    Attributes:
        backward_time: backward pass until the last bucket was ready (compute the collectives can hide under).
        overlap_time: from the first bucket's hook to the last bucket's hook.
        step_time: wall time since the previous step boundary.
        exposed_comm_time: time the backward pass waited for communication after the last bucket was ready.
        comm_time: link-busy time of this step's collectives (sum of queue-corrected durations).
        bytes_sent: wire bytes of this step's collectives (this rank).
        bytes_in_flight: largest number of wire bytes outstanding at once.
        rel_error: relative compression error of this step, over all buckets.
        residual_norm: norm of the error-feedback memory after this step.
        update_error: error of the update the optimizer applies, this step (see
            :mod:`~lightning_netsense.update_error`; 0 for plain DDP).
        sign_flips: fraction of sampled coordinates whose sent gradient has the opposite sign of the exact one.
        probe_wire_bytes: wire bytes of the previous agreement collective (a tiny, latency-only sample).
        probe_seconds: its duration (0 when there was none).
        bw_probe_wire_bytes: wire bytes of the previous bandwidth probe (see ``NetSenseState``), 0 if none.
        bw_probe_seconds: its duration.
        bucket_wire_bytes: per bucket, wire bytes of its collective (at most :data:`SAMPLE_SLOTS` once shared).
        bucket_seconds: per bucket, queue-corrected duration of its collective.
        mode_errors: per mode (in the state's mode order), last relative error, ``nan`` if never run.
        mode_seconds_per_byte: per mode, codec compute time per dense byte, ``nan`` if unknown.
    """

    backward_time: float = 0.0
    overlap_time: float = 0.0
    step_time: float = 0.0
    exposed_comm_time: float = 0.0
    comm_time: float = 0.0
    bytes_sent: float = 0.0
    bytes_in_flight: float = 0.0
    rel_error: float = 0.0
    residual_norm: float = 0.0
    update_error: float = 0.0
    sign_flips: float = 0.0
    probe_wire_bytes: float = 0.0
    probe_seconds: float = 0.0
    bw_probe_wire_bytes: float = 0.0
    bw_probe_seconds: float = 0.0
    bucket_wire_bytes: list[float] = field(default_factory=list)
    bucket_seconds: list[float] = field(default_factory=list)
    mode_errors: list[float] = field(default_factory=list)
    mode_seconds_per_byte: list[float] = field(default_factory=list)
    mode_update_errors: list[float] = field(default_factory=list)


_SCALARS = (
    "backward_time",
    "overlap_time",
    "step_time",
    "exposed_comm_time",
    "comm_time",
    "bytes_sent",
    "bytes_in_flight",
    "rel_error",
    "residual_norm",
    "update_error",
    "sign_flips",
    "probe_wire_bytes",
    "probe_seconds",
    "bw_probe_wire_bytes",
    "bw_probe_seconds",
)

#: Collective samples shared per step. More buckets than this are merged, a group of adjacent collectives
#: into its mean (``t/n = alpha + (b/n)/B`` holds exactly when ``t`` and ``b`` are the group's sums).
SAMPLE_SLOTS = 64
#: Mode slots in the shared vector (the codec registry is far smaller).
MODE_SLOTS = 16
_HEADER = 3
PACKED_SIZE = _HEADER + len(_SCALARS) + 2 * SAMPLE_SLOTS + 3 * MODE_SLOTS


def _merge_samples(nbytes: Sequence[float], seconds: Sequence[float], slots: int) -> tuple[list[float], list[float]]:
    n = len(nbytes)
    if n <= slots:
        return [float(x) for x in nbytes], [float(x) for x in seconds]
    out_b, out_s = [], []
    for k in range(slots):
        lo, hi = k * n // slots, (k + 1) * n // slots
        out_b.append(sum(nbytes[lo:hi]) / (hi - lo))
        out_s.append(sum(seconds[lo:hi]) / (hi - lo))
    return out_b, out_s


def pack_local(local: LocalObservation) -> torch.Tensor:
    """Lay a rank's observation out as a float64 vector of the fixed size :data:`PACKED_SIZE`.

    The size never depends on the model, so ranks that disagree (a misconfigured job) still complete the
    ``all_gather`` and then fail with a clear error, instead of hanging in a collective of mismatched sizes.
    """
    nb, nm = len(local.bucket_wire_bytes), len(local.mode_errors)
    updates = local.mode_update_errors or [math.nan] * nm
    if len(local.bucket_seconds) != nb or len(local.mode_seconds_per_byte) != nm or len(updates) != nm:
        raise ValueError("Expected per-bucket and per-mode lists of matching lengths")
    if nm > MODE_SLOTS:
        raise ValueError(f"Expected at most {MODE_SLOTS} modes, but got {nm}")
    sb, ss = _merge_samples(local.bucket_wire_bytes, local.bucket_seconds, SAMPLE_SLOTS)
    pad_s = [0.0] * (SAMPLE_SLOTS - len(sb))
    pad_m = [math.nan] * (MODE_SLOTS - nm)
    values = [float(nb), float(len(sb)), float(nm)]
    values += [float(getattr(local, name)) for name in _SCALARS]
    values += sb + pad_s + ss + pad_s
    values += [float(x) for x in local.mode_errors] + pad_m
    values += [float(x) for x in local.mode_seconds_per_byte] + pad_m
    values += [float(x) for x in updates] + pad_m
    return torch.tensor(values, dtype=torch.float64)


def unpack_locals(gathered: torch.Tensor, world_size: int) -> list[LocalObservation]:
    """Split the ``all_gather`` of :func:`pack_local` vectors back into one observation per rank.

    Raises:
        RuntimeError: on every rank alike, if the ranks disagree on the number of buckets or modes.
    """
    rows = gathered.reshape(world_size, PACKED_SIZE).tolist()
    headers = {tuple(int(v) for v in row[:_HEADER]) for row in rows}
    if len(headers) != 1:
        raise RuntimeError(
            f"Ranks disagree on the observation layout (buckets, samples, modes per rank: {sorted(headers)}):"
            " every rank must run the same model, bucket size and lightning_netsense version"
        )
    _, ns, nm = headers.pop()
    out = []
    for row in rows:
        i = _HEADER
        kwargs = {}
        for name in _SCALARS:
            kwargs[name] = row[i]
            i += 1
        kwargs["bucket_wire_bytes"] = row[i : i + ns]
        i += SAMPLE_SLOTS
        kwargs["bucket_seconds"] = row[i : i + ns]
        i += SAMPLE_SLOTS
        kwargs["mode_errors"] = row[i : i + nm]
        i += MODE_SLOTS
        kwargs["mode_seconds_per_byte"] = row[i : i + nm]
        i += MODE_SLOTS
        kwargs["mode_update_errors"] = row[i : i + nm]
        out.append(LocalObservation(**kwargs))
    return out


def _nanmean(xs: Sequence[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else math.nan


def _nanmax(xs: Sequence[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return max(vals) if vals else math.nan


@dataclass(frozen=True)
class AgreedMeasurements:
    """Cross-rank combination of :class:`LocalObservation`, before the estimator and policy see it."""

    backward_time: float
    overlap_time: float
    step_time: float
    exposed_comm_time: float
    comm_time: float
    bytes_sent: float
    bytes_in_flight: float
    rel_error: float
    residual_norm: float
    update_error: float
    sign_flips: float
    probe_wire_bytes: float
    probe_seconds: float
    bw_probe_wire_bytes: float
    bw_probe_seconds: float
    bucket_wire_bytes: tuple[float, ...]
    bucket_seconds: tuple[float, ...]
    mode_errors: tuple[float, ...]
    mode_seconds_per_byte: tuple[float, ...]
    mode_update_errors: tuple[float, ...] = ()


def combine_locals(locals_: Sequence[LocalObservation]) -> AgreedMeasurements:
    """Combine every rank's measurements into one, identically on every rank.

    Compute times take the maximum (the slowest rank sets the pace). A collective's duration takes the
    *minimum* over ranks: a rank that reached the collective early also measured the time it waited for the
    others, so the last rank to arrive timed the transfer itself. Errors take the mean (the monitor's
    "mean over ranks"), codec costs the maximum.
    """
    if not locals_:
        raise ValueError("Expected at least one local observation")
    nb = len(locals_[0].bucket_seconds)
    nm = len(locals_[0].mode_errors)
    return AgreedMeasurements(
        backward_time=max(o.backward_time for o in locals_),
        overlap_time=min(o.overlap_time for o in locals_),
        step_time=max(o.step_time for o in locals_),
        exposed_comm_time=max(o.exposed_comm_time for o in locals_),
        comm_time=min(o.comm_time for o in locals_),
        bytes_sent=max(o.bytes_sent for o in locals_),
        bytes_in_flight=max(o.bytes_in_flight for o in locals_),
        rel_error=_nanmean([o.rel_error for o in locals_]),
        residual_norm=math.sqrt(_nanmean([o.residual_norm**2 for o in locals_])),
        update_error=math.sqrt(_nanmean([o.update_error**2 for o in locals_])),
        sign_flips=_nanmean([o.sign_flips for o in locals_]),
        probe_wire_bytes=max(o.probe_wire_bytes for o in locals_),
        probe_seconds=min(o.probe_seconds for o in locals_),
        bw_probe_wire_bytes=max(o.bw_probe_wire_bytes for o in locals_),
        bw_probe_seconds=min(o.bw_probe_seconds for o in locals_),
        bucket_wire_bytes=tuple(max(o.bucket_wire_bytes[b] for o in locals_) for b in range(nb)),
        bucket_seconds=tuple(min(o.bucket_seconds[b] for o in locals_) for b in range(nb)),
        mode_errors=tuple(_nanmean([o.mode_errors[m] for o in locals_]) for m in range(nm)),
        mode_seconds_per_byte=tuple(_nanmax([o.mode_seconds_per_byte[m] for o in locals_]) for m in range(nm)),
        mode_update_errors=tuple(
            _nanmean([(o.mode_update_errors or [math.nan] * nm)[m] for o in locals_]) for m in range(nm)
        ),
    )
