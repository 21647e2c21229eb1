"""Pure tests of the shared observation: packing, cross-rank combination, cost formulas, decisions."""

import math
import pickle

import pytest
import torch

from lightning_netsense.observation import (
    PACKED_SIZE,
    SAMPLE_SLOTS,
    Decision,
    LinkEstimate,
    LocalObservation,
    allgather_wire_bytes,
    allreduce_wire_bytes,
    combine_locals,
    pack_local,
    unpack_locals,
    wire_bytes,
)


def _local(**kw) -> LocalObservation:
    base = dict(
        backward_time=0.2,
        bytes_sent=1e6,
        bucket_wire_bytes=[1e6, 5e5],
        bucket_seconds=[0.1, 0.06],
        mode_errors=[0.0, math.nan, 0.01],
        mode_seconds_per_byte=[1e-9, math.nan, 2e-9],
    )
    base.update(kw)
    return LocalObservation(**base)


def test_pack_unpack_roundtrip_has_fixed_size():
    a, b = _local(), _local(backward_time=0.5, bucket_seconds=[0.2, 0.01])
    packed = torch.cat([pack_local(a), pack_local(b)])
    assert packed.numel() == 2 * PACKED_SIZE
    ra, rb = unpack_locals(packed, 2)
    assert ra.backward_time == 0.2 and rb.backward_time == 0.5
    assert ra.bucket_seconds == [0.1, 0.06] and rb.bucket_seconds == [0.2, 0.01]
    assert math.isnan(ra.mode_errors[1]) and ra.mode_errors[2] == 0.01


def test_many_buckets_merge_into_mean_collectives_exactly():
    alpha, bw = 1e-3, 1e8
    nbytes = [1e4 * (i + 1) for i in range(200)]
    seconds = [alpha + b / bw for b in nbytes]
    (out,) = unpack_locals(pack_local(_local(bucket_wire_bytes=nbytes, bucket_seconds=seconds)), 1)
    assert len(out.bucket_wire_bytes) == SAMPLE_SLOTS
    # a merged slot is the group's mean collective, which still lies on t = alpha + b / B
    for b, s in zip(out.bucket_wire_bytes, out.bucket_seconds):
        assert s == pytest.approx(alpha + b / bw)


def test_mismatched_ranks_raise_instead_of_hanging():
    packed = torch.cat([pack_local(_local()), pack_local(_local(bucket_wire_bytes=[1.0], bucket_seconds=[1.0]))])
    with pytest.raises(RuntimeError, match="disagree"):
        unpack_locals(packed, 2)


def test_combine_is_conservative_and_fair():
    a = _local(backward_time=0.1, bucket_seconds=[0.1, 0.5], rel_error=0.2, bytes_in_flight=10)
    b = _local(backward_time=0.3, bucket_seconds=[0.4, 0.05], rel_error=0.4, bytes_in_flight=30)
    agreed = combine_locals([a, b])
    assert agreed.backward_time == 0.3  # the slowest rank sets the pace
    assert agreed.bucket_seconds == (0.1, 0.05)  # the last rank to arrive timed the transfer alone
    assert agreed.rel_error == pytest.approx(0.3)  # mean over ranks
    assert agreed.bytes_in_flight == 30
    assert combine_locals([b, a]) == agreed  # order of ranks does not matter


def test_wire_byte_formulas():
    assert allreduce_wire_bytes(100, 2) == 100
    assert allreduce_wire_bytes(100, 64) == pytest.approx(2 * 63 / 64 * 100)
    assert allgather_wire_bytes(100, 64) == 6300
    assert wire_bytes(100, 1, True) == 0 and wire_bytes(100, 1, False) == 0
    # at large N a gathered payload must be ~N/2 times smaller to cost the same as a summed one
    assert wire_bytes(100, 64, False) > 30 * wire_bytes(100, 64, True)


def test_decision_is_immutable_hashable_and_pickles():
    d = Decision("topk", {"density": 0.01})
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
