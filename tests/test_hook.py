"""netsense_hook and NetSenseState on real 2-rank gloo groups: averaging, precision, agreement, records."""

import itertools
import math
import pickle
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_netsense import Decision, FixedPolicy, NetSensePolicy, Policy
from lightning_netsense.adaptive import PolicyTuning
from lightning_netsense.hook import NetSenseState, netsense_hook
from lightning_netsense.ledger import CodecLedger
from lightning_netsense.observation import Measurements
from lightning_netsense.probes import ProbeScheduler, probe_cap


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)


def _hook_vs_exact_mean(mode: str, steps: int = 4) -> dict:
    """Gradients through the hook vs the exact mean of every rank's local gradients, step by step."""
    model = _model()
    reference = _model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.005)
    state = NetSenseState(policy=FixedPolicy(mode=mode))
    ddp.register_comm_hook(state, netsense_hook)
    errors, buckets = [], 0
    for step in range(steps):
        x, y = _batch(dist.get_rank(), step)
        ddp.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        buckets = state.recorder.collectives
        used = state.active_decision.mode
        state.end_step()
        # exact mean: local gradients of an identical replica, averaged in float64
        reference.load_state_dict(model.state_dict())
        reference.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        exact = torch.cat([p.grad.flatten() for p in reference.parameters()]).double()
        dist.all_reduce(exact)
        exact /= dist.get_world_size()
        got = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
        errors.append((used, float((got - exact).norm() / exact.norm())))
        with torch.no_grad():  # a plain SGD step keeps both replicas moving the same way
            for p in model.parameters():
                p -= 0.1 * p.grad
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return {"errors": errors, "buckets": buckets, "grads": grads, "comm_hook": ddp._get_ddp_logging_data()["comm_hook"]}


@pytest.mark.slow
def test_none_fp16_bf16_average_within_precision(dist_pool):
    bounds = {"none": 1e-6, "fp16": 1e-3, "bf16": 8e-3}
    for mode, bound in bounds.items():
        out = dist_pool.run(_hook_vs_exact_mean, mode)
        for rank in range(2):
            assert out[rank]["buckets"] >= 2, "the test needs several buckets"
            assert out[rank]["comm_hook"] == "netsense_hook"
            for step, (used, err) in enumerate(out[rank]["errors"]):
                assert used == mode  # stateless: from the first step (with no residual: provisional buckets)
                assert err <= bound, f"{mode} step {step}: relative error {err:.2e} > {bound:.0e}"
        # every rank applies the same averaged gradient
        torch.testing.assert_close(out[0]["grads"], out[1]["grads"], rtol=0, atol=0)
    # fp16 really compresses: its error is not zero once warm-up is over
    fp16 = dist_pool.run(_hook_vs_exact_mean, "fp16")
    assert fp16[0]["errors"][-1][1] > 0


class _ThresholdPolicy(Policy):
    """Compress when the agreed backward time is long; counts its calls (state_dict)."""

    def __init__(self) -> None:
        self.calls = 0

    def decide(self, observation):
        self.calls += 1
        return Decision("fp16" if observation.backward_time > 0.5 else "none")

    def state_dict(self):
        return {"calls": self.calls}


def _agree_on_injected(mismatch: bool = False) -> dict:
    rank = dist.get_rank()
    state = NetSenseState(policy=_ThresholdPolicy())
    state.step = state.warmup_steps  # past warm-up: the policy is consulted
    # the ranks saw different things: only rank 0 had a slow backward pass, and they timed the same
    # two collectives differently (rank 1 reached them early and also timed its wait)
    extra = mismatch and rank == 1
    local = Measurements(
        backward_time=1.0 if rank == 0 else 0.1,
        overlap_time=0.2 + rank,
        step_time=2.0 - rank,
        bytes_sent=1e6,
        rel_error=0.1 * (rank + 1),
        bucket_wire_bytes=(1e6, 2e5) + ((1.0,) if extra else ()),
        bucket_seconds=((0.1, 0.03) if rank == 0 else (0.5, 0.2)) + ((0.1,) if extra else ()),
        mode_errors=(math.nan,) * len(state.codecs),
        mode_seconds_per_byte=(1e-9 * (rank + 1),) * len(state.codecs),
    )
    decision = state.decide_from(local)
    obs = state.last_observation
    return {
        "decision": decision,
        "observation": repr(obs),
        "estimator": state.estimator.state_dict(),
        "backward": obs.backward_time,
        "rel_error": obs.rel_error,
    }


