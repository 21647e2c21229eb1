"""The dispatcher communication hook and its state.

``netsense_hook(state, bucket)`` is registered on the DDP model once (DDP allows one hook per model). Per
bucket it applies the mode that every rank agreed on at the last step boundary; at the boundary
(:meth:`NetSenseState.end_step`, called by the strategy after each synchronising backward) the ranks share
their measurements in one small ``all_gather`` and run the policy on the identical combined observation.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations at runtime
# (`bucket: dist.GradBucket`, `-> torch.futures.Future[torch.Tensor]`) and rejects strings.

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_netsense._validation import check_bool, check_instance, check_int, check_number
from lightning_netsense.codecs import CODECS, BucketLayout, Codec
from lightning_netsense.feedback import ErrorFeedback
from lightning_netsense.observation import (
    CodecProfile,
    Decision,
    PACKED_SIZE,
    LinkEstimate,
    LocalObservation,
    Observation,
    allgather_wire_bytes,
    allreduce_wire_bytes,
    combine_locals,
    pack_local,
    unpack_locals,
    wire_bytes,
)
from lightning_netsense.policy import FixedPolicy, Policy
from lightning_netsense.shadow import ShadowMeter
from lightning_netsense.update_error import BucketSample, SecondMoments, relative
from lightning_netsense.sensing import (
    LinkEstimator,
    peak_in_flight,
    probe_answered_fast,
    probe_answered_slow,
    probe_cap,
    probe_size,
    probe_wait,
    queue_corrected_durations,
)

__all__ = ["NetSenseState", "netsense_hook"]

log = logging.getLogger(__name__)

_PLAIN = Decision("none")
# torch 2.13 renamed all_gather_into_tensor (which now warns on every call); same semantics and gloo future
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# weight of the newest measurement in a codec's running cost per byte
_COST_EMA = 0.3



class _StepRecord:
    """What the hook records during one step; reset at each boundary."""

    __slots__ = ("t_step_start", "t_backward_start", "t_first", "t_last", "launch", "end", "wire", "index",
                 "numel", "err2", "ref2", "cold", "codec_seconds", "cuda_events", "update_terms")

    def __init__(self) -> None:
        self.t_step_start: float | None = None
        self.t_backward_start: float | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.launch: list[float] = []
        # filled by the collective's callback, on the backend's thread
        self.end: list[float] = []
        self.wire: list[float] = []
        self.index: list[int] = []
        self.numel: list[int] = []
        self.err2 = 0.0
        self.ref2 = 0.0
        # a lossy bucket found no error-feedback residual: the step's error is optimistic (see CodecProfile)
        self.cold = False
        # appended from two threads (hook body and callback); list.append is atomic under the GIL, += is not
        self.codec_seconds: list[float] = []
        self.cuda_events: list[Any] = []
        # summed `update_terms` of this step's lossy buckets (a device tensor, read at the boundary)
        self.update_terms: Tensor | None = None


class NetSenseState:
    r"""State of :func:`netsense_hook`: configuration, per-bucket memory, the link estimator and the decision.

    Build it with plain values; it binds to the process group lazily, in the worker, so that it pickles for the
    ``spawn`` start method (the process group is dropped from the pickle and the default group is used after
    unpickling).

    Args:
        policy: decides the mode of each step from the agreed observation (default: plain DDP).
        process_group: group the gradients are averaged over (default: the world).
        error_feedback: keep what lossy codecs did not send and add it to the next step.
        warmup_steps: steps before the policy's own decisions take effect; must be >= 1. DDP rebuilds its
            buckets after the first step, so per-bucket state (PowerSGD's factors, error feedback) is only
            meaningful from then on. The first step runs what
            :meth:`Policy.first_decision <lightning_netsense.Policy.first_decision>` picks before anything is
            measured, without error feedback (its buckets are provisional; a codec's per-bucket state is rebuilt
            with them): any candidate while bandwidth probes can measure the link at the next boundaries, else
            plain DDP or a codec without per-bucket state (fp16, bf16, int8, top-k), whose traffic measures it.
            Any further warm-up steps run what
            :meth:`Policy.warmup_decision <lightning_netsense.Policy.warmup_decision>` picks from the
            measurement, among plain DDP and the codecs without per-bucket state. The default, 1, lets the policy
            choose any codec from the second step on: measured on the digits MLP (Adam, seed 0), PowerSGD rank 16
            from the second step reached 95 % at step 35, and at step 50 after a second warm-up step in top-k
            (the only stateless codec cheap at 20 Mbit/s); rank 4 at step 65 and 75.
        estimator: the link estimator (default: :class:`LinkEstimator` with its defaults).
        probe_every: while a lossy mode runs, probe the bandwidth at most every this many steps (0: never).
            Compressed payloads are too small to measure a link that has recovered (their time is latency,
            scheduler noise, or a shaper's burst), so the state sends one ``all_reduce`` of a probe buffer at
            the step boundary. It is sized to take ``probe_fraction`` of the steps until the next probe at the
            believed bandwidth, and quadrupled at the next step while the link answers faster than believed (as
            TCP's slow start), up to the size that vouches for the link (``vouch_fraction`` of the largest
            bucket); after a chain of probes that took ``d`` seconds the next one waits until
            ``d <= probe_fraction`` of the steps in between (an amortised budget, measured, not predicted). Until
            anything has vouched for the link (a compressed first step: see :attr:`LinkEstimate.vouched`), a probe
            runs at every boundary, four times the last, up to the vouching size.
        probe_fraction: share of the training time probes may take, in (0, 1].

    Raises:
        ValueError: if an argument is of the wrong type or out of range.
    """

    __slots__ = (
        # configuration
        "policy",
        "error_feedback",
        "warmup_steps",
        "probe_every",
        "probe_fraction",
        # internal state
        "process_group",
        "codecs",
        "feedback",
        "estimator",
        "decision",
        "step",
        "_record",
        "_layouts",
        "_mode_errors",
        "_mode_cost",
        "_last_boundary",
        "_probe",
        "_plain_until",
        "_bw_probe",
        "_probe_bytes",
        "_probe_chain",
        "_probe_calm",
        "_next_probe",
        "_warmup_decision",
        "_mode_error_step",
        "_mode_error_cold",
        "_calibrated",
        "second_moments",
        "_samples",
        "_shadow",
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
        self.probe_every = probe_every
        self.probe_fraction = float(probe_fraction)
        # steps before this one run plain allreduce: DDP rebuilds its buckets after the first iteration of every
        # wrapper, so a resumed run needs the warm-up again (see load_state_dict)
        self._plain_until = warmup_steps
        self.process_group = process_group
        self.codecs: dict[str, Codec] = {name: cls() for name, cls in CODECS.items()}
        self.feedback = ErrorFeedback()
        self.estimator = LinkEstimator() if estimator is None else estimator
        #: decision for the next step, identical on every rank
        self.decision: Decision = _PLAIN
        #: number of synchronising steps completed
        self.step = 0
        self._record = _StepRecord()
        self._layouts: dict[int, BucketLayout] = {}
        self._mode_errors: dict[str, float] = {}
        self._mode_cost: dict[str, float] = {}
        self._last_boundary: float | None = None
        self._probe: tuple[float, float] = (0.0, 0.0)
        self._calibrated = False
        #: where the optimizer keeps its second moments (set by the strategy): the update error is measured with them
        self.second_moments: SecondMoments | None = None
        self._samples: dict[int, BucketSample] = {}
        # every lossy candidate run on a window of the gradients, unsent: the update error the policy prices with
        self._shadow = ShadowMeter()
        self._bw_probe: tuple[float, float] = (0.0, 0.0)
        self._probe_bytes = 0
        # agreed seconds of the current chain of fast-answering probes (paid for after its last probe)
        self._probe_chain = 0.0
        # probes in a row that answered as believed (each doubles the wait before the next)
        self._probe_calm = 0
        # first step whose boundary may probe (agreed: derived from agreed probe durations only)
        self._next_probe = 0
        # mode of the warm-up steps (see `active_decision`): decided at the first hook call, when the world size is
        # known; the policy's choice is checked here already, for a clear error before any process starts
        self._first_decision(world_size=2)
        self._warmup_decision: Decision | None = None
        # step at which each lossy mode's error was last measured (its age is told to the policy)
        self._mode_error_step: dict[str, int] = {}
        # lossy modes whose last error was measured without an error-feedback residual (told to the policy)
        self._mode_error_cold: set[str] = set()
        #: the observation the last decision was taken on (``None`` before the first boundary)
        self.last_observation: Observation | None = None
        #: this rank's own measurements at the last boundary, before the ranks agreed (``None`` before it)
        self.last_local: LocalObservation | None = None
        #: steps run in each mode
        self.mode_steps: dict[str, int] = {}
        self.total_bytes_sent = 0.0
        self.total_dense_bytes = 0.0

    # ------------------------------------------------------------------ pickling (spawn start method)
    def __getstate__(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in self.__slots__ if k not in ("process_group", "_record")}
        state["codecs"] = list(self.codecs)  # codec objects may hold per-bucket tensors: rebuild them
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.codecs = {name: CODECS[name]() for name in state["codecs"]}
        self.process_group = None
        self._record = _StepRecord()
        log.info("NetSenseState unpickled: the default process group will be used")

    # ------------------------------------------------------------------ public API
    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def active_decision(self) -> Decision:
        """The decision the hook applies in the current step.

        During the warm-up: what the policy's :meth:`~lightning_netsense.Policy.first_decision` chose for its
        first step (nothing is measured yet), then what its :meth:`~lightning_netsense.Policy.warmup_decision`
        chose; both among plain DDP and the codecs that keep no per-bucket state (DDP may still rebuild its
        buckets).
        """
        if self.step >= self._plain_until:
            return self.decision
        if self._warmup_decision is None:
            self._warmup_decision = self._first_decision(self.world_size)
        return self._warmup_decision

    def _first_decision(self, world_size: int) -> Decision:
        """The policy's choice for a wrapper's first step, checked against what may run there."""
        allowed = self._first_candidates()
        first = self._validated(self.policy.first_decision(allowed, world_size))
        if first.mode != "none" and first not in allowed:
            raise ValueError(
                f"{type(self.policy).__name__}.first_decision chose {first.key}; accepted in the warm-up: "
                f"{[d.key for d in allowed]}"
            )
        return first

    def _stateless_candidates(self) -> tuple[Decision, ...]:
        return tuple(d for d in (_PLAIN, *self.policy.candidates()) if not self.codecs[d.mode].bucket_state)

    def _first_candidates(self) -> tuple[Decision, ...]:
        """What may run in a wrapper's first step: every candidate while probes can measure the link.

        A codec's per-bucket state (PowerSGD's factors) is rebuilt with DDP's buckets after the first step, and
        that step keeps no error-feedback residual, so any codec may run. What the first step must leave is a
        way to measure the link: payloads large enough to (fp16, bf16, int8), or bandwidth probes at the next
        boundaries (see ``probe_every``). Without probes, the codecs with per-bucket state wait as before.
        """
        if self._probes_link:
            return (_PLAIN, *self.policy.candidates())
        return self._stateless_candidates()

    @property
    def _probes_link(self) -> bool:
        """Whether bandwidth probes run: enabled, and the policy's decisions depend on the estimate."""
        return bool(self.probe_every) and self.policy.uses_link_estimate

    def begin_step(self) -> None:
        """Mark the start of a step, before its forward pass (the strategy calls this; optional).

        Steps are timed from boundary to boundary, except the first after construction or a resume, which has no
        boundary before it: it is timed from here (else from its backward, and the policy's first decision
        would see a step without its forward: measured on the digits MLP at 1 Gbit/s, 8 ms of backward against
        25 ms per step, and top-k's kilobytes looked cheaper per unit of progress than fp16). With gradient
        accumulation the first call after a boundary counts.
        """
        if self._record.t_step_start is None:
            self._record.t_step_start = time.perf_counter()

    def begin_backward(self) -> None:
        """Mark the start of a backward pass (the strategy calls this; otherwise the first hook call is used)."""
        self._record.t_backward_start = time.perf_counter()

    def end_step(self) -> Decision | None:
        """Close the step: agree on the measurements with every rank and decide the next step's mode.

        Call it after a backward pass on every rank (collective). Does nothing, and returns ``None``, after a
        backward that did not synchronise gradients (gradient accumulation).
        """
        rec = self._record
        if not rec.launch:
            return None
        self._record = _StepRecord()
        now = time.perf_counter()
        overhead = 0.0
        if not self._calibrated and self.step >= self._plain_until - 1:
            # not done in the hook, under a long transfer (see netsense_hook): price the candidates here, after
            # this step's collectives were timed
            self.calibrate([self._layouts[i] for i in rec.index if i in self._layouts])
            overhead = time.perf_counter() - now
        local = self._local_observation(rec, now)
        decision = self.decide_from(local, rec)
        # The calibration and a bandwidth probe are the hook's own overheads, paid at this boundary: the next step
        # is timed without them. Counted in it, a probe inflated the step time that amortises it (the digits run
        # at 20 Mbit/s spent 15 % of its time in probes against a 5 % budget), and the policy priced modes on
        # steps that carried a probe.
        self._last_boundary = now + overhead + self._bw_probe[1]
        return decision

    def calibrate(self, layouts: list[BucketLayout]) -> dict[str, float]:
        """Time each candidate codec on ``layouts`` (random data, no communication); seed its cost per byte.

        Runs compress, decompress and aggregate (on ``world_size`` copies of the payload) once per bucket, with
        a private random generator so that training randomness is untouched. Each rank measures its own
        cost; the agreement takes the maximum. Returns the measured seconds per dense byte, by mode.
        """
        self._calibrated = True
        dense = sum(layout.numel for layout in layouts) * 4.0
        if dense == 0:
            return {}
        gen = torch.Generator().manual_seed(0)
        # one random gradient per layout, copied for each pass: drawing a fresh one per codec and pass was half of
        # the calibration (0.15 of 0.30 s for the digits MLP's 2.2 M parameters, one thread)
        grads = [torch.randn(layout.numel, generator=gen) for layout in layouts]
        out = {}
        feedback = ErrorFeedback()  # a scratch memory: the training's residuals are not touched
        for decision in (_PLAIN, *self.policy.candidates()):
            if decision.mode in out or decision.mode not in self.codecs:
                continue
            codec = type(self.codecs[decision.mode])()
            options = type(codec).validate_options(decision.options)
            # twice, the faster pass counts: a codec's first call pays one-time costs (allocator, kernel set-up)
            # that a mode never run again would carry for the whole training (seen: bf16 over fp16 at 1 Gbit/s)
            passes = []
            for _ in range(2):
                seconds = 0.0
                for layout, base in zip(layouts, grads):
                    grad = base.clone()
                    t0 = time.perf_counter()
                    payload, ctx = codec.compress(grad, layout, **options)
                    if codec.lossy:  # the hook's error-feedback path: the residual in place and its statistics
                        bound = {"payload": payload, "ctx": ctx, "layout": layout}
                        feedback.settle(
                            layout.index,
                            grad,
                            functools.partial(codec.subtract_sent_, **bound),
                            functools.partial(codec.residual_sq_norm, **bound),
                        )
                    collected = payload.clone() if codec.summable else payload.repeat(layout.world_size)
                    codec.aggregate_into(collected, ctx, layout, grad)
                    seconds += time.perf_counter() - t0
                passes.append(seconds)
            out[decision.mode] = min(passes) / dense
        for mode, cost in out.items():
            self._mode_cost.setdefault(mode, cost)
        return out

    def decide_from(self, local: LocalObservation, record: _StepRecord | None = None) -> Decision:
        """Share ``local`` with every rank, combine, update the estimator and run the policy (collective)."""
        used = self.active_decision
        world = self.world_size
        packed = pack_local(local)
        gathered = torch.empty(world * PACKED_SIZE, dtype=packed.dtype)
        t0 = time.perf_counter()
        # gloo and nccl alike accept a CPU tensor here only for gloo; the observation is tiny, so move it if needed
        device = self._collective_device()
        if device.type != "cpu":
            packed, gathered = packed.to(device), gathered.to(device)
        _all_gather(gathered, packed, group=self.process_group)
        gathered = gathered.cpu()
        self._probe = (allgather_wire_bytes(packed.numel() * 8, world), time.perf_counter() - t0)
        agreed = combine_locals(unpack_locals(gathered, world))

        samples_b = list(agreed.bucket_wire_bytes)
        samples_s = list(agreed.bucket_seconds)
        if agreed.probe_seconds > 0:
            samples_b.append(agreed.probe_wire_bytes)
            samples_s.append(agreed.probe_seconds)
        if agreed.bw_probe_seconds > 0:
            samples_b.append(agreed.bw_probe_wire_bytes)
            samples_s.append(agreed.bw_probe_seconds)
        believed = self.estimator.compute()
        layouts = self._step_layouts(record)
        largest_dense = max((allreduce_wire_bytes(layout.numel * 4, world) for layout in layouts), default=0.0)
        # a wrapper's first step also pays the process group's set-up (connections, buffers, TCP's slow start): its
        # samples stand until the next step's, and cannot vouch for the link (the policy holds the first mode)
        first = self.step == self._plain_until - self.warmup_steps
        self.estimator.update(samples_b, samples_s, reference=largest_dense or None, provisional=first)
        observation = Observation(
            step=self.step,
            world_size=world,
            decision=used,
            bucket_bytes=tuple(layout.numel * 4 for layout in layouts),
            backward_time=agreed.backward_time,
            overlap_time=agreed.overlap_time,
            step_time=agreed.step_time,
            comm_time=agreed.comm_time,
            exposed_comm_time=agreed.exposed_comm_time,
            bytes_sent=agreed.bytes_sent,
            dense_bytes=sum(wire_bytes(layout.numel * 4, world, True) for layout in layouts),
            bytes_in_flight=agreed.bytes_in_flight,
            rel_error=agreed.rel_error,
            residual_norm=agreed.residual_norm,
            link=self._link(),
            codecs=self._profiles(layouts, agreed.mode_errors, agreed.mode_seconds_per_byte, agreed.mode_update_errors),
            update_error=agreed.update_error,
            sign_flips=agreed.sign_flips,
        )
        if self.step + 1 < self._plain_until:
            # the next step is a warm-up step: do not let the policy commit its hysteresis to a decision that
            # cannot take effect, taken before the codecs' costs were calibrated; it may pick a stateless codec
            decision = self.decision
            allowed = self._stateless_candidates()
            warmup = self._validated(self.policy.warmup_decision(observation, allowed))
            if warmup.mode != "none" and warmup not in allowed:
                raise ValueError(
                    f"{type(self.policy).__name__}.warmup_decision chose {warmup.key}; accepted in the warm-up: "
                    f"{[d.key for d in allowed]}"
                )
            self._warmup_decision = warmup
        else:
            decision = self._validated(self.policy.decide(observation))
        self._bw_probe = (0.0, 0.0)
        # whether the last probe (agreed values) answered faster than the link was believed to be; a probe of
        # the vouching size ends a chain either way (the estimator has taken it: the belief is updated). Until
        # then, a link never vouched for is measured by a ladder of probes, one per boundary, 4x each (as a
        # chain of fast answers): compressed payloads alone cannot measure it (see `_first_candidates`)
        below_cap = self._probe_bytes < self._probe_cap(observation)
        ladder = not observation.link.vouched
        fast = below_cap and (
            ladder or probe_answered_fast(believed, agreed.bw_probe_wire_bytes, agreed.bw_probe_seconds)
        )
        # ... or slower: then the next probe is of the vouching size, so that the drop replaces the last vouched
        # estimate (a small probe alone lowers it for a step, until the window's small payloads pass in a burst)
        slow = below_cap and probe_answered_slow(believed, agreed.bw_probe_wire_bytes, agreed.bw_probe_seconds)
        if agreed.bw_probe_seconds > 0 and self.probe_every:
            # amortise: the chain's agreed durations must fit in `probe_fraction` of the steps until the next
            self._probe_chain += agreed.bw_probe_seconds
            step_seconds = max(agreed.step_time, agreed.backward_time)
            # while the link answers as believed, probe less often (see `probe_wait`)
            self._probe_calm = 0 if fast or slow else self._probe_calm + 1
            wait = probe_wait(
                self._probe_chain, step_seconds, self.probe_fraction, self.probe_every, fast or slow, self._probe_calm
            )
            if not (fast or slow):
                self._probe_chain = 0.0
            # the probe ran at the last boundary (step - 1): the next may run at the boundary of step - 1 + wait
            self._next_probe = self.step + wait
        if decision.mode != used.mode:  # a new regime (the link moved): back to probing at the base rate
            self._probe_calm = 0
        if self.probe_every and self._traffic_vouches(observation, used):
            # this step's own payloads measured the link (an int8 first step, fp16 before a drop): a probe now
            # would measure it again. Measured at 20 Mbit/s on the digits MLP: the probe after the int8 first step
            # was sized on that 1.7 s step (275 kB), passed in the shaper's burst, and its chain took 0.5 s.
            self._next_probe = max(self._next_probe, self.step + 1 + self.probe_every)
        if (
            self._probes_link
            and self.codecs[decision.mode].lossy
            and self.step + 1 >= max(self._plain_until, self._next_probe)
            and not self._traffic_vouches(observation, decision)
        ):
            self._probe_bandwidth(observation, fast, slow)
            self._next_probe = self.step + 1 + self.probe_every
        self.last_observation = observation
        self.last_local = local
        self.mode_steps[used.mode] = self.mode_steps.get(used.mode, 0) + 1
        self.total_bytes_sent += observation.bytes_sent
        self.total_dense_bytes += observation.dense_bytes
        self.step += 1
        self.decision = decision
        return decision

    def _link(self) -> LinkEstimate:
        """The estimate the policy sees. Without probes nothing but the training traffic can vouch for the link,
        so the estimate is taken as it is (as it was before a policy could tell)."""
        link = self.estimator.compute()
        if not link.vouched and not self._probes_link and not self.estimator.provisional:
            link = dataclasses.replace(link, vouched=True)
        return link

    def _traffic_vouches(self, obs: Observation, decision: Decision) -> bool:
        """Whether the next step's own payloads are large enough to measure the link (then no probe is needed:
        fp16, bf16 or int8 buckets show a recovery themselves; PowerSGD's or top-k's kilobytes do not)."""
        profile = obs.codecs.get(decision.mode)
        if profile is None or not profile.payload_bytes:
            return False
        largest = max(wire_bytes(p, obs.world_size, profile.summable) for p in profile.payload_bytes)
        return self.estimator.vouches(largest)

    def _probe_cap(self, obs: Observation) -> int:
        return probe_cap(max(obs.bucket_bytes, default=0), self.estimator.vouch_fraction)

    def _probe_bandwidth(self, obs: Observation, fast: bool, slow: bool = False) -> None:
        """Time one ``all_reduce`` of a probe buffer (collective; sized from agreed values only).

        Every input of the size is identical on every rank (a size that differed would make gloo hang).
        """
        step_seconds = max(obs.step_time, obs.backward_time)
        size = probe_size(
            obs.link.bandwidth,
            fast,
            self._probe_bytes,
            step_seconds,
            self._probe_cap(obs),
            self.probe_fraction,
            self.probe_every,
            slow=slow,
        )
        if size <= 0:
            return
        self._probe_bytes = size
        buf = torch.zeros(size // 4, device=self._collective_device())
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=self.process_group)
        if buf.is_cuda:
            torch.cuda.synchronize(buf.device)
        self._bw_probe = (allreduce_wire_bytes(size, obs.world_size), time.perf_counter() - t0)

    def state_dict(self) -> dict[str, Any]:
        """Decision state for checkpoints: plain values only (loads with ``torch.load(weights_only=True)``).

        Residuals are per rank and are *not* included: they are reset on resume (error feedback restarts
        from zero, which costs at most one step's unsent gradient).
        """
        return {
            "step": self.step,
            "decision": self.decision.to_dict(),
            "estimator": self.estimator.state_dict(),
            "policy": self.policy.state_dict(),
            "mode_errors": dict(self._mode_errors),
            "mode_error_step": dict(self._mode_error_step),
            "mode_error_cold": sorted(self._mode_error_cold),
            "mode_cost": dict(self._mode_cost),
            "mode_steps": dict(self.mode_steps),
            "total_bytes_sent": self.total_bytes_sent,
            "total_dense_bytes": self.total_dense_bytes,
            "probe_bytes": self._probe_bytes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.decision = self._validated(Decision.from_dict(state["decision"]))
        self.estimator.load_state_dict(state["estimator"])
        self.policy.load_state_dict(state["policy"])
        self._mode_errors = {str(k): float(v) for k, v in state.get("mode_errors", {}).items()}
        # a checkpoint without the steps (older format): its errors count as measured at the resumed step
        steps = state.get("mode_error_step", {})
        self._mode_error_step = {str(k): int(steps.get(k, self.step)) for k in self._mode_errors}
        self._mode_error_cold = {str(m) for m in state.get("mode_error_cold", ())} & set(self._mode_errors)
        self._mode_cost = {str(k): float(v) for k, v in state.get("mode_cost", {}).items()}
        self.mode_steps = {str(k): int(v) for k, v in state.get("mode_steps", {}).items()}
        self.total_bytes_sent = float(state.get("total_bytes_sent", 0.0))
        self.total_dense_bytes = float(state.get("total_dense_bytes", 0.0))
        self._probe_bytes = int(state.get("probe_bytes", 0))
        self.feedback.reset()
        for codec in self.codecs.values():
            codec.reset()
        self._layouts.clear()
        self._last_boundary = None
        # a fresh DDP wrapper rebuilds its buckets after its first iteration: no lossy step (or residual) before
        self._plain_until = self.step + self.warmup_steps
        self._warmup_decision = None
        self._shadow.reset()
        self._next_probe = 0
        self._probe_chain = 0.0
        self._probe_calm = 0
        self._calibrated = False

    # ------------------------------------------------------------------ internals
    def _collective_device(self) -> torch.device:
        backend = dist.get_backend(self.process_group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

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

    def _layout(self, bucket: dist.GradBucket, buffer: Tensor) -> BucketLayout:
        index = bucket.index()
        shapes = tuple(tuple(g.shape) for g in bucket.gradients())
        layout = self._layouts.get(index)
        if layout is None or layout.numel != buffer.numel() or layout.shapes != shapes:
            if layout is not None:
                # buckets were rebuilt: per-bucket memory no longer lines up with the buffer
                self.feedback.discard(index)
                for codec in self.codecs.values():
                    codec.reset()
            layout = BucketLayout(index, buffer.numel(), shapes, self.world_size)
            self._layouts[index] = layout
        return layout

    def _sample(self, layout: BucketLayout, buffer: Tensor) -> BucketSample:
        sample = self._samples.get(layout.index)
        if sample is None or sample.layout != layout or sample.indices.device != buffer.device:
            sizes = [math.prod(shape) for shape in layout.shapes]
            sample = BucketSample(layout.numel, sizes, 4096, buffer.device, seed=layout.index)
            sample.layout = layout
            self._samples[layout.index] = sample
        return sample

    def _step_layouts(self, record: _StepRecord | None) -> list[BucketLayout]:
        if record is not None and record.index:
            return [self._layouts[i] for i in record.index if i in self._layouts]
        return [self._layouts[i] for i in sorted(self._layouts)]

    def _profiles(
        self,
        layouts: list[BucketLayout],
        errors: tuple[float, ...],
        costs: tuple[float, ...],
        updates: tuple[float, ...] = (),
    ) -> dict[str, CodecProfile]:
        modes = list(self.codecs)
        wanted = [_PLAIN, *self.policy.candidates()]
        out = {}
        for decision in wanted:
            codec = self.codecs.get(decision.mode)
            if codec is None:
                continue
            i = modes.index(decision.mode)
            err = errors[i] if i < len(errors) else math.nan
            cost = costs[i] if i < len(costs) else math.nan
            upd = updates[i] if i < len(updates) else math.nan
            out[decision.mode] = CodecProfile(
                mode=decision.mode,
                summable=codec.summable,
                lossy=codec.lossy,
                payload_bytes=tuple(codec.payload_bytes(layout, **decision.options) for layout in layouts),
                rel_error=None if math.isnan(err) else (0.0 if not codec.lossy else err),
                seconds_per_byte=0.0 if math.isnan(cost) else cost,
                # identical on every rank: every rank ran the same agreed mode in the same steps
                rel_error_age=self.step - self._mode_error_step.get(decision.mode, self.step),
                rel_error_cold=decision.mode in self._mode_error_cold,
                update_error=None if math.isnan(upd) else (0.0 if not codec.lossy else upd),
            )
        return out

    def _local_observation(self, rec: _StepRecord, now: float) -> LocalObservation:
        if rec.cuda_events:
            launch, end = _cuda_times(rec.cuda_events)
        else:
            launch, end = rec.launch, rec.end
        seconds = queue_corrected_durations(launch, end)
        t_start = rec.t_backward_start if rec.t_backward_start is not None else rec.t_first
        mode = self.active_decision.mode
        dense = sum(rec.numel) * 4.0
        if dense > 0 and rec.codec_seconds:
            cost = sum(rec.codec_seconds) / dense
            prev = self._mode_cost.get(mode)
            self._mode_cost[mode] = cost if prev is None else (1 - _COST_EMA) * prev + _COST_EMA * cost
        if self.codecs[mode].lossy and rec.ref2 > 0:
            rel_error = math.sqrt(rec.err2 / rec.ref2)
            self._mode_errors[mode] = rel_error
            self._mode_error_step[mode] = self.step
            if rec.cold:
                self._mode_error_cold.add(mode)
            else:
                self._mode_error_cold.discard(mode)
        else:
            rel_error = 0.0
        update_error, sign_flips = 0.0, 0.0
        if rec.update_terms is not None:
            update_error, sign_flips = relative(rec.update_terms.tolist())
        self._shadow.measure(self.codecs, self.policy.candidates(), self.second_moments)
        if self._last_boundary is not None:
            step_time = now - self._last_boundary
        else:
            step_time = now - (rec.t_step_start or t_start or now)
        self._last_boundary = now
        modes = list(self.codecs)
        return LocalObservation(
            backward_time=(rec.t_last or now) - (t_start or now),
            overlap_time=(rec.t_last or now) - (rec.t_first or now),
            step_time=step_time,
            exposed_comm_time=max(0.0, now - (rec.t_last or now)),
            comm_time=sum(seconds),
            bytes_sent=float(sum(rec.wire)),
            bytes_in_flight=peak_in_flight(launch, end, rec.wire),
            rel_error=rel_error,
            residual_norm=self.feedback.norm() if self.error_feedback else 0.0,
            update_error=update_error,
            sign_flips=sign_flips,
            probe_wire_bytes=self._probe[0],
            probe_seconds=self._probe[1],
            bw_probe_wire_bytes=self._bw_probe[0],
            bw_probe_seconds=self._bw_probe[1],
            bucket_wire_bytes=list(rec.wire),
            bucket_seconds=seconds,
            mode_errors=[self._mode_errors.get(m, math.nan) for m in modes],
            mode_seconds_per_byte=[self._mode_cost.get(m, math.nan) for m in modes],
            mode_update_errors=[self._shadow.errors.get(m, math.nan) for m in modes],
        )


def _error_terms(grad: Tensor, sent: Tensor) -> tuple[float, float]:
    """``(||grad - sent||^2, ||grad||^2)`` as Python floats."""
    return float(torch.linalg.vector_norm(grad - sent)) ** 2, float(torch.linalg.vector_norm(grad)) ** 2


def _cuda_times(events: list[tuple[Any, Any]]) -> tuple[list[float], list[float]]:
    """Launch and end times (seconds, relative to the first launch) from CUDA event pairs.

    On CUDA a collective's future can complete before the transfer ends, so host clocks would time the
    launch, not the transfer; events recorded on the stream time the transfer itself.
    """
    for _, end in events:
        end.synchronize()
    ref = events[0][0]
    launch = [ref.elapsed_time(s) / 1e3 for s, _ in events]
    end = [ref.elapsed_time(e) / 1e3 for _, e in events]
    return launch, end


def netsense_hook(state: NetSenseState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average one gradient bucket across ranks in the mode agreed for this step.

    1. Take the step's mode from ``state.active_decision`` (identical on every rank: it was agreed at the last
       step boundary, and is plain allreduce for the first ``warmup_steps`` steps while DDP rebuilds buckets).
    2. For a lossy mode, add the bucket's error-feedback residual, compress, and keep as the new residual what
       this rank's payload does not carry.
    3. Issue exactly one collective from the hook body - ``all_reduce`` if the payload is summable, else
       ``all_gather_into_tensor``. gloo matches collectives by issue order, and DDP calls the hook in bucket
       order on every rank, so this cannot mismatch; a second collective issued from a ``then`` callback can
       (it hung with several buckets on gloo).
    4. When it completes, aggregate into the averaged gradient, write it into the bucket and record the
       collective's timing for the link estimator.

    Register with ``ddp_model.register_comm_hook(state, netsense_hook)``; outside Lightning, call
    ``state.end_step()`` after each synchronising backward on every rank.
    """
    rec = state._record
    now = time.perf_counter()
    if rec.t_first is None:
        rec.t_first = now
        if rec.t_backward_start is None:
            rec.t_backward_start = now
    rec.t_last = now

    decision = state.active_decision
    codec = state.codecs[decision.mode]
    buffer = bucket.buffer()
    layout = state._layout(bucket, buffer)
    group = state.process_group

    params = bucket.parameters()
    if not state._shadow.ready:
        moments = state.second_moments
        state._shadow.choose(moments.params if moments is not None and moments.params else params)
    state._shadow.capture(params, bucket.gradients())
    sample = state._sample(layout, buffer)
    exact = sample.gather(buffer)  # this rank's gradient at the sampled coordinates, before any compression

    t0 = time.perf_counter()
    if codec.lossy:
        old = state.feedback.residual(layout.index)
        # no residual from a wrapper's first step: DDP rebuilds its buckets after it (see `warmup_steps`)
        if state.error_feedback and state.step > state._plain_until - state.warmup_steps:
            compensated = exact if old is None or old.shape != buffer.shape else exact + sample.gather(old)
            if state.feedback.residual(layout.index) is None:
                rec.cold = True
            grad = state.feedback.compensate(layout.index, buffer)
            payload, ctx = codec.compress(grad, layout, **decision.options)
            err2, ref2 = state.feedback.settle(
                layout.index,
                grad,
                lambda c: codec.subtract_sent_(c, payload, ctx, layout),
                lambda r2: codec.residual_sq_norm(r2, payload, ctx, layout),
            )
            new = state.feedback.residual(layout.index)
            # what this rank sent = compensated gradient - new residual (none kept: a non-finite step)
            sent = compensated - sample.gather(new) if new is not None else None
            target = compensated
        else:
            payload, ctx = codec.compress(buffer, layout, **decision.options)
            own = codec.decompress(payload, ctx, layout)
            err2, ref2 = _error_terms(buffer, own)
            sent = sample.gather(own)
            target = exact
        if math.isfinite(err2) and math.isfinite(ref2):
            rec.err2 += err2
            rec.ref2 += ref2
        if sent is not None:
            terms = sample.step(exact, sent, sample.preconditioner(params, state.second_moments), target)
            rec.update_terms = terms if rec.update_terms is None else rec.update_terms + terms
    else:
        payload, ctx = codec.compress(buffer, layout, **decision.options)
    payload = payload.contiguous()
    rec.codec_seconds.append(time.perf_counter() - t0)

    nbytes = payload.numel() * payload.element_size()
    world = layout.world_size
    if codec.summable:
        collected = payload
    else:
        collected = payload.new_empty(world * payload.numel())
    slot = len(rec.launch)
    rec.index.append(layout.index)
    rec.numel.append(layout.numel)
    rec.wire.append(wire_bytes(nbytes, world, codec.summable))
    rec.end.append(math.nan)
    cuda_start = None
    if buffer.is_cuda:
        cuda_start = torch.cuda.Event(enable_timing=True)
        cuda_start.record()
        rec.cuda_events.append((cuda_start, None))
    rec.launch.append(time.perf_counter())
    if codec.summable:
        work = dist.all_reduce(payload, group=group, async_op=True)
    else:
        work = _all_gather(collected, payload, group=group, async_op=True)
    if (
        not state._calibrated
        and state.step >= state._plain_until - 1
        and bucket.is_last()
        and nbytes >= state.estimator.vouch_fraction * layout.numel * 4
    ):
        # Lossy modes may start next step: price every candidate on this step's layouts, so that an untried codec
        # does not look free - while the step's last payload is in flight, when it is large enough to take a
        # while (else at the boundary: on the same core the calibration delays the collective's completion, and
        # PowerSGD's first kilobytes then read as a 3 Mbit/s link). Measured at 20 Mbit/s on the digits MLP: the
        # calibration took 0.19 s, at the boundary it added that to the int8 first step's 1.7 s; its collective
        # takes 1.4 s with the CPU idle. After one warm-up step the layouts are the first step's provisional
        # buckets (DDP rebuilds them in the next forward): the same gradients grouped otherwise.
        state.calibrate([state._layouts[i] for i in rec.index if i in state._layouts])

    def finish(fut: torch.futures.Future) -> Tensor:
        fut.value()  # re-raises a failed collective so that DDP reports it instead of averaging garbage
        rec.end[slot] = time.perf_counter()
        if cuda_start is not None:
            cuda_end = torch.cuda.Event(enable_timing=True)
            cuda_end.record()
            rec.cuda_events[slot] = (cuda_start, cuda_end)
        t1 = time.perf_counter()
        codec.aggregate_into(collected, ctx, layout, buffer)
        rec.codec_seconds.append(time.perf_counter() - t1)
        return buffer

    return work.get_future().then(finish)
