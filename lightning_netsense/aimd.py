"""The NetSenseML prototype's rule, kept for comparison: AIMD on the kept fraction of top-k."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_netsense.observation import Decision, Observation
from lightning_netsense.policy import Policy

__all__ = ["AIMDPolicy"]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class AIMDPolicy(Policy):
    r"""Top-k with an additive-increase / multiplicative-decrease kept fraction, as the prototype did.

    Each step: if the peak wire bytes in flight exceed ``threshold`` times the bandwidth-delay product
    (:attr:`LinkEstimate.bdp`, windowed max delivery rate times windowed min duration, as in BBR), the link is
    taken as congested and ``density *= decrease`` (not below ``floor``); otherwise ``density += increase``
    (not above 1). Before the link has been measured the density is held. Error feedback is applied by the
    hook, as for every lossy mode; the decision goes through the same agreed-decision mechanism, so every rank
    uses the same density.

    Args:
        initial_density: kept fraction of the first steps, in [``floor``, 1].
        decrease: multiplicative decrease, in (0, 1).
        increase: additive increase per uncongested step, in [0, 1].
        floor: smallest kept fraction, in (0, 1].
        threshold: fraction of the bandwidth-delay product above which the link counts as congested, > 0.

    Raises:
        ValueError: if an argument is out of range, naming it.

    Example::

        Trainer(strategy=NetSenseStrategy(policy=AIMDPolicy(initial_density=0.05)))
    """

    def __init__(
        self,
        initial_density: float = 0.01,
        decrease: float = 0.95,
        increase: float = 0.001,
        floor: float = 0.001,
        threshold: float = 0.9,
    ) -> None:
        if not _is_number(floor) or not 0 < floor <= 1:
            raise ValueError(f"Expected `floor` in (0, 1], but got {floor!r}")
        if not _is_number(initial_density) or not floor <= initial_density <= 1:
            raise ValueError(f"Expected `initial_density` in [floor={floor:g}, 1], but got {initial_density!r}")
        if not _is_number(decrease) or not 0 < decrease < 1:
            raise ValueError(f"Expected `decrease` in (0, 1), but got {decrease!r}")
        if not _is_number(increase) or not 0 <= increase <= 1:
            raise ValueError(f"Expected `increase` in [0, 1], but got {increase!r}")
        if not _is_number(threshold) or threshold <= 0:
            raise ValueError(f"Expected `threshold` to be a number > 0, but got {threshold!r}")
        self.initial_density = float(initial_density)
        self.decrease = float(decrease)
        self.increase = float(increase)
        self.floor = float(floor)
        self.threshold = float(threshold)
        #: kept fraction of the next step
        self.density = self.initial_density

    @property
    def decision(self) -> Decision:
        return Decision("topk", {"density": self.density})

    def candidates(self) -> Sequence[Decision]:
        return (self.decision,)

    def decide(self, observation: Observation) -> Decision:
        link = observation.link
        if link.samples > 0:
            if observation.bytes_in_flight > self.threshold * link.bdp:
                self.density = max(self.floor, self.density * self.decrease)
            else:
                self.density = min(1.0, self.density + self.increase)
        return self.decision

    def state_dict(self) -> dict[str, Any]:
        return {"density": self.density}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.density = min(1.0, max(self.floor, float(state.get("density", self.initial_density))))

    def __repr__(self) -> str:
        return (
            f"AIMDPolicy(density={self.density:g}, decrease={self.decrease:g}, increase={self.increase:g}, "
            f"floor={self.floor:g}, threshold={self.threshold:g})"
        )