@pytest.mark.slow
def test_ranks_with_different_measurements_decide_the_same(dist_pool):
    out = dist_pool.run(_agree_on_injected)
    assert out[0]["decision"] == out[1]["decision"] == Decision("fp16")  # rank 1 alone would have said "none"
    assert out[0]["observation"] == out[1]["observation"]
    assert out[0]["estimator"] == out[1]["estimator"]
    assert out[0]["backward"] == 1.0  # the slowest rank sets the pace
    assert out[0]["rel_error"] == pytest.approx(0.15)  # errors are the mean over ranks


@pytest.mark.slow
def test_ranks_with_different_layouts_fail_clearly(dist_pool):
    with pytest.raises(AssertionError, match="disagree on the observation layout"):
        dist_pool.run(_agree_on_injected, True)


def _pickle_in_worker() -> dict:
    state = NetSenseState(policy=FixedPolicy(mode="fp16"), process_group=dist.group.WORLD)
    clone = pickle.loads(pickle.dumps(state))
    return {"pg": clone.process_group, "world": clone.world_size}


@pytest.mark.slow
def test_state_drops_process_group_when_pickled(dist_pool):
    out = dist_pool.run(_pickle_in_worker)
    assert out[0] == {"pg": None, "world": 2}


def _inf_on_one_rank(mode: str) -> dict:
    """An inf gradient on rank 0 only (an AMP overflow) must reach every rank, and not poison the residual."""
    model = nn.Linear(16, 4)
    ddp = nn.parallel.DistributedDataParallel(model)
    state = NetSenseState(policy=FixedPolicy(mode=mode))
    ddp.register_comm_hook(state, netsense_hook)
    finite = []
    for step in range(4):
        x = torch.randn(8, 16)
        if step == 3 and dist.get_rank() == 0:
            x[0, 0] = math.inf
        ddp.zero_grad()
        ddp(x).sum().backward()
        state.end_step()
        finite.append(bool(torch.isfinite(model.weight.grad).all()))
    return {"finite": finite, "residual_finite": math.isfinite(state.feedback.norm())}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_non_finite_gradient_reaches_every_rank(dist_pool, mode):
    out = dist_pool.run(_inf_on_one_rank, mode)
    for rank in range(2):
        assert out[rank]["finite"] == [True, True, True, False]
        assert out[rank]["residual_finite"]


class _LinkAware(FixedPolicy):
    uses_link_estimate = True  # as an adaptive policy: its decisions would depend on the estimate


def _probing(probe_every: int, link_aware: bool = True, mode: str = "topk") -> dict:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.005)
    options = {"density": 0.01} if mode == "topk" else {}
    policy = _LinkAware(mode=mode, **options) if link_aware else FixedPolicy(mode=mode, **options)
    # probe_fraction=1: the amortised schedule (probe time vs step time) must not make the probe count depend on
    # how loaded the machine is (tested on its own in test_sensing)
    state = NetSenseState(policy=policy, probe_every=probe_every, probe_fraction=1.0)
    ddp.register_comm_hook(state, netsense_hook)
    sizes, samples = [], []
    for step in range(10):
        x, y = _batch(dist.get_rank(), step)
        ddp.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        state.end_step()
        sizes.append(state.probes.size)
        samples.append(state.probes.last[0])
    return {"sizes": sizes, "wire": samples, "estimator": state.estimator.state_dict(),
            "checkpoint": state.state_dict()}


