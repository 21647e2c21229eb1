"""Pure tests of the shared observation types: cost formulas, decisions, link estimates."""

import dataclasses
import pickle

import pytest

from lightning_netsense.observation import (
    Decision,
    LinkEstimate,
    Measurements,
    Observation,
    allgather_wire_bytes,
    allreduce_wire_bytes,
    wire_bytes,
)


def test_wire_byte_formulas():
    assert allreduce_wire_bytes(100, 2) == 100
    assert allreduce_wire_bytes(100, 64) == pytest.approx(2 * 63 / 64 * 100)
    assert allgather_wire_bytes(100, 64) == 6300
    assert wire_bytes(100, 1, True) == 0 and wire_bytes(100, 1, False) == 0
    # at large N a gathered payload must be ~N/2 times smaller to cost the same as a summed one
    assert wire_bytes(100, 64, False) > 30 * wire_bytes(100, 64, True)


def test_decision_is_immutable_hashable_and_pickles():
    d = Decision("topk", {"density": 0.01})
    assert hash(d) == hash(Decision("topk", {"density": 0.01})) and len({d, Decision("topk", {"density": 0.01})}) == 1
    assert {Decision("fp16"): 1}[Decision("fp16")] == 1  # usable as a key
    assert d.key == "topk(density=0.01)"
    assert pickle.loads(pickle.dumps(d)) == d
    assert Decision.from_dict(d.to_dict()) == d
    with pytest.raises(TypeError):
        d.options["density"] = 0.5
    with pytest.raises(ValueError, match="mode"):
        Decision("")


def test_link_estimate_time_and_bdp():
    link = LinkEstimate(alpha=1e-3, bandwidth=1e6, max_bandwidth=2e6, min_rtt=0.01, samples=3)
    assert link.time(1e6) == pytest.approx(1.001)
    assert link.time(0) == 0
    assert link.bdp == pytest.approx(2e4)
    assert LinkEstimate().time(1e9) == 0  # nothing measured: no cost assumed


def test_an_observation_is_the_agreed_measurements_with_their_context():
    measured = Measurements(backward_time=0.2, bytes_sent=5.0)
    obs = Observation(
        **{f.name: getattr(measured, f.name) for f in dataclasses.fields(Measurements)},
        step=3, world_size=2, decision=Decision("fp16"), bucket_bytes=(8,), dense_bytes=10.0,
    )
    assert isinstance(obs, Measurements) and obs.backward_time == 0.2
    assert obs.compression_ratio == 2.0
    assert Observation(step=0, world_size=1, decision=Decision(), bucket_bytes=()).compression_ratio == 1.0
