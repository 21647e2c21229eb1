"""The adaptive policy: the least lossy mode whose communication still hides under the backward pass."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any

from lightning_netsense._validation import check_choice, check_instance, check_int, check_mapping, check_number
from lightning_netsense.codecs import CODECS
from lightning_netsense.observation import MODE_CODES, CodecProfile, Decision, LinkEstimate, Observation, wire_bytes
from lightning_netsense.policy import Policy

__all__ = [
    "PRIOR_REL_ERROR",
    "NetSensePolicy",
    "PolicyTuning",
    "first_step_mode",
    "predicted_comm_time",
    "predicted_wire_time",
]

#: Update error assumed for a mode before it has been measured (the hook measures every candidate from the first
#: step on, see :class:`~lightning_netsense.shadow.ShadowMeter`; these order modes a policy prices without a
#: measurement). fp16 and bf16: RMS rounding of an 11- and 8-bit mantissa; int8, PowerSGD and top-k: typical
#: measured values.
PRIOR_REL_ERROR: Mapping[str, float] = MappingProxyType(
    {"none": 0.0, "fp16": 3e-4, "bf16": 2.5e-3, "int8": 0.05, "powersgd": 0.8, "topk": 0.95}
)
#: Modes ``first_mode="auto"`` chooses from for a run's first step: they send every coordinate with its sign
#: (rounding, never a projection or a selection), so the optimizer's first statistics are set from gradients it
#: can absorb, and their payloads are large enough to measure the link
_FIRST_MODES = ("int8", "bf16", "fp16")


def predicted_comm_time(profile: CodecProfile, link: LinkEstimate, world_size: int, dense_bytes: float) -> float:
    """Seconds one step's communication takes in ``profile``'s mode.

    ``sum over buckets of (alpha + wire_bytes / B) + seconds_per_byte * dense_bytes``, where ``wire_bytes`` is
    ``2 (N-1)/N * payload`` for a summable payload (allreduce) and ``(N-1) * payload`` otherwise (allgather):
    at large ``N`` an allgathered payload costs ``N/2`` times more than the same payload allreduced.
    """
    return predicted_wire_time(profile, link, world_size) + profile.seconds_per_byte * dense_bytes


def predicted_wire_time(profile: CodecProfile, link: LinkEstimate, world_size: int) -> float:
    """Seconds one step's collectives take on the link in ``profile``'s mode: ``sum over buckets of (alpha +
    wire_bytes / B)`` (the part of :func:`predicted_comm_time` that can run under the backward pass)."""
    return sum(link.time(wire_bytes(p, world_size, profile.summable)) for p in profile.payload_bytes)


def first_step_mode(modes: Sequence[str], world_size: int, chunk_size: int = 1024) -> str:
    """The mode of a run's first step for ``first_mode="auto"``: of the modes that send every coordinate with its
    sign (int8, bf16, fp16), the one with the fewest wire bytes at ``world_size``; ``"none"`` if there is none.

    int8 is exchanged by allgather (``(N - 1)`` payloads of a quarter of the dense bytes), bf16 and fp16 by allreduce
    (``2 (N - 1) / N`` payloads of half of them): int8 up to three ranks, bf16 from four.
    """
    per_element = {"int8": 1.0 + 4.0 / chunk_size, "bf16": 2.0, "fp16": 2.0}
    summable = {"int8": False, "bf16": True, "fp16": True}
    found = [m for m in _FIRST_MODES if m in modes]
    if not found:
        return "none"
    return min(found, key=lambda m: (wire_bytes(per_element[m], world_size, summable[m]), _FIRST_MODES.index(m)))


@dataclass(frozen=True)
class PolicyTuning:
    """How :class:`NetSensePolicy` weighs and holds its choices. The defaults suit most runs; change one at a time.

    LightningCLI fills it from YAML (``init_args: {tuning: {patience: 10}}``).

    Args:
        powersgd_bits: payload precision of ``"powersgd"``: 16 (bfloat16) or 32 (float32). See
            :class:`~lightning_netsense.codecs.powersgd.PowerSGDCodec`.
        slack: factor on the overlap budget, > 0 (above 1 tolerates some exposed communication).
        margin: relative margin a less compressing mode must fit with, in [0, 1).
        patience: consecutive steps a less compressing mode must fit before it is adopted, >= 1.
        max_patience: cap of the doubled patience, >= ``patience``.
        tolerance: relative step-time slack within which a less lossy mode is preferred when none fits, >= 0.
        confirm: consecutive observations (>= 1) that must ask for more compression before it is adopted...
        urgent: ... unless the current mode's predicted communication exceeds the budget (or the backward
            time) ``urgent`` times over (> 1): then at once.
        efficiency_floor: smallest share of a plain step's progress credited to a lossy step, in (0, 1].
        max_slowdown: a mode whose predicted step is more than this many times the fastest candidate's is not
            chosen for its lower error (>= 1). The default, ``math.inf``, trusts the progress model without bound:
            a bound lets a cheap mode that makes no progress (top-k on a transformer with AdamW) win over one that
            does.
        prior_errors: update errors (>= 0) assumed for modes not measured yet, over :data:`PRIOR_REL_ERROR`.
        first_mode: mode of a run's first step: ``"auto"`` (a mode that sends every coordinate with its sign, see
            :func:`first_step_mode`), ``"none"`` or one of the policy's ``modes``.

    Raises:
        ValueError: if an argument is out of range, naming it.
    """

    powersgd_bits: int = 16
    slack: float = 1.0
    margin: float = 0.2
    patience: int = 5
    max_patience: int = 64
    tolerance: float = 0.05
    confirm: int = 2
    urgent: float = 4.0
    efficiency_floor: float = 0.05
    max_slowdown: float = math.inf
    prior_errors: dict[str, float] | None = None
    first_mode: str = "auto"

    def __post_init__(self) -> None:
        check_choice("powersgd_bits", self.powersgd_bits, (16, 32))
        check_number("slack", self.slack, low=0, low_open=True)
        check_number("margin", self.margin, low=0, high=1, high_open=True)
        check_int("patience", self.patience, low=1)
        check_int("max_patience", self.max_patience, low=self.patience, why="`patience`")
        check_number("efficiency_floor", self.efficiency_floor, low=0, high=1, low_open=True)
        check_number("max_slowdown", self.max_slowdown, low=1, allow_inf=True, why="math.inf: no bound")
        check_number("urgent", self.urgent, low=1, low_open=True)
        check_int("confirm", self.confirm, low=1)
        check_number("tolerance", self.tolerance, low=0)
        known_modes = (*MODE_CODES, *(m for m in CODECS if m not in MODE_CODES))
        check_choice("first_mode", self.first_mode, ("auto", *known_modes))
        given = check_mapping("prior_errors", self.prior_errors, known_modes, partial(check_number, low=0),
                              allow_none=True)
        object.__setattr__(self, "prior_errors", None if given is None else dict(given))


class NetSensePolicy(Policy):
    r"""Compress only as much as the link forces: the least lossy mode whose communication hides under compute.

    Each step, with the agreed link estimate ``t(bytes) = alpha + bytes / B``:

    1. price every candidate mode: ``comm(m) = wire(m) + c(m) * dense`` with ``wire(m) = sum_b (alpha +
       wire_b(m) / B)`` (see :func:`predicted_comm_time`; ``c(m)`` is the codec's measured compute seconds per
       dense byte);
    2. ``budget = slack * overlap_time``: the backward compute left after the first bucket is ready, which is
       what the collectives can run under;
    3. among modes within the error budget (``error(m) < max_rel_error``), ordered from least to most lossy by that
       error, take the first with ``comm(m) <= budget``;
    4. if none fits, predict each mode's time per unit of training progress,
       ``(base + c(m) * dense + max(0, wire(m) - budget)) / max(1 - error(m)^2, efficiency_floor)``
       (``base`` = the step without its exposed communication; only the transfer hides under the backward pass,
       the codec's compute runs on the same core or stream as it), and take the least lossy mode within
       ``tolerance`` of the best, among the modes whose predicted step is at most ``max_slowdown`` times the
       fastest one's.

    ``error(m)`` is the measured *update error* of the mode (:attr:`CodecProfile.update_error`): how far the update
    the optimizer would take from what the mode sends is from the one it would take from the exact gradient, with
    the optimizer's own momentum and second moments (see :mod:`~lightning_netsense.update_error`). The hook measures
    it for every candidate, every step, by running each codec on a window of the real gradients without sending
    anything; a step in a mode with update error ``e`` is credited with ``1 - e^2`` of a plain step's progress. A
    mode that was never measured counts with :data:`PRIOR_REL_ERROR`.

    Hysteresis: a *more* compressing mode is adopted once ``confirm`` observations in a row ask for it; a *less*
    compressing one only after it has fitted with ``margin`` (budget and tolerance scaled by ``1 - margin``)
    for ``patience`` consecutive steps. A relaxation undone within ``patience + 2`` steps, or undone later without
    its mode ever having fitted with margin, doubles the patience of the next one, up to ``max_patience`` (back to
    ``patience`` once the relaxed mode fits with margin on its own measurements): a link that only looks fast for
    small payloads (a token bucket's burst) is probed ever more rarely. One slow step alone never reverts
    a relaxation: on a loaded machine a scheduler stall looks the same as a slow link.

    A run's first step (and a resumed run's) is decided before anything is measured: ``first_mode``, by default a
    mode that sends every coordinate with its sign (int8 or bf16, see :func:`first_step_mode`), so that the
    optimizer's first statistics are never set from a projection or a selection of the gradient, and whose
    payloads measure the link. The decisions after it start from plain DDP with the hysteresis above. Until the
    link is vouched for (:attr:`LinkEstimate.vouched`), a compressed mode that ran is held; the first estimate
    that vouches is decided on at once. Without a measurement (``link.samples == 0``) :meth:`decide` chooses
    ``"none"``.

    Args:
        modes: candidate modes; must contain ``"none"``.
        max_rel_error: error budget, > 0: a mode whose update error reaches it is not chosen. The default 1.0
            rules out modes whose updates are no closer to the exact update than no update at all.
        powersgd_rank: rank of ``"powersgd"``, >= 1. Higher ranks send more and err less.
        topk_density: kept fraction of ``"topk"``, in (0, 1].
        tuning: how choices are weighed and held (:class:`PolicyTuning`; its defaults when ``None``).

    Raises:
        ValueError: if an argument is out of range, naming it.

    Example::

        Trainer(strategy=NetSenseStrategy(policy=NetSensePolicy(modes=("none", "fp16", "powersgd"))))
    """

    def __init__(
        self,
        modes: Sequence[str] = ("none", "fp16", "bf16", "int8", "powersgd", "topk"),
        max_rel_error: float = 1.0,
        powersgd_rank: int = 8,
        topk_density: float = 0.01,
        tuning: PolicyTuning | None = None,
    ) -> None:
        if isinstance(modes, str) or not isinstance(modes, Sequence) or not modes:
            raise ValueError(f"Expected `modes` to be a non-empty sequence of mode names, but got {modes!r}")
        known = set(MODE_CODES) | set(CODECS)
        bad = [m for m in modes if not isinstance(m, str) or m not in known]
        if bad or len(set(modes)) != len(modes) or "none" not in modes:
            raise ValueError(
                f"Expected `modes` to be distinct names from {sorted(known)} including 'none', but got {list(modes)!r}"
            )
        check_number("max_rel_error", max_rel_error, low=0, low_open=True)
        check_int("powersgd_rank", powersgd_rank, low=1)
        check_number("topk_density", topk_density, low=0, high=1, low_open=True)
        tuning = PolicyTuning() if tuning is None else check_instance("tuning", tuning, PolicyTuning)
        check_choice("first_mode", tuning.first_mode, ("auto", "none", *(m for m in modes if m != "none")))
        self.modes = tuple(modes)
        self.max_rel_error = float(max_rel_error)
        self.powersgd_rank = powersgd_rank
        self.topk_density = float(topk_density)
        self.tuning = tuning
        # the tuning's values, read on every decision
        self.powersgd_bits = tuning.powersgd_bits
        self.slack = float(tuning.slack)
        self.margin = float(tuning.margin)
        self.patience = tuning.patience
        self.max_patience = tuning.max_patience
        self.tolerance = float(tuning.tolerance)
        self.confirm = tuning.confirm
        self.urgent = float(tuning.urgent)
        self.efficiency_floor = float(tuning.efficiency_floor)
        self.max_slowdown = float(tuning.max_slowdown)
        self.priors = {**PRIOR_REL_ERROR, **(tuning.prior_errors or {})}
        self.first_mode = tuning.first_mode
        self._decisions = {m: Decision(m, self._options(m)) for m in self.modes}
        self.reset()

    def reset(self) -> None:
        """Forget the hysteresis state: back to ``"none"``."""
        self._mode = "none"
        # consecutive steps a less compressing mode has fitted with margin, and the most lossy of those modes
        self._streak = 0
        self._streak_target: str | None = None
        self._patience_now = self.patience
        # steps left in which undoing the last relaxation counts as a failed relaxation
        self._probation = 0
        # consecutive observations asking for more compression than the current mode
        self._escalate = 0
        # the last decision held a compressed mode because nothing had vouched for the link yet
        self._held = False
        # the last relaxation has not yet fitted with margin on its own mode's measurements (see `decide`)
        self._unconfirmed = False

    def _options(self, mode: str) -> dict[str, float]:
        if mode == "topk":
            return {"density": self.topk_density}
        if mode == "powersgd":
            return {"rank": self.powersgd_rank, "bits": self.powersgd_bits}
        return {}

    def candidates(self) -> Sequence[Decision]:
        return tuple(self._decisions.values())

    # ------------------------------------------------------------------ the decision
    def error(self, profile: CodecProfile) -> float:
        """The error ``profile``'s mode is priced with: its measured update error where known, else its prior."""
        if not profile.lossy:
            return 0.0
        if profile.update_error is not None and math.isfinite(profile.update_error):
            return profile.update_error
        return self.priors.get(profile.mode, 1.0)

    def _profiles(self, obs: Observation) -> dict[str, CodecProfile]:
        """Candidate profiles present in the observation, ``"none"`` always (built from the buckets if absent)."""
        out = {m: obs.codecs[m] for m in self.modes if m in obs.codecs}
        if "none" not in out:
            out["none"] = CodecProfile("none", summable=True, lossy=False, payload_bytes=tuple(obs.bucket_bytes))
        return out

    def _ordered(self, profiles: Mapping[str, CodecProfile]) -> list[str]:
        """Modes from least to most lossy (ties broken by the order of ``modes``)."""
        return sorted(profiles, key=lambda m: (self.error(profiles[m]), self.modes.index(m)))

    def choose(
        self,
        obs: Observation,
        strict: bool = False,
        allowed: Collection[str] | None = None,
        max_slowdown: float | None = None,
    ) -> str:
        """Mode the rules pick for ``obs``, without hysteresis.

        Args:
            obs: the agreed observation.
            strict: scale the budget and the tolerance by ``1 - margin`` (the test a less lossy mode must pass).
            allowed: modes to choose from (default: every candidate); ``"none"`` is always allowed.
            max_slowdown: overrides the policy's ``max_slowdown``.
        """
        profiles = self._profiles(obs)
        eligible = [
            m
            for m in self._ordered(profiles)
            if self.error(profiles[m]) < self.max_rel_error and (allowed is None or m in allowed or m == "none")
        ]
        dense = float(sum(obs.bucket_bytes))
        wire = {m: predicted_wire_time(profiles[m], obs.link, obs.world_size) for m in eligible}
        shrink = 1.0 - self.margin if strict else 1.0
        budget = self.slack * max(obs.overlap_time, 0.0) * shrink
        base = max(obs.step_time - obs.exposed_comm_time, obs.backward_time, 0.0)
        # Time per unit of training progress, not per step: a step of update error e makes about 1 - e^2 of an
        # exact step's progress, so a mode whose communication hides under the budget costs `base / efficiency`,
        # and the least lossy mode that fits is still the choice when one does. Only the transfer hides under the
        # backward pass: the codec's compute shares the core (CPU) or the stream (CUDA) with it.
        step = {m: base + profiles[m].seconds_per_byte * dense + max(0.0, wire[m] - budget) for m in eligible}
        # Optionally trust the progress model only so far: never pay more than `max_slowdown` times the fastest
        # candidate's step for a lower per-step error (unbounded by default).
        fastest = min(step.values())
        bound = self.max_slowdown if max_slowdown is None else max_slowdown
        if math.isfinite(bound):  # (inf * a free step would be nan, and rule every mode out)
            eligible = [m for m in eligible if step[m] <= bound * fastest]
        cost = {m: step[m] / self.efficiency(profiles[m]) for m in eligible}
        limit = min(cost.values()) * (1.0 + self.tolerance * shrink)
        return next(m for m in eligible if cost[m] <= limit)

    def efficiency(self, profile: CodecProfile) -> float:
        """Share of a plain step's progress a step in ``profile``'s mode makes: ``max(1 - e^2, efficiency_floor)``."""
        err = self.error(profile)
        return max(1.0 - err * err, self.efficiency_floor)

    def decide(self, observation: Observation) -> Decision:
        if observation.link.samples == 0:
            # nothing measured yet: plain DDP. (An infinite bandwidth with samples prices every mode at its
            # latency alone, so the cost model itself then picks "none".)
            self.reset()
            return self._decisions["none"]
        profiles = self._profiles(observation)
        order = self._ordered(profiles)
        target = self.choose(observation)
        ran = observation.decision.mode
        if not observation.link.vouched and ran != "none" and ran in profiles:
            # The estimate rests on payloads too small to measure the link (or on a first step's, which also paid
            # the process group's set-up): hold the compressed mode that ran. Small payloads pass a shaper's burst
            # at line rate, and a stall of a few milliseconds on them reads as a slow link.
            if self._mode != ran:
                self._switch(ran)
            self._held = True
            return self._decisions[ran]
        if self._held:
            # the first estimate that could vouch for the link: decide on it as if nothing had run before (the
            # held mode was no choice of the rules), without waiting `patience` steps to relax
            self._held = False
            self._switch(target)
            return self._decisions[target]
        current = self._mode
        in_probation = self._probation > 0
        self._probation = max(0, self._probation - 1)
        current_ok = current in profiles and self.error(profiles[current]) < self.max_rel_error
        if not current_ok or order.index(target) > order.index(current):
            # the current mode no longer fits: compress more once `confirm` observations in a row say so (one
            # step's stall on a loaded machine moves the estimate for a step; a slow link persists)
            self._escalate += 1
            if current_ok and self._escalate < self.confirm and not self._urgent(observation, profiles[current]):
                return self._decisions[self._mode]
            if current_ok and (in_probation or self._unconfirmed):  # the last relaxation was a mistake
                self._patience_now = min(2 * self._patience_now, self.max_patience)
            self._switch(target)
            return self._decisions[self._mode]
        self._escalate = 0
        # No revert on one measured step alone: a single slow collective is as often a scheduler stall as a slow
        # link. The step's samples go through the estimator's weighted median like any other; a really slow link
        # turns the rule above within two steps.
        if self._unconfirmed and self._probation <= self.patience + 1:
            # The last relaxation holds only once its mode fits with margin on its own measurements (two steps
            # after it, the estimator's window holds its payloads): then back to the base patience. A compressed
            # mode's payloads inside a shaper's burst read as a fast link, the relaxed mode's larger ones do not;
            # a relaxation that only lasted, without fitting with margin, and is undone later still doubles the
            # patience.
            if order.index(self.choose(observation, strict=True)) <= order.index(current):
                self._unconfirmed = False
                self._patience_now = self.patience
        if order.index(target) < order.index(current):
            strict = self.choose(observation, strict=True)
            if order.index(strict) < order.index(current):
                self._streak += 1
                if self._streak_target not in order:
                    self._streak_target = strict
                else:  # keep the most lossy mode the streak has seen: it fitted on every step of the streak
                    self._streak_target = max(strict, self._streak_target, key=order.index)
                if self._streak >= self._patience_now:
                    self._switch(self._streak_target)
                    # the estimator needs two steps to confirm a drop: count a revert within patience + 2 steps
                    self._probation = self.patience + 3
                    self._unconfirmed = True
                return self._decisions[self._mode]
        self._streak, self._streak_target = 0, None
        return self._decisions[self._mode]

    def first_decision(self, allowed: Sequence[Decision], world_size: int) -> Decision:
        """``first_mode`` (``"auto"``: :func:`first_step_mode` of the modes in ``allowed``): nothing is measured
        yet; this step's payloads are the first measurement of the link."""
        if self.first_mode == "auto":
            usable = [d.mode for d in allowed if d.mode in self._decisions]
            chunk = int(self._decisions["int8"].options.get("chunk_size", 1024)) if "int8" in self._decisions else 1024
            return self._decisions[first_step_mode(usable, world_size, chunk)]
        decision = self._decisions[self.first_mode]
        return decision if decision in allowed else self._decisions["none"]

    def warmup_decision(self, observation: Observation, allowed: Sequence[Decision]) -> Decision:
        """The rules' choice among ``allowed`` (codecs without per-bucket state), without hysteresis: after the
        first step the link is measured, so a further warm-up step can already compress."""
        if observation.link.samples == 0:
            return self._decisions["none"]
        # A first step's time may miss its forward (no boundary before it), which inflates a step-time ratio
        # against the fastest mode: the progress model alone decides this one step.
        mode = self.choose(observation, allowed={d.mode for d in allowed}, max_slowdown=math.inf)
        return self._decisions[mode]

    def _urgent(self, obs: Observation, profile: CodecProfile) -> bool:
        """Whether the current mode's predicted communication exceeds the budget ``urgent`` times over.

        A link that dropped makes every step cost seconds more (no stall looks like that): no confirmation.
        """
        dense = float(sum(obs.bucket_bytes))
        budget = self.slack * max(obs.overlap_time, 0.0)
        excess = predicted_comm_time(profile, obs.link, obs.world_size, dense) - budget
        return excess > (self.urgent - 1.0) * max(budget, obs.backward_time, 1e-3)

    def _switch(self, mode: str) -> None:
        self._mode = mode
        self._escalate = 0
        self._streak, self._streak_target = 0, None
        self._probation = 0
        self._unconfirmed = False

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self._mode,
            "streak": self._streak,
            "streak_target": self._streak_target,
            "patience_now": self._patience_now,
            "probation": self._probation,
            "escalate": self._escalate,
            "held": self._held,
            "unconfirmed": self._unconfirmed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mode = str(state.get("mode", "none"))
        self._mode = mode if mode in self.modes else "none"
        self._streak = int(state.get("streak", 0))
        target = state.get("streak_target")
        self._streak_target = str(target) if target in self.modes else None
        self._patience_now = min(max(int(state.get("patience_now", self.patience)), self.patience), self.max_patience)
        self._probation = int(state.get("probation", 0))
        self._escalate = int(state.get("escalate", 0))
        self._held = bool(state.get("held", False))
        self._unconfirmed = bool(state.get("unconfirmed", False))

    def __repr__(self) -> str:
        return (
            f"NetSensePolicy(modes={self.modes}, max_rel_error={self.max_rel_error:g}, powersgd_rank="
            f"{self.powersgd_rank}, topk_density={self.topk_density:g}, tuning={self.tuning})"
        )