@pytest.mark.slow
def test_bandwidth_probe_runs_while_compressed_with_agreed_sizes(dist_pool):
    out = dist_pool.run(_probing, 2)
    assert out[0]["sizes"] == out[1]["sizes"]  # sized from agreed values only: a mismatch would hang gloo
    assert out[0]["estimator"] == out[1]["estimator"]
    probed = [w > 0 for w in out[0]["wire"]]
    # the first boundary before a policy decision probes (the one warm-up step's top-k kilobytes do not measure
    # the link); then the schedule follows the agreed probe durations (amortised budget, and a back-off while
    # they answer as believed, see test_sensing), identically on both ranks
    assert probed[0] and sum(probed) >= 2, probed
    assert [w > 0 for w in out[1]["wire"]] == probed
    never = dist_pool.run(_probing, 0)
    assert not any(w > 0 for w in never[0]["wire"])
    # a fixed policy ignores the estimate: it must not pay for probes (static compressors did, in the benchmark)
    fixed = dist_pool.run(_probing, 2, False)
    assert not any(w > 0 for w in fixed[0]["wire"])
    # bf16 buckets are half the dense ones: the training traffic measures the link itself, no probe is needed
    half = dist_pool.run(_probing, 2, True, "bf16")
    assert not any(w > 0 for w in half[0]["wire"])


_PAUSE = 0.25


class _SlowLedger(CodecLedger):
    """The calibration takes ``_PAUSE`` seconds more."""

    __slots__ = ()

    def calibrate(self, *args, **kwargs):
        time.sleep(_PAUSE)
        return super().calibrate(*args, **kwargs)


class _SlowProbes(ProbeScheduler):
    """Every bandwidth probe takes ``_PAUSE`` seconds more (as on a slow link)."""

    __slots__ = ()

    def run(self, *args, **kwargs):
        super().run(*args, **kwargs)
        if self.last[1] > 0:
            time.sleep(_PAUSE)
            self.last = (self.last[0], self.last[1] + _PAUSE)


def _slow_boundaries(mode: str = "topk", mark_steps: bool = True) -> dict:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.005)
    options = {"density": 0.01} if mode == "topk" else {}
    state = NetSenseState(policy=_LinkAware(mode=mode, **options), probe_every=2, probe_fraction=1.0)
    state.ledger, state.probes = _SlowLedger(), _SlowProbes(2, 1.0)
    ddp.register_comm_hook(state, netsense_hook)
    step_times, probed, calibrated = [], [], []
    for step in range(6):
        x, y = _batch(dist.get_rank(), step)
        ddp.zero_grad()
        if mark_steps:
            state.begin_step()
        was_calibrated = state.ledger.calibrated
        nn.functional.mse_loss(ddp(x), y).backward()
        state.end_step()
        calibrated.append(state.ledger.calibrated and not was_calibrated)
        step_times.append(state.last_observation.step_time)
        probed.append(state.probes.last[1] > 0)
    return {"step_times": step_times, "probed": probed, "calibrated": calibrated}


@pytest.mark.slow
def test_a_boundarys_calibration_and_probe_are_not_counted_in_the_next_step(dist_pool):
    for mark_steps in (True, False):
        for out in dist_pool.run(_slow_boundaries, "topk", mark_steps):
            # calibrated once, at the first boundary (the step before lossy modes may start), on one bucket
            assert out["calibrated"] == [True] + [False] * 5, out
            # the probe runs at the boundary before the first policy decision
            assert out["probed"][0], out
            # a step after a probing or calibrating boundary is timed without it: a probe inflated the step time
            # that amortises it, and the policy priced every mode on such steps
            assert all(t < _PAUSE for t in out["step_times"]), out


def _first_steps(pause: float = 0.0, steps: int = 3, probe_every: int = 2, first_mode: str = "auto") -> dict:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.005)
    state = NetSenseState(policy=NetSensePolicy(tuning=PolicyTuning(first_mode=first_mode)), probe_every=probe_every)
    ddp.register_comm_hook(state, netsense_hook)
    used, samples, residuals, step_times, vouched, probes = [], [], [], [], [], []
    for step in range(steps):
        x, y = _batch(dist.get_rank(), step)
        ddp.zero_grad()
        state.begin_step()
        loss = nn.functional.mse_loss(ddp(x), y)
        time.sleep(pause)  # a slow forward
        state.begin_backward()
        loss.backward()
        used.append(state.active_decision.mode)
        state.end_step()
        samples.append(state.last_observation.link.samples)
        step_times.append(state.last_observation.step_time)
        residuals.append(len(state.feedback))
        vouched.append(state.last_observation.link.vouched)
        probes.append(state.probes.last[0])
    return {"used": used, "samples": samples, "residuals": residuals, "bytes": state.last_observation.bytes_sent,
            "errors": dict(state.ledger.errors), "step_times": step_times, "vouched": vouched, "probes": probes,
            "update_errors": {m: p.update_error for m, p in state.last_observation.codecs.items()}}


