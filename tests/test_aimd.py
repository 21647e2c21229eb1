"""Pure tests of AIMDPolicy, the prototype's rule: hand-made observations in, top-k densities out."""

import io

import pytest
import torch

from lightning_netsense.aimd import AIMDPolicy
from lightning_netsense.observation import Decision, LinkEstimate, Observation

BDP_LINK = LinkEstimate(alpha=1e-3, bandwidth=1e7, max_bandwidth=1e7, min_rtt=1e-3, samples=5)  # BDP 10 kB


def observe(in_flight, link=BDP_LINK):
    return Observation(
        step=3,
        world_size=2,
        decision=Decision("topk", {"density": 0.01}),
        bucket_bytes=(4_000_000,),
        backward_time=0.05,
        overlap_time=0.04,
        step_time=0.1,
        comm_time=0.01,
        exposed_comm_time=0.0,
        bytes_sent=in_flight,
        dense_bytes=4_000_000.0,
        bytes_in_flight=in_flight,
        rel_error=0.9,
        residual_norm=1.0,
        link=link,
    )


CONGESTED = observe(2 * BDP_LINK.bdp)
CLEAR = observe(0.5 * BDP_LINK.bdp)


def test_multiplicative_decrease_above_threshold_times_bdp():
    policy = AIMDPolicy(initial_density=0.2)
    decision = policy.decide(CONGESTED)
    assert decision == Decision("topk", {"density": pytest.approx(0.2 * 0.95)})
    assert policy.decide(CONGESTED).options["density"] == pytest.approx(0.2 * 0.95**2)


def test_additive_increase_at_or_below_threshold():
    policy = AIMDPolicy(initial_density=0.2)
    assert policy.decide(CLEAR).options["density"] == pytest.approx(0.201)
    # exactly 0.9 x BDP does not exceed it
    assert policy.decide(observe(0.9 * BDP_LINK.bdp)).options["density"] == pytest.approx(0.202)
    assert policy.decide(observe(0.91 * BDP_LINK.bdp)).options["density"] == pytest.approx(0.202 * 0.95)


def test_floor_and_cap():
    policy = AIMDPolicy(initial_density=0.0012)
    densities = [policy.decide(CONGESTED).options["density"] for _ in range(10)]
    assert densities[0] == pytest.approx(0.0012 * 0.95)
    assert min(densities) == densities[-1] == 0.001
    policy = AIMDPolicy(initial_density=0.9995)
    assert [policy.decide(CLEAR).options["density"] for _ in range(2)] == [1.0, 1.0]


def test_custom_rule_constants():
    policy = AIMDPolicy(initial_density=0.5, decrease=0.5, increase=0.1, floor=0.2, threshold=3.0)
    assert policy.decide(CONGESTED).options["density"] == pytest.approx(0.6)  # 2 x BDP is under 3 x BDP
    assert policy.decide(observe(4 * BDP_LINK.bdp)).options["density"] == pytest.approx(0.3)
    assert policy.decide(observe(4 * BDP_LINK.bdp)).options["density"] == pytest.approx(0.2)


def test_density_held_until_the_link_is_measured():
    policy = AIMDPolicy(initial_density=0.05)
    assert policy.decide(observe(1e9, link=LinkEstimate())).options["density"] == 0.05


def test_candidates_and_state_dict():
    policy = AIMDPolicy(initial_density=0.05)
    policy.decide(CONGESTED)
    assert policy.candidates() == (Decision("topk", {"density": policy.density}),)
    buf = io.BytesIO()
    torch.save(policy.state_dict(), buf)
    buf.seek(0)
    other = AIMDPolicy()
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.density == pytest.approx(0.05 * 0.95)
    assert other.decide(CLEAR) == policy.decide(CLEAR)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"initial_density": 0.0}, "initial_density"),
        ({"initial_density": 1.5}, "initial_density"),
        ({"initial_density": 0.01, "floor": 0.02}, "initial_density"),
        ({"decrease": 1.0}, "decrease"),
        ({"decrease": 0.0}, "decrease"),
        ({"increase": -0.1}, "increase"),
        ({"floor": 0.0}, "floor"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": "0.9"}, "threshold"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        AIMDPolicy(**kwargs)
