"""Policies: plain objects that turn an agreed :class:`Observation` into the next step's :class:`Decision`.

A policy never touches ``torch.distributed``: every rank runs it on the same observation and so reaches the
same decision. Write your own by subclassing :class:`Policy` and implementing :meth:`Policy.decide`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from lightning_netsense._validation import check_int
from lightning_netsense.codecs import codec_class
from lightning_netsense.observation import Decision, Observation

__all__ = ["FixedPolicy", "Policy"]


class Policy(ABC):
    """Base class of every policy.

    A subclass implements :meth:`decide`; it may list in :meth:`candidates` the decisions it wants priced
    (the hook then fills :attr:`Observation.codecs` with a profile per candidate mode) and keep state across
    steps, saved by :meth:`state_dict` into checkpoints.
    """

    #: whether decisions depend on the link estimate; when not, the hook spends nothing on bandwidth probes
    uses_link_estimate: bool = True

    def candidates(self) -> Sequence[Decision]:
        """Decisions this policy may take; the observation carries a :class:`CodecProfile` for each."""
        return ()

    @abstractmethod
    def decide(self, observation: Observation) -> Decision:
        """Return the decision for the next step. Must depend on ``observation`` and own state only."""

    def first_decision(self, allowed: Sequence[Decision], world_size: int) -> Decision:
        """Decision for the first step of a DDP wrapper (a new or resumed run), before anything is measured.

        One of ``allowed`` or plain DDP; ``world_size`` is the number of ranks (it decides which collective is
        cheaper). It runs without error feedback (DDP has not rebuilt its buckets yet; a
        codec's per-bucket state is rebuilt with them). Where the state probes the link and the policy uses the
        estimate, ``allowed`` holds every candidate: a step of kilobytes (PowerSGD) is then measured by probes at
        the next boundaries, and :attr:`LinkEstimate.vouched` says when they have. Otherwise it holds plain DDP
        and the codecs without per-bucket state, and this step's own traffic is the first measurement of the
        link: a codec whose payloads are large enough to measure it (fp16, bf16, int8: at least a quarter of a
        dense bucket) is the useful compressed choice. The default is plain DDP.
        """
        return Decision("none")

    def warmup_decision(self, observation: Observation, allowed: Sequence[Decision]) -> Decision:
        """Decision for a warm-up step after the first (DDP may still rebuild its buckets), one of ``allowed``.

        ``allowed`` holds plain DDP and the candidates whose codec keeps no per-bucket state. The default is
        plain DDP; the policy's hysteresis must not change here (its real decisions start after the warm-up).
        """
        return Decision("none")

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state restored on resume (must load with ``torch.load(weights_only=True)``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _make_decision(mode: str, **options: Any) -> Decision:
    """Validate ``mode`` and its options against the codec registry and build a :class:`Decision`."""
    cls = codec_class(mode)
    given = {k: v for k, v in options.items() if v is not None}
    cls.validate_options(given)
    return Decision(mode, given)


class FixedPolicy(Policy):
    """Always choose the same mode: plain DDP (``"none"``) or one forced codec.

    Args:
        mode: ``"none"``, ``"fp16"``, ``"bf16"``, or any registered codec (``"int8"``, ``"topk"``,
            ``"powersgd"``).
        density: top-k kept fraction in (0, 1]; only with ``mode="topk"``.
        rank: PowerSGD rank >= 1; only with ``mode="powersgd"``.
        chunk_size: int8 elements per scale; only with ``mode="int8"``.
        bits: PowerSGD payload precision, 16 (bfloat16) or 32 (float32); only with ``mode="powersgd"``.

    Raises:
        ValueError: for an unknown mode, or an option that is out of range or does not apply to the mode.

    Example::

        Trainer(strategy=NetSenseStrategy(policy=FixedPolicy(mode="topk", density=0.01)))
    """

    uses_link_estimate = False  # always the same mode: probing the link would only cost time

    def __init__(
        self,
        mode: str = "none",
        density: float | None = None,
        rank: int | None = None,
        chunk_size: int | None = None,
        bits: int | None = None,
    ) -> None:
        # the constructor's integers are integers (a codec also takes 8.0, as checkpoints store options)
        check_int("rank", rank, low=1, allow_none=True)
        check_int("chunk_size", chunk_size, low=1, allow_none=True)
        check_int("bits", bits, allow_none=True)
        self.mode = mode
        self.decision = _make_decision(mode, density=density, rank=rank, chunk_size=chunk_size, bits=bits)

    def candidates(self) -> Sequence[Decision]:
        return (self.decision,)

    def decide(self, observation: Observation) -> Decision:
        return self.decision

    def first_decision(self, allowed: Sequence[Decision], world_size: int) -> Decision:
        return self._if_allowed(allowed)

    def warmup_decision(self, observation: Observation, allowed: Sequence[Decision]) -> Decision:
        return self._if_allowed(allowed)

    def _if_allowed(self, allowed: Sequence[Decision]) -> Decision:
        # a stateless codec (fp16, bf16, int8, top-k) runs from the first step, as torch's hooks do
        return self.decision if self.decision in allowed else Decision("none")

    def __repr__(self) -> str:
        return f"FixedPolicy({self.decision.key})"