@pytest.mark.slow
def test_netsense_first_step_sends_every_coordinate_and_its_payloads_measure_the_link(dist_pool):
    """The first step sets the optimizer's first statistics: int8 (2 ranks), which rounds every coordinate and keeps
    its sign, never a projection or a selection; a quarter of the bytes, enough to measure the link with."""
    for out in dist_pool.run(_first_steps, 0.0, 12):
        # without a residual: DDP's first-step buckets are provisional (rebuilt after step 0)
        assert out["used"][0] == "int8" and out["residuals"][0] == 0
        assert 0 < out["errors"]["int8"] < 0.05  # lossy, within int8's precision
        # the first step's collectives also pay the process group's set-up: they measure the link provisionally,
        # the policy holds int8 for a second step, whose payloads vouch for the link (no probes needed) ...
        assert out["samples"][0] > 0 and not out["vouched"][0] and out["vouched"][1]
        assert out["probes"][:2] == [0.0, 0.0]
        assert out["used"][1] == "int8", out["used"]
        # ... and on loopback the policy then runs plain DDP (where a loaded machine stalls collectives, a rounding
        # codec for a while)
        assert out["used"][-1] in ("none", "fp16", "bf16", "int8"), out["used"]
        # every lossy candidate's update error is measured, though none of them runs after the first step
        assert all(e is not None and e >= 0 for m, e in out["update_errors"].items() if m != "none"), out
        assert out["update_errors"]["int8"] < 0.2 < out["update_errors"]["topk"]
    # without probes too
    for out in dist_pool.run(_first_steps, 0.0, 3, 0):
        assert out["used"][:2] == ["int8", "int8"] and out["vouched"][1] and out["probes"] == [0.0] * 3
    # a first step in PowerSGD (a few kilobytes, `first_mode="powersgd"`) cannot measure the link: probes do, and
    # until they vouch for it the policy holds PowerSGD
    for out in dist_pool.run(_first_steps, 0.0, 12, 2, "powersgd"):
        assert out["used"][0] == "powersgd" and not out["vouched"][0] and out["probes"][0] > 0
        assert out["vouched"][1] and out["used"][1] == "powersgd"
        assert out["used"][-1] != "powersgd", out["used"]
    # the first step (no boundary before it) is timed from `begin_step`, its forward included
    for out in dist_pool.run(_first_steps, 0.2):
        assert out["step_times"][0] >= 0.2


def _ladder() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 8))
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=4)
    state = NetSenseState(policy=NetSensePolicy(tuning=PolicyTuning(first_mode="powersgd")))
    ddp.register_comm_hook(state, netsense_hook)
    sizes, vouched, caps = [], [], []
    for step in range(5):
        g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        ddp.zero_grad()
        state.begin_step()
        loss = nn.functional.mse_loss(ddp(x), y)
        state.begin_backward()
        loss.backward()
        state.end_step()
        sizes.append(state.probes.size if state.probes.last[1] > 0 else 0)
        vouched.append(state.last_observation.link.vouched)
        caps.append(probe_cap(max(state.last_observation.bucket_bytes), state.estimator.vouch_fraction))
    return {"sizes": sizes, "vouched": vouched, "caps": caps}


@pytest.mark.slow
def test_a_link_never_vouched_for_is_measured_by_a_ladder_of_probes(dist_pool):
    """After a PowerSGD first step (``first_mode="powersgd"``) only probes can vouch for the link: one at every boundary, four times the last
    (the vouching size itself once within a factor two of it), until one vouches; then the usual schedule."""
    out = dist_pool.run(_ladder)
    assert out[0]["sizes"] == out[1]["sizes"]  # agreed sizes: a mismatch would hang gloo
    sizes, vouched, cap = out[0]["sizes"], out[0]["vouched"], out[0]["caps"][-1]
    assert cap > 4 * 262144  # the 1024 x 1024 layer's bucket
    assert cap in sizes, sizes
    last = sizes.index(cap)  # the vouching size is reached ...
    # ... by a probe at every boundary from the first, each four times the last or, answering slower than the
    # (unvouched) estimate, the vouching size at once
    assert sizes[0] == 65536 and all(b in (4 * a, cap) for a, b in itertools.pairwise(sizes[: last + 1])), sizes
    assert not any(vouched[: last + 1]) and vouched[last + 1], (sizes, vouched)  # reported at the next boundary
    assert sizes[last + 1] == 0  # vouched for: no follow-up at once


