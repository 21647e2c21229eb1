"""The step boundary's agreement: packing, the conservative combination, fixed sizes, mismatched ranks."""

import math

import pytest
import torch

from lightning_netsense.agreement import AGREED_VALUES, SAMPLE_SLOTS, combine, finish, pack
from lightning_netsense.observation import Measurements


def _local(**kw) -> Measurements:
    base = dict(
        backward_time=0.2,
        bytes_sent=1e6,
        bucket_wire_bytes=(1e6, 5e5),
        bucket_seconds=(0.1, 0.06),
        mode_errors=(0.0, math.nan, 0.01),
        mode_seconds_per_byte=(1e-9, math.nan, 2e-9),
        mode_update_errors=(0.0, math.nan, 0.3),
    )
    base.update(kw)
    return Measurements(**base)


def test_one_rank_round_trips():
    local = _local(overlap_time=0.05, rel_error=0.1, residual_norm=2.0, update_error=0.4, sign_flips=0.01)
    out = combine([local])
    for name in ("backward_time", "overlap_time", "bytes_sent", "rel_error", "residual_norm"):
        assert getattr(out, name) == pytest.approx(getattr(local, name)), name
    assert out.bucket_seconds == (0.1, 0.06) and out.bucket_wire_bytes == (1e6, 5e5)
    assert out.mode_errors[0] == 0.0 and math.isnan(out.mode_errors[1]) and out.mode_errors[2] == 0.01
    assert math.isnan(out.mode_seconds_per_byte[1]) and out.mode_update_errors[2] == pytest.approx(0.3)
    assert out.update_error == pytest.approx(0.4) and out.sign_flips == pytest.approx(0.01)


def test_the_reduced_vectors_have_one_size_whatever_the_model():
    """Their size (and the work on them) depends neither on the world size nor on the number of buckets."""
    for buckets in (1, 10, 1000):
        high, total = pack(_local(bucket_wire_bytes=(1.0,) * buckets, bucket_seconds=(1.0,) * buckets))
        assert (high.numel(), total.numel()) == AGREED_VALUES


def test_many_buckets_merge_into_mean_collectives_exactly():
    alpha, bw = 1e-3, 1e8
    nbytes = tuple(1e4 * (i + 1) for i in range(200))
    seconds = tuple(alpha + b / bw for b in nbytes)
    out = combine([_local(bucket_wire_bytes=nbytes, bucket_seconds=seconds)])
    assert len(out.bucket_wire_bytes) == SAMPLE_SLOTS
    # a merged slot is the group's mean collective, which still lies on t = alpha + b / B
    for b, s in zip(out.bucket_wire_bytes, out.bucket_seconds):
        assert s == pytest.approx(alpha + b / bw)


def test_mismatched_ranks_raise_instead_of_hanging():
    with pytest.raises(RuntimeError, match="disagree"):
        combine([_local(), _local(bucket_wire_bytes=(1.0,), bucket_seconds=(1.0,))])
    with pytest.raises(RuntimeError, match="disagree"):
        combine([_local(), _local(mode_errors=(0.0,), mode_seconds_per_byte=(0.0,), mode_update_errors=(0.0,))])


def test_combine_is_conservative_and_fair():
    a = _local(backward_time=0.1, overlap_time=0.3, bucket_seconds=(0.1, 0.5), rel_error=0.2, bytes_in_flight=10,
               residual_norm=3.0, mode_seconds_per_byte=(1e-9, math.nan, 5e-9))
    b = _local(backward_time=0.3, overlap_time=0.2, bucket_seconds=(0.4, 0.05), rel_error=0.4, bytes_in_flight=30,
               residual_norm=4.0, mode_errors=(0.0, 0.5, math.nan))
    agreed = combine([a, b])
    assert agreed.backward_time == 0.3  # the slowest rank sets the pace
    assert agreed.overlap_time == 0.2  # the least overlap
    assert agreed.bucket_seconds == (0.1, 0.05)  # the last rank to arrive timed the transfer alone
    assert agreed.rel_error == pytest.approx(0.3)  # mean over ranks
    assert agreed.residual_norm == pytest.approx(math.sqrt((9 + 16) / 2))  # root mean square
    assert agreed.bytes_in_flight == 30
    assert agreed.mode_errors[1] == 0.5 and agreed.mode_errors[2] == 0.01  # the mean of those who measured
    assert agreed.mode_seconds_per_byte[2] == 5e-9  # the slowest codec
    assert combine([b, a]) == agreed  # order of ranks does not matter


def test_finish_reads_reduced_vectors():
    a, b = pack(_local(backward_time=0.1)), pack(_local(backward_time=0.5))
    out = finish(torch.maximum(a[0], b[0]), a[1] + b[1])
    assert out.backward_time == 0.5
