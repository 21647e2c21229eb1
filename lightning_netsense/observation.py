"""Plain data that flows from the hook to a policy: what one step measured and what the policy decides.

Nothing here touches ``torch.distributed``: a policy is unit-tested by building an :class:`Observation` by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from lightning_netsense._validation import check_mapping, refuse

__all__ = [
    "MODE_CODES",
    "CodecProfile",
    "Decision",
    "LinkEstimate",
    "Measurements",
    "Observation",
    "allgather_wire_bytes",
    "allreduce_wire_bytes",
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

    def __hash__(self) -> int:  # MappingProxyType is not hashable: hash the options' items
        return hash((self.mode, tuple(sorted(self.options.items()))))


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
        update_error: last measured error of the update the optimizer applies (mean over ranks; see
            :mod:`~lightning_netsense.update_error`), ``None`` if never measured. Every candidate is measured every
            step on a window of the real gradients, whether it runs or not
            (:class:`~lightning_netsense.shadow.ShadowMeter`).
    """

    mode: str
    summable: bool
    lossy: bool
    payload_bytes: tuple[int, ...]
    rel_error: float | None = None
    seconds_per_byte: float = 0.0
    update_error: float | None = None

    @property
    def total_payload_bytes(self) -> int:
        return int(sum(self.payload_bytes))


@dataclass(frozen=True)
class Measurements:
    """What one step measured: on one rank, or agreed by every rank (:func:`~lightning_netsense.agreement.agree`).

    Times are seconds, sizes bytes.

    Attributes:
        backward_time: backward pass until the last bucket was ready (compute the collectives can hide under).
        overlap_time: from the first bucket's hook to the last bucket's hook.
        step_time: the step's wall time, from its start (or the last boundary) to its boundary.
        exposed_comm_time: time the backward pass waited for communication after the last bucket was ready.
        comm_time: link-busy time of this step's collectives (sum of queue-corrected durations).
        bytes_sent: wire bytes of this step's collectives.
        bytes_in_flight: largest number of wire bytes outstanding at once.
        rel_error: relative compression error of this step over all buckets, ``||c - sent|| / ||c||`` with ``c`` the
            gradient plus the error-feedback residual (0 for plain DDP).
        residual_norm: norm of the error-feedback memory after this step.
        update_error: error of the step the optimizer takes from what was sent (see
            :mod:`~lightning_netsense.update_error`; 0 for plain DDP).
        sign_flips: fraction of sampled coordinates sent with the opposite sign of the exact gradient.
        probe_wire_bytes: wire bytes of the previous agreement collective (a tiny, latency-only sample).
        probe_seconds: its duration (0 when there was none).
        bw_probe_wire_bytes: wire bytes of the previous bandwidth probe (see ``NetSenseState``), 0 if none.
        bw_probe_seconds: its duration.
        bucket_wire_bytes: per bucket, wire bytes of its collective (at most ``SAMPLE_SLOTS`` once agreed).
        bucket_seconds: per bucket, queue-corrected duration of its collective.
        mode_errors: per mode (in the codec registry's order), last relative error, ``nan`` if never run.
        mode_seconds_per_byte: per mode, codec compute time per dense byte, ``nan`` if unknown.
        mode_update_errors: per mode, last measured update error, ``nan`` if never measured.
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
    bucket_wire_bytes: tuple[float, ...] = ()
    bucket_seconds: tuple[float, ...] = ()
    mode_errors: tuple[float, ...] = ()
    mode_seconds_per_byte: tuple[float, ...] = ()
    mode_update_errors: tuple[float, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Observation(Measurements):
    """One step as every rank agrees on it, with what the policy needs to price the next: identical on every rank,
    so every rank decides the same.

    Attributes:
        step: synchronising steps completed before this one.
        world_size: ranks in the process group.
        decision: the decision the step ran.
        bucket_bytes: dense bytes of each gradient bucket.
        dense_bytes: wire bytes plain DDP would have sent for the same gradients.
        link: the link estimate after this step.
        codecs: per candidate mode, what the policy knows about it.
    """

    step: int
    world_size: int
    decision: Decision
    bucket_bytes: tuple[int, ...]
    dense_bytes: float = 0.0
    link: LinkEstimate = field(default_factory=LinkEstimate)
    codecs: Mapping[str, CodecProfile] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        """Plain-DDP wire bytes over the bytes actually sent this step (1.0 for ``"none"``)."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent > 0 else 1.0