class _FirstPowerSGD(FixedPolicy):
    def first_decision(self, allowed, world_size):
        return self.decision  # PowerSGD keeps per-bucket state: not accepted before the buckets are final


def test_a_first_decision_with_per_bucket_state_fails_clearly():
    with pytest.raises(ValueError, match=r"first_decision chose powersgd.*accepted in the warm-up") as err:
        NetSenseState(policy=_FirstPowerSGD(mode="powersgd"))
    assert "'int8'" not in str(err.value)  # only the candidates that may run: plain DDP here


class _WarmupPowerSGD(FixedPolicy):
    def warmup_decision(self, observation, allowed):
        return self.decision  # PowerSGD keeps per-bucket state: not accepted before the buckets are final


def _bad_warmup() -> str:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.005)
    state = NetSenseState(policy=_WarmupPowerSGD(mode="powersgd"), warmup_steps=2)  # a second warm-up step
    ddp.register_comm_hook(state, netsense_hook)
    x, y = _batch(dist.get_rank(), 0)
    nn.functional.mse_loss(ddp(x), y).backward()
    try:
        state.end_step()
    except ValueError as err:
        return str(err)
    return "no error"


@pytest.mark.slow
def test_a_warmup_decision_with_per_bucket_state_fails_clearly(dist_pool):
    for message in dist_pool.run(_bad_warmup):
        assert "warmup_decision" in message and "powersgd" in message and "fp16" not in message


def _residual_across_a_plain_step() -> dict:
    """int8 (error feedback keeps a residual), then plain DDP: the residual is folded into that step's gradient."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.005)

    class _Int8ThenPlain(FixedPolicy):
        def decide(self, observation):
            return Decision("int8") if observation.step < 3 else Decision("none")

    state = NetSenseState(policy=_Int8ThenPlain(mode="int8"))
    ddp.register_comm_hook(state, netsense_hook)
    residuals, sent, grads = [], [], []
    for step in range(6):
        x, y = _batch(dist.get_rank(), step)
        ddp.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        state.end_step()
        residuals.append(len(state.feedback))
        sent.append(float(sum(p.grad.double().sum() for p in model.parameters())))
        # the local gradients of this step (what plain DDP would average)
        ref = _model()
        ref.load_state_dict(model.state_dict())
        nn.functional.mse_loss(ref(x), y).backward()
        local = torch.tensor(float(sum(p.grad.double().sum() for p in ref.parameters())), dtype=torch.float64)
        grads.append(local)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
    total = torch.stack(grads)
    dist.all_reduce(total)
    return {"residuals": residuals, "sent": sent, "exact": (total / dist.get_world_size()).tolist(),
            "modes": dict(state.mode_steps)}


@pytest.mark.slow
def test_a_residual_is_delivered_by_the_next_plain_step(dist_pool):
    """Error feedback owes what lossy steps left out: a plain step sends it with its gradient, and keeps none."""
    for out in dist_pool.run(_residual_across_a_plain_step):
        assert out["modes"] == {"int8": 4, "none": 2}
        assert out["residuals"][1:4] == [out["residuals"][1]] * 3 and out["residuals"][1] > 0
        assert out["residuals"][4:] == [0, 0]
        # from the first step with error feedback (the first runs without: provisional buckets), what was sent adds
        # up to the exact gradients: nothing is lost across the switch
        assert sum(out["sent"][1:]) == pytest.approx(sum(out["exact"][1:]), rel=1e-5, abs=1e-7)
        assert sum(out["sent"][1:4]) != pytest.approx(sum(out["exact"][1:4]), rel=1e-5, abs=1e-7)  # owed, then paid
