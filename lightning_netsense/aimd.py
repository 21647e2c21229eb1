"""The NetSenseML prototype's rule, kept for comparison: AIMD on the kept fraction of top-k."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_netsense._validation import check_number
from lightning_netsense.observation import Decision, Observation
from lightning_netsense.policy import Policy

__all__ = ["AIMDPolicy"]


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
        self.floor = check_number("floor", floor, low=0, high=1, low_open=True)
        self.initial_density = check_number(
            "initial_density", initial_density, low=self.floor, high=1, why="from `floor`"
        )
        self.decrease = check_number("decrease", decrease, low=0, high=1, low_open=True, high_open=True)
        self.increase = check_number("increase", increase, low=0, high=1)
        self.threshold = check_number("threshold", threshold, low=0, low_open=True)
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
