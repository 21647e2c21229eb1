"""The communication hook and its state.

``netsense_hook(state, bucket)`` is registered on the DDP model once (DDP allows one hook per model). Per bucket
it applies the mode that every rank agreed on at the last step boundary; at the boundary
(:meth:`NetSenseState.end_step`, called by the strategy after each synchronising backward) the ranks agree on what
they measured and every rank runs the policy on the same observation.

The state is split the way torch splits ``PowerSGDState`` from ``powerSGD_hook``: :class:`NetSenseState` holds the
configuration, the decision and its parts - the step recorder (times and statistics,
:class:`~lightning_netsense.recorder.StepRecorder`), the codec ledger (codecs, layouts, costs, errors,
:class:`~lightning_netsense.ledger.CodecLedger`), the error feedback, the link estimator, the probe scheduler
(:class:`~lightning_netsense.probes.ProbeScheduler`) and the agreement (:func:`~lightning_netsense.agreement.agree`).
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations at runtime
# (`bucket: dist.GradBucket`, `-> torch.futures.Future[torch.Tensor]`) and rejects strings.

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_netsense._validation import check_bool, check_instance, check_int, check_number
from lightning_netsense.agreement import AGREED_VALUES, agree
from lightning_netsense.codecs import BucketLayout, Codec
from lightning_netsense.feedback import ErrorFeedback
from lightning_netsense.ledger import CodecLedger
from lightning_netsense.observation import (
    Decision,
    LinkEstimate,
    Measurements,
    Observation,
    allreduce_wire_bytes,
    wire_bytes,
)
from lightning_netsense.policy import FixedPolicy, Policy
from lightning_netsense.probes import ProbeScheduler, probe_cap
from lightning_netsense.recorder import RecordedStep, StepRecorder
from lightning_netsense.sensing import LinkEstimator, peak_in_flight, queue_corrected_durations
from lightning_netsense.update_error import SecondMoments, relative

__all__ = ["NetSenseState", "netsense_hook"]

log = logging.getLogger(__name__)

_PLAIN = Decision("none")
# torch 2.13 renamed all_gather_into_tensor (which now warns on every call); same semantics and gloo future
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class NetSenseState:
    r"""State of :func:`netsense_hook`: configuration, the agreed decision, and the parts that measure and decide.

    Build it with plain values; it binds to the process group lazily, in the worker, so that it pickles for the
    ``spawn`` start method (the process group is dropped from the pickle and the default group is used after
    unpickling).

    Args:
        policy: decides the mode of each step from the agreed observation (default: plain DDP).
        process_group: group the gradients are averaged over (default: the world).
        error_feedback: keep what lossy codecs did not send and add it to the next step.
        warmup_steps: steps before the policy's own decisions take effect; must be >= 1. DDP rebuilds its buckets
            after the first step, so per-bucket state (PowerSGD's factors, error feedback) is only meaningful from
            then on. The first step runs what :meth:`Policy.first_decision <lightning_netsense.Policy.first_decision>`
            picks before anything is measured, without error feedback; any further warm-up steps run what
            :meth:`Policy.warmup_decision <lightning_netsense.Policy.warmup_decision>` picks among plain DDP and the
            codecs without per-bucket state.
        estimator: the link estimator (default: :class:`LinkEstimator` with its defaults).
        probe_every: while a lossy mode runs, probe the bandwidth at most every this many steps (0: never).
            Compressed payloads are too small to measure a link that has recovered, so the state sends one
            ``all_reduce`` of a probe buffer at the step boundary, sized to take ``probe_fraction`` of the steps
            until the next probe at the believed bandwidth and quadrupled while the link answers faster than
            believed, up to the size that vouches for the link (see :class:`~lightning_netsense.probes.ProbeScheduler`).
        probe_fraction: share of the training time probes may take, in (0, 1].

    Raises:
        ValueError: if an argument is of the wrong type or out of range.
    """

    __slots__ = (
        # configuration
        "policy",
        "error_feedback",
        "warmup_steps",
        # parts
        "process_group",
        "feedback",
        "estimator",
        "ledger",
        "recorder",
        "probes",
        "second_moments",
        # the decision
        "decision",
        "step",
        "_plain_until",
        "_warmup_decision",
        "_last_boundary",
        "_agreement",
        # statistics
        "last_observation",
        "last_local",
        "mode_steps",
        "total_bytes_sent",
        "total_dense_bytes",
    )

    def __init__(
        self,
        policy: Policy | None = None,
        process_group: dist.ProcessGroup | None = None,
        error_feedback: bool = True,
        warmup_steps: int = 1,
        estimator: LinkEstimator | None = None,
        probe_every: int = 2,
        probe_fraction: float = 0.05,
    ) -> None:
        policy = FixedPolicy() if policy is None else policy
        check_instance("policy", policy, Policy, what="a lightning_netsense Policy")
        check_instance("process_group", process_group, dist.ProcessGroup, allow_none=True, what="a ProcessGroup")
        check_bool("error_feedback", error_feedback)
        check_int("warmup_steps", warmup_steps, low=1, why="DDP rebuilds its buckets after step 1")
        check_instance("estimator", estimator, LinkEstimator, allow_none=True)
        check_int("probe_every", probe_every, low=0, why="0 disables probing")
        check_number("probe_fraction", probe_fraction, low=0, high=1, low_open=True)
        self.policy = policy
        self.error_feedback = error_feedback
        self.warmup_steps = warmup_steps
        self.process_group = process_group
        self.feedback = ErrorFeedback()
        self.estimator = LinkEstimator() if estimator is None else estimator
        self.ledger = CodecLedger()
        self.recorder = StepRecorder()
        self.probes = ProbeScheduler(probe_every, probe_fraction)
        #: where the optimizers keep their moments (the strategy sets it): the update error is measured with them
        self.second_moments: SecondMoments | None = None
        #: decision for the next step, identical on every rank
        self.decision: Decision = _PLAIN
        #: number of synchronising steps completed
        self.step = 0
        # steps before this one are a wrapper's warm-up: DDP rebuilds its buckets after the first iteration of every
        # wrapper, so a resumed run needs the warm-up again (see load_state_dict)
        self._plain_until = warmup_steps
        # the warm-up's mode: decided at the first hook call, when the world size is known; checked here already,
        # for a clear error before any process starts
        self._first_decision(world_size=2)
        self._warmup_decision: Decision | None = None
        self._last_boundary: float | None = None
        # (wire bytes, seconds) of the last agreement: a tiny, latency-only sample of the link
        self._agreement: tuple[float, float] = (0.0, 0.0)
        #: the observation the last decision was taken on (``None`` before the first boundary)
        self.last_observation: Observation | None = None
        #: this rank's own measurements at the last boundary, before the ranks agreed (``None`` before it)
        self.last_local: Measurements | None = None
        #: steps run in each mode
        self.mode_steps: dict[str, int] = {}
        self.total_bytes_sent = 0.0
        self.total_dense_bytes = 0.0

    # ------------------------------------------------------------------ pickling (spawn start method)
    def __getstate__(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in self.__slots__ if k not in ("process_group", "ledger", "recorder",
                                                                           "second_moments", "feedback")}
        state["ledger"] = self.ledger.state_dict()  # codec objects may hold per-bucket tensors: rebuild them
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        ledger = state.pop("ledger")
        for k, v in state.items():
            setattr(self, k, v)
        self.ledger = CodecLedger()
        self.ledger.load_state_dict(ledger)
        self.recorder = StepRecorder()
        self.feedback = ErrorFeedback()
        self.second_moments = None
        self.process_group = None
        log.info("NetSenseState unpickled: the default process group will be used")

    # ------------------------------------------------------------------ public API
    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def codecs(self) -> dict[str, Codec]:
        """The codec instance of every registered mode."""
        return self.ledger.codecs

    @property
    def probe_every(self) -> int:
        return self.probes.every

    @property
    def probe_fraction(self) -> float:
        return self.probes.fraction

    @property
    def active_decision(self) -> Decision:
        """The decision the hook applies in the current step.

        During the warm-up: what the policy's :meth:`~lightning_netsense.Policy.first_decision` chose for its
        first step (nothing is measured yet), then what its :meth:`~lightning_netsense.Policy.warmup_decision`
        chose.
        """
        if self.step >= self._plain_until:
            return self.decision
        if self._warmup_decision is None:
            self._warmup_decision = self._first_decision(self.world_size)
        return self._warmup_decision

    def begin_step(self) -> None:
        """Mark the start of a step, before its forward pass (the strategy calls this; optional).

        The step is timed from here to its boundary (plus the optimizer step after the last boundary, where the
        strategy reports it), so that what runs between steps - validation, checkpoints - does not count. Without
        it, steps are timed from boundary to boundary. With gradient accumulation the first call after a boundary
        counts.
        """
        self.recorder.begin_step()

    def begin_backward(self) -> None:
        """Mark the start of a backward pass (the strategy calls this; otherwise the first hook call is used)."""
        self.recorder.begin_backward()

    def end_step(self) -> Decision | None:
        """Close the step: agree on the measurements with every rank and decide the next step's mode.

        Call it after a backward pass on every rank (collective). Does nothing, and returns ``None``, after a
        backward that did not synchronise gradients (gradient accumulation).
        """
        if not self.recorder.collectives:
            return None
        rec = self.recorder.finish(self._last_boundary)
        for index in rec.bad_buckets:  # a non-finite step (an AMP overflow the scaler skips): drop its residual
            self.feedback.discard(index, not_finite=True)
        if not self.ledger.calibrated and self.step >= self._plain_until - 1:
            # lossy modes may start next step: price every candidate on one bucket, so that an untried codec does
            # not look free
            layouts = self.ledger.layouts(rec.index)
            if layouts:
                largest = max(layouts, key=lambda layout: layout.numel)
                self.ledger.calibrate(largest, (_PLAIN, *self.policy.candidates()), self._bucket_device())
        local = self._measurements(rec)
        decision = self.decide_from(local, rec.index)
        # the calibration and a bandwidth probe are the hook's own overheads, paid at this boundary: a step whose
        # start is not marked is timed from here, without them
        self._last_boundary = time.perf_counter()
        self.recorder.boundary_done()
        return decision

    def end_optimizer_step(self) -> None:
        """Mark the end of the optimizer step after a boundary (the strategy calls this; optional): the time from
        the boundary to here counts in the next step's time."""
        self.recorder.end_optimizer_step()

    def decide_from(self, local: Measurements, indices: Sequence[int] = ()) -> Decision:
        """Agree on ``local`` with every rank, update the estimator and run the policy (collective).

        Args:
            local: this rank's measurements of the step.
            indices: the step's buckets, in the order they ran (default: every known bucket).
        """
        used = self.active_decision
        world = self.world_size
        t0 = time.perf_counter()
        agreed = agree(local, self.process_group, self._collective_device())
        self._agreement = (sum(allreduce_wire_bytes(8 * n, world) for n in AGREED_VALUES), time.perf_counter() - t0)
        samples_b, samples_s = list(agreed.bucket_wire_bytes), list(agreed.bucket_seconds)
        for nbytes, seconds in ((agreed.probe_wire_bytes, agreed.probe_seconds),
                                (agreed.bw_probe_wire_bytes, agreed.bw_probe_seconds)):
            if seconds > 0:
                samples_b.append(nbytes)
                samples_s.append(seconds)
        believed = self.estimator.compute()
        layouts = self.ledger.layouts(indices)
        dense = [layout.numel * layout.itemsize for layout in layouts]
        largest_dense = max((allreduce_wire_bytes(d, world) for d in dense), default=0.0)
        # a wrapper's first step also pays the process group's set-up (connections, buffers, TCP's slow start): its
        # samples stand until the next step's, and cannot vouch for the link (the policy holds the first mode)
        first = self.step == self._plain_until - self.warmup_steps
        self.estimator.update(samples_b, samples_s, reference=largest_dense or None, provisional=first)
        observation = Observation(
            **{f.name: getattr(agreed, f.name) for f in dataclasses.fields(Measurements)},
            step=self.step,
            world_size=world,
            decision=used,
            bucket_bytes=tuple(dense),
            dense_bytes=sum(wire_bytes(d, world, True) for d in dense),
            link=self._link(),
            codecs=self.ledger.profiles(
                (_PLAIN, *self.policy.candidates()),
                layouts,
                agreed.mode_errors,
                agreed.mode_seconds_per_byte,
                agreed.mode_update_errors,
            ),
        )
        if self.step + 1 < self._plain_until:
            # the next step is a warm-up step: the policy's hysteresis must not commit to a decision that cannot
            # take effect; it may pick a codec without per-bucket state
            decision = self.decision
            self._warmup_decision = self._checked(
                self.policy.warmup_decision(observation, self._stateless_candidates()), "warmup_decision",
                self._stateless_candidates(),
            )
        else:
            decision = self._validated(self.policy.decide(observation))
        cap = probe_cap(max(observation.bucket_bytes, default=0), self.estimator.vouch_fraction)
        fast, slow = self.probes.plan(
            self.step, observation, believed, agreed, cap, decision.mode != used.mode,
            self._traffic_vouches(observation, used),
        )
        if (
            self._probes_link
            and self.codecs[decision.mode].lossy
            and self.probes.due(self.step, self._plain_until)
            and not self._traffic_vouches(observation, decision)
        ):
            self.probes.run(self.step, observation, cap, fast, slow, self.process_group, self._collective_device())
        self.last_observation = observation
        self.last_local = local
        self.mode_steps[used.mode] = self.mode_steps.get(used.mode, 0) + 1
        self.total_bytes_sent += observation.bytes_sent
        self.total_dense_bytes += observation.dense_bytes
        self.step += 1
        self.decision = decision
        return decision

    def state_dict(self) -> dict[str, Any]:
        """Decision state for checkpoints: plain values only (loads with ``torch.load(weights_only=True)``).

        Residuals are per rank and are *not* included: they are reset on resume (error feedback restarts from
        zero, which costs at most one step's unsent gradient). The policy's class and the world size are kept, so
        that a resume with another policy or on another number of ranks starts those parts afresh.
        """
        return {
            "step": self.step,
            "decision": self.decision.to_dict(),
            "estimator": self.estimator.state_dict(),
            "policy": self.policy.state_dict(),
            "policy_class": type(self.policy).__qualname__,
            "world_size": self.world_size if dist.is_initialized() else None,
            **self.ledger.state_dict(),
            "mode_steps": dict(self.mode_steps),
            "total_bytes_sent": self.total_bytes_sent,
            "total_dense_bytes": self.total_dense_bytes,
            "probe_bytes": self.probes.size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        written_by = state.get("policy_class")
        same_policy = written_by in (None, type(self.policy).__qualname__)
        # another policy's decision may not be one of this policy's candidates: the first step decides again
        self.decision = self._validated(Decision.from_dict(state["decision"])) if same_policy else _PLAIN
        if same_policy:
            self.policy.load_state_dict(state["policy"])
        else:
            log.info(f"NetSenseState: the checkpoint's policy state was written by {written_by}, not"
                     f" {type(self.policy).__qualname__}: the policy starts afresh")
        # an estimate measured on another number of ranks describes other collectives: measured again
        saved_world = state.get("world_size")
        if saved_world is None or not dist.is_initialized() or saved_world == self.world_size:
            self.estimator.load_state_dict(state["estimator"])
        else:
            self.estimator.reset()
        self.ledger.load_state_dict(state)
        self.mode_steps = {str(k): int(v) for k, v in state.get("mode_steps", {}).items()}
        self.total_bytes_sent = float(state.get("total_bytes_sent", 0.0))
        self.total_dense_bytes = float(state.get("total_dense_bytes", 0.0))
        self.probes.size = int(state.get("probe_bytes", 0))
        self.feedback.reset()
        self.ledger.reset()
        self.recorder.discard()
        self.probes.reset()
        self._last_boundary = None
        # a fresh DDP wrapper rebuilds its buckets after its first iteration: no lossy step (or residual) before
        self._plain_until = self.step + self.warmup_steps
        self._warmup_decision = None

    # ------------------------------------------------------------------ internals
    def _first_decision(self, world_size: int) -> Decision:
        """The policy's choice for a wrapper's first step, checked against what may run there."""
        allowed = self._first_candidates()
        return self._checked(self.policy.first_decision(allowed, world_size), "first_decision", allowed)

    def _checked(self, decision: Decision, method: str, allowed: Sequence[Decision]) -> Decision:
        decision = self._validated(decision)
        if decision.mode != "none" and decision not in allowed:
            raise ValueError(
                f"{type(self.policy).__name__}.{method} chose {decision.key}; accepted in the warm-up: "
                f"{[d.key for d in allowed]}"
            )
        return decision

    def _stateless_candidates(self) -> tuple[Decision, ...]:
        return tuple(d for d in (_PLAIN, *self.policy.candidates()) if not self.codecs[d.mode].bucket_state)

    def _first_candidates(self) -> tuple[Decision, ...]:
        """What may run in a wrapper's first step: every candidate while probes can measure the link (the first
        step keeps no residual, and per-bucket codec state is rebuilt with DDP's buckets), else the candidates
        without per-bucket state."""
        if self._probes_link:
            return (_PLAIN, *self.policy.candidates())
        return self._stateless_candidates()

    @property
    def _probes_link(self) -> bool:
        """Whether bandwidth probes run: enabled, and the policy's decisions depend on the estimate."""
        return bool(self.probes.every) and self.policy.uses_link_estimate

    def _collective_device(self) -> torch.device:
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _bucket_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.recorder.cuda else torch.device("cpu")

    def _validated(self, decision: Decision) -> Decision:
        if not isinstance(decision, Decision):
            raise TypeError(
                f"{type(self.policy).__name__}.decide must return a Decision, but returned {type(decision).__name__}"
            )
        if decision.mode not in self.codecs:
            raise ValueError(
                f"{type(self.policy).__name__} chose mode {decision.mode!r}; accepted modes: {sorted(self.codecs)}"
            )
        type(self.codecs[decision.mode]).validate_options(decision.options)
        return decision

    def _link(self) -> LinkEstimate:
        """The estimate the policy sees. Without probes nothing but the training traffic can vouch for the link,
        so the estimate is taken as it is, except after a wrapper's first step (its samples are provisional)."""
        link = self.estimator.compute()
        if not link.vouched and not self._probes_link and not self.estimator.provisional:
            link = dataclasses.replace(link, vouched=True)
        return link

    def _traffic_vouches(self, obs: Observation, decision: Decision) -> bool:
        """Whether a step's own payloads in ``decision`` are large enough to measure the link (fp16, bf16 or int8
        buckets show a recovery themselves; PowerSGD's or top-k's kilobytes do not)."""
        profile = obs.codecs.get(decision.mode)
        if profile is None or not profile.payload_bytes:
            return False
        largest = max(wire_bytes(p, obs.world_size, profile.summable) for p in profile.payload_bytes)
        return self.estimator.vouches(largest)

    def _measurements(self, rec: RecordedStep) -> Measurements:
        """This rank's measurements of the step just recorded; updates the ledger's costs and errors."""
        mode = self.active_decision.mode
        self.ledger.record_cost(mode, rec.codec_seconds, rec.dense_bytes)
        rel_error = 0.0
        if self.codecs[mode].lossy and rec.ref2 > 0 and math.isfinite(rec.err2):
            rel_error = math.sqrt(rec.err2 / rec.ref2)
            self.ledger.errors[mode] = rel_error
        update_error, sign_flips = 0.0, 0.0
        if rec.update_terms is not None:
            update_error, sign_flips = relative(rec.update_terms)
        self.ledger.shadow.measure(self.codecs, self.policy.candidates(), self.second_moments)
        seconds = queue_corrected_durations(rec.launch, rec.end)
        errors, costs, updates = self.ledger.per_mode()
        return Measurements(
            backward_time=rec.backward_time,
            overlap_time=rec.overlap_time,
            step_time=rec.step_time,
            exposed_comm_time=rec.exposed_comm_time,
            comm_time=sum(seconds),
            bytes_sent=float(sum(rec.wire)),
            bytes_in_flight=peak_in_flight(rec.launch, rec.end, rec.wire),
            rel_error=rel_error,
            residual_norm=self.feedback.norm() if self.error_feedback else 0.0,
            update_error=update_error if math.isfinite(update_error) else 0.0,
            sign_flips=sign_flips if math.isfinite(sign_flips) else 0.0,
            probe_wire_bytes=self._agreement[0],
            probe_seconds=self._agreement[1],
            bw_probe_wire_bytes=self.probes.last[0],
            bw_probe_seconds=self.probes.last[1],
            bucket_wire_bytes=tuple(rec.wire),
            bucket_seconds=tuple(seconds),
            mode_errors=errors,
            mode_seconds_per_byte=costs,
            mode_update_errors=updates,
        )


def _error_terms(grad: Tensor, sent: Tensor) -> tuple[Tensor, Tensor]:
    """``(||grad - sent||^2, ||grad||^2)`` as device tensors."""
    return torch.linalg.vector_norm(grad - sent).square(), torch.linalg.vector_norm(grad).square()


def _compress_lossy(state: NetSenseState, codec: Codec, decision: Decision, layout: BucketLayout, buffer: Tensor,
                    exact: Tensor, sample: Any) -> tuple[Tensor, Any, Tensor | None, Tensor]:
    """Step 2 of :func:`netsense_hook` for a lossy mode: returns ``(payload, ctx, sent, target)`` where ``sent`` is
    what this rank contributed at the sampled coordinates and ``target`` what it was asked to send there."""
    rec = state.recorder
    # no residual from a wrapper's first step: DDP rebuilds its buckets after it (see `warmup_steps`)
    if state.error_feedback and state.step > state._plain_until - state.warmup_steps:
        old = state.feedback.residual(layout.index)
        if old is None:
            rec.cold = True
        target = exact if old is None or old.shape != buffer.shape else exact + sample.gather(old)
        # grad + residual in the residual's memory, and the new residual formed in place: no full-size allocation
        compensated = state.feedback.compensate(layout.index, buffer)
        payload, ctx = codec.compress(compensated, layout, **decision.options)
        err2, ref2 = state.feedback.settle(
            layout.index,
            compensated,
            lambda c: codec.subtract_sent_(c, payload, ctx, layout),
            lambda r2: codec.residual_sq_norm(r2, payload, ctx, layout),
        )
        sent = target - sample.gather(state.feedback.residual(layout.index))
    else:
        payload, ctx = codec.compress(buffer, layout, **decision.options)
        own = codec.decompress(payload, ctx, layout).reshape(-1)
        err2, ref2 = _error_terms(buffer.reshape(-1).float(), own)
        target, sent = exact, sample.gather(own)
    rec.add_error(layout.index, err2, ref2)
    return payload, ctx, sent, target


def netsense_hook(state: NetSenseState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average one gradient bucket across ranks in the mode agreed for this step.

    1. Take the step's mode from ``state.active_decision``: identical on every rank, agreed at the last boundary.
    2. Let the codec ledger see the bucket: its layout (DDP rebuilds buckets after the first step), the window of
       gradients every candidate is measured on, and the sample the update error is taken on.
    3. For a lossy mode, add the bucket's error-feedback residual, compress, and keep as the new residual what
       this rank's payload does not carry; record the errors as device tensors. For plain DDP, fold a residual
       left by a lossy mode into the gradient (what error feedback owes is delivered).
    4. Issue exactly one collective from the hook body - ``all_reduce`` if the payload is summable, else
       ``all_gather_into_tensor``. gloo matches collectives by issue order, and DDP calls the hook in bucket order
       on every rank, so this cannot mismatch; a second collective issued from a ``then`` callback can.
    5. When it completes, aggregate into the averaged gradient, write it into the bucket and record the
       collective's completion.

    Nothing here waits for the device. Register with ``ddp_model.register_comm_hook(state, netsense_hook)``;
    outside Lightning, call ``state.end_step()`` after each synchronising backward on every rank.
    """
    rec = state.recorder
    buffer = bucket.buffer()
    rec.cuda = buffer.is_cuda
    rec.bucket()

    # 1. the mode of this step
    decision = state.active_decision
    codec = state.codecs[decision.mode]

    # 2. the bucket in the ledger
    params = bucket.parameters()
    shapes = tuple(tuple(g.shape) for g in bucket.gradients())
    layout, rebuilt = state.ledger.layout(bucket.index(), buffer, shapes, state.world_size)
    if rebuilt:  # per-bucket memory no longer lines up with the buffer
        state.feedback.discard(layout.index)
    shadow = state.ledger.shadow
    if not shadow.ready:
        moments = state.second_moments
        shadow.choose(moments.params if moments is not None and moments.params else params)
    shadow.capture(params, bucket.gradients())
    sample = state.ledger.sample(layout, buffer.device)
    exact = sample.gather(buffer)  # this rank's gradient at the sampled coordinates, before any compression

    # 3. compress
    t0 = rec.codec_start()
    if codec.lossy:
        payload, ctx, sent, target = _compress_lossy(state, codec, decision, layout, buffer, exact, sample)
        rec.add_update_terms(sample.step(exact, sent, sample.preconditioner(params, state.second_moments), target))
    else:
        if state.error_feedback:
            state.feedback.fold(layout.index, buffer)
        payload, ctx = codec.compress(buffer, layout, **decision.options)
    payload = payload.contiguous()
    rec.codec_end(t0)

    # 4. one collective
    world = layout.world_size
    collected = payload if codec.summable else payload.new_empty(world * payload.numel())
    nbytes = payload.numel() * payload.element_size()
    slot = rec.launch(layout.index, layout.numel, layout.itemsize, wire_bytes(nbytes, world, codec.summable))
    if codec.summable:
        work = dist.all_reduce(payload, group=state.process_group, async_op=True)
    else:
        work = _all_gather(collected, payload, group=state.process_group, async_op=True)

    # 5. aggregate when it completes
    def finish(fut: torch.futures.Future) -> Tensor:
        fut.value()  # re-raises a failed collective so that DDP reports it instead of averaging garbage
        rec.completed(slot)
        t1 = rec.codec_start()
        if buffer.dtype == torch.float32 or not codec.lossy:
            codec.aggregate_into(collected, ctx, layout, buffer)
        else:  # a half-precision bucket: the codec averages in float32
            buffer.copy_(codec.aggregate_into(collected, ctx, layout, torch.empty_like(buffer, dtype=torch.float32)))
        rec.codec_end(t1)
        return buffer

    return work.get_future().then(finish)
