"""Pure tests of the link estimator: numbers in, estimates out (no processes, no clocks)."""

import io
import math
import random

import pytest
import torch

from lightning_netsense.observation import LinkEstimate, allgather_wire_bytes, allreduce_wire_bytes
from lightning_netsense.probes import (
    CALM_FACTOR,
    CALM_SECONDS,
    probe_answered_fast,
    probe_answered_slow,
    probe_cap,
    probe_size,
    probe_wait,
)
from lightning_netsense.sensing import (
    LinkEstimator,
    fit_latency_bandwidth,
    peak_in_flight,
    queue_corrected_durations,
    step_fit,
    weighted_median,
)

ALPHA = 3e-4  # seconds per collective
MBIT = 1e6 / 8  # bytes per second in one Mbit/s
PROBE = allgather_wire_bytes(60 * 8, 2)  # the agreement all_gather of ~60 float64 on 2 ranks
DENSE = [allreduce_wire_bytes(4 * n, 2) for n in (250_000, 750_000)]  # two fp32 buckets, ~4 MB in all


def timed(sizes, bandwidth, alpha=ALPHA):
    return [alpha + b / bandwidth for b in sizes]


def feed(est, sizes, bandwidth, steps=1, alpha=ALPHA, probe=True):
    """Feed ``steps`` steps of buckets of ``sizes`` (plus the latency probe) on a link of ``bandwidth``."""
    sizes = [*sizes, PROBE] if probe else list(sizes)
    for _ in range(steps):
        est.update(sizes, timed(sizes, bandwidth, alpha))
    return est.compute()


# ---------------------------------------------------------------------------- pure functions
def test_queue_corrected_durations_start_when_the_link_frees():
    # three buckets launched 10 ms apart, each needing 100 ms of link: served one after the other
    launch = [0.00, 0.01, 0.02]
    end = [0.10, 0.20, 0.30]
    assert queue_corrected_durations(launch, end) == pytest.approx([0.10, 0.10, 0.10])
    # naive end - launch would have counted the time spent queued behind the earlier collectives
    assert [e - s for s, e in zip(launch, end)] != pytest.approx([0.10, 0.10, 0.10])


def test_queue_corrected_durations_keep_input_order_and_sum_to_busy_time():
    rng = random.Random(0)
    launch, end, t = [], [], 0.0
    for _ in range(6):
        t += rng.uniform(0.0, 0.05)
        launch.append(t)
    free = 0.0
    for s in launch:  # a serial link: each transfer takes 30 ms once the link is free
        free = max(free, s) + 0.03
        end.append(free)
    order = list(range(6))
    rng.shuffle(order)
    out = queue_corrected_durations([launch[i] for i in order], [end[i] for i in order])
    assert out == pytest.approx([0.03] * 6)
    idle = sum(max(0.0, launch[i] - end[i - 1]) for i in range(1, 6))
    assert sum(out) == pytest.approx(end[-1] - launch[0] - idle)


def test_queue_corrected_durations_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="launch"):
        queue_corrected_durations([0.0, 1.0], [1.0])


def test_peak_in_flight_counts_overlapping_collectives_only():
    # 1 and 2 overlap; 3 starts exactly when 2 ends (not concurrent)
    assert peak_in_flight([0.0, 0.5, 2.0], [1.0, 2.0, 3.0], [10.0, 20.0, 40.0]) == 40.0
    assert peak_in_flight([0.0, 0.5, 0.6], [1.0, 2.0, 3.0], [10.0, 20.0, 40.0]) == 70.0


def test_weighted_median_is_order_free_and_ignores_a_light_outlier():
    assert weighted_median([1.0, 2.0, 100.0], [1.0, 1.0, 1.0]) == 2.0
    assert weighted_median([100.0, 1.0], [0.4, 0.6]) == 1.0
    assert weighted_median([3.0, 1.0], [1.0, 1.0]) == weighted_median([1.0, 3.0], [1.0, 1.0]) == 2.0
    with pytest.raises(ValueError):
        weighted_median([], [])
    with pytest.raises(ValueError):
        weighted_median([1.0], [0.0])


@pytest.mark.parametrize("bandwidth", [20 * MBIT, 1000 * MBIT, 10_000 * MBIT])
def test_fit_recovers_exact_latency_and_bandwidth(bandwidth):
    sizes = [PROBE, 1e4, 2.5e5, 1e6, 4e6]
    alpha, b = fit_latency_bandwidth(sizes, timed(sizes, bandwidth))
    assert alpha == pytest.approx(ALPHA, rel=1e-6)
    assert b == pytest.approx(bandwidth, rel=1e-6)


def test_fit_with_one_size_needs_the_latency():
    sizes = [1e6] * 4
    seconds = timed(sizes, 100 * MBIT)
    alpha, b = fit_latency_bandwidth(sizes, seconds, alpha=ALPHA)
    assert (alpha, b) == (pytest.approx(ALPHA), pytest.approx(100 * MBIT))
    # without it, the whole time is put on the bandwidth: the delivery rate, a lower bound
    alpha, b = fit_latency_bandwidth(sizes, seconds)
    assert alpha == 0.0 and b == pytest.approx(1e6 / seconds[0]) and b < 100 * MBIT


def test_fit_clamps_to_a_physical_line():
    # times that shrink with size: nothing measurable but latency
    alpha, b = fit_latency_bandwidth([1e3, 1e6], [2e-3, 1e-3])
    assert math.isinf(b) and alpha == pytest.approx(1.5e-3)
    # a negative intercept is refitted through the origin
    alpha, b = fit_latency_bandwidth([1e6, 2e6], [0.9e-2, 2.1e-2])
    assert alpha == 0.0 and 0 < b < math.inf
    with pytest.raises(ValueError):
        fit_latency_bandwidth([1.0], [1.0, 2.0])


def test_step_fit_uses_the_given_latency_when_sizes_do_not_spread():
    a, beta = step_fit([1e6, 1.1e6], timed([1e6, 1.1e6], 50 * MBIT), alpha=ALPHA)
    assert a is None and beta == pytest.approx(1 / (50 * MBIT))
    a, beta = step_fit([PROBE, 1e6], timed([PROBE, 1e6], 50 * MBIT), alpha=None)
    assert a == pytest.approx(ALPHA) and beta == pytest.approx(1 / (50 * MBIT))


# ---------------------------------------------------------------------------- the estimator
def test_estimator_before_any_sample_is_unknown():
    est = LinkEstimator()
    assert est.compute() == LinkEstimate(vouched=False)
    est.update([], [])
    assert est.compute().samples == 0 and not est.vouched


def test_only_payloads_that_measure_the_link_vouch_for_it():
    """PowerSGD's kilobytes behind a 128 KB tbf burst read as a fast link: the estimate says it is not vouched
    for until a payload or probe of a quarter of the largest dense bucket has been timed, and stays vouched."""
    est = LinkEstimator()
    reference = 4e6  # the largest dense bucket's wire bytes
    est.update([50_000, 50_000, PROBE], [ALPHA + 1e-5] * 2 + [ALPHA], reference=reference)
    assert est.compute().samples > 0 and not est.compute().vouched and not est.vouched
    est.update([65_536], [ALPHA + 65_536 / (10_000 * MBIT)], reference=reference)  # a probe in the burst
    assert not est.compute().vouched
    est.update([1e6 + 4], [ALPHA + 1e6 / (20 * MBIT)], reference=reference)  # a quarter of the bucket
    link = est.compute()
    assert link.vouched and link.bandwidth == pytest.approx(20 * MBIT, rel=0.1)
    est.update([50_000], [ALPHA + 1e-5], reference=reference)  # small payloads again: still vouched, held
    assert est.compute().vouched and est.compute().bandwidth == pytest.approx(20 * MBIT, rel=0.1)
    # ... also once the probe's weight has decayed and it left the window: kilobytes that pass a burst at
    # 100 Mbit/s never raise it (the held estimate followed them to 49 Mbit/s on a 20 Mbit/s link, when it was
    # recomputed at every step the old probe was still in the window)
    for _ in range(2 * est.window_steps):
        est.update([50_000, PROBE], [ALPHA + 50_000 / (100 * MBIT), ALPHA], reference=reference)
        assert est.compute().bandwidth == pytest.approx(20 * MBIT, rel=0.1)
    # ... while kilobytes that read slower lower it (a drop): they can only err on the fast side
    for _ in range(3):
        est.update([50_000, PROBE], [ALPHA + 50_000 / (5 * MBIT), ALPHA], reference=reference)
    assert est.compute().bandwidth < 10 * MBIT and est.compute().vouched
    restored = LinkEstimator()
    restored.load_state_dict(est.state_dict())
    assert restored.vouched  # checkpoints keep it


def test_estimator_recovers_latency_bandwidth_and_bbr_filters():
    est = LinkEstimator()
    link = feed(est, DENSE, 200 * MBIT, steps=3)
    assert link.alpha == pytest.approx(ALPHA, rel=1e-6)
    assert link.bandwidth == pytest.approx(200 * MBIT, rel=1e-6)
    assert link.samples == 9
    sizes = [*DENSE, PROBE]
    assert link.max_bandwidth == pytest.approx(max(b / t for b, t in zip(sizes, timed(sizes, 200 * MBIT))))
    assert link.min_rtt == pytest.approx(min(timed(sizes, 200 * MBIT)))


def test_estimator_from_queued_collectives():
    # both buckets launched at once: the second waits for the first on the link
    bandwidth = 50 * MBIT
    launch = [0.0, 0.0]
    first = ALPHA + DENSE[0] / bandwidth
    end = [first, first + ALPHA + DENSE[1] / bandwidth]
    est = LinkEstimator()
    for _ in range(3):
        est.update([*DENSE, PROBE], [*queue_corrected_durations(launch, end), timed([PROBE], bandwidth)[0]])
    assert est.compute().bandwidth == pytest.approx(bandwidth, rel=1e-6)
    # uncorrected, the second bucket's wait would read as a slower link
    est.reset()
    for _ in range(3):
        est.update([*DENSE, PROBE], [end[0] - launch[0], end[1] - launch[1], timed([PROBE], bandwidth)[0]])
    assert est.compute().bandwidth < 0.9 * bandwidth


def test_estimator_follows_a_drop_at_once_ignores_a_stall_and_follows_a_recovery():
    est = LinkEstimator()
    feed(est, DENSE, 1000 * MBIT, steps=8)
    # a stall of 20 ms on one step (a loaded machine) is not a drop: the median keeps the link
    stalled = feed(est, DENSE, 1000 * MBIT)
    est.update([*DENSE, PROBE], [t + (0.02 if i == 1 else 0.0) for i, t in enumerate(timed([*DENSE, PROBE], 1000 * MBIT))])
    assert est.compute().bandwidth > 500 * MBIT and stalled.bandwidth == pytest.approx(1000 * MBIT, rel=0.01)
    # a real drop: 50 times slower and 1.6 s of transfer is no stall, and is taken at once
    after_one = feed(est, DENSE, 20 * MBIT)
    after_two = feed(est, DENSE, 20 * MBIT)
    assert after_one.bandwidth == pytest.approx(20 * MBIT, rel=0.01)
    assert after_two.bandwidth == pytest.approx(20 * MBIT, rel=0.01)
    # recovery, seen while the policy compresses: small payloads only (1 % of the dense bytes)
    small = [b / 100 for b in DENSE]
    feed(est, small, 20 * MBIT, steps=4)
    assert est.compute().bandwidth == pytest.approx(20 * MBIT, rel=0.01)
    # the link recovers; compressed payloads alone (0.24 ms of transfer, below the timer's resolution) vote
    # "faster than measurable", which the max filter takes as "at least this fast" ...
    # tiny compressed payloads cannot vouch for a recovery (they are unmeasurable on a slow link as well) ...
    assert feed(est, small, 1000 * MBIT).bandwidth == pytest.approx(20 * MBIT, rel=0.01)
    # ... and the state's bandwidth probe (one larger all_reduce at the boundary) measures it
    probe = [*small, 2e6]
    for _ in range(3):  # once the last "unmeasurable" step has left the max filter
        recovered = feed(est, probe, 1000 * MBIT)
    assert recovered.bandwidth == pytest.approx(1000 * MBIT, rel=0.01)


def test_timing_noise_on_a_fast_link_does_not_read_as_a_slow_link():
    """Scheduler noise of up to 0.8 ms on tiny transfers (loopback, busy cores) must not invent a slow link."""
    import random

    rng = random.Random(0)
    est = LinkEstimator()
    # dense steps, then steps compressed ~50x (as after a wrong decision): the dense bucket's predicted time
    # must stay within the noise, never several ms
    for sizes in [[8.5e4, PROBE]] * 20 + [[1.7e3, PROBE]] * 20:
        est.update(sizes, [ALPHA + b / (10_000 * MBIT) + rng.uniform(0, 8e-4) for b in sizes])
        assert est.compute().time(8.5e4) < 1.5e-3


def test_estimator_resolution_is_validated():
    with pytest.raises(ValueError, match="resolution"):
        LinkEstimator(resolution=-1)


def test_estimator_does_not_collapse_on_small_compressed_payloads():
    alpha = 1e-3  # the latency dominates these transfers
    small = [1e4, 2.5e4]
    # 100 Mbit/s: the transfers (0.8 and 2 ms) are resolvable, and measured exactly despite the latency
    est = LinkEstimator()
    link = feed(est, small, 100 * MBIT, steps=8, alpha=alpha)
    assert link.bandwidth == pytest.approx(100 * MBIT, rel=1e-3)
    assert link.alpha == pytest.approx(alpha, rel=1e-3)
    naive = sum(small) / sum(timed(small, 100 * MBIT, alpha))  # bytes / time, the prototype's estimate
    assert naive < 100 * MBIT / 1.5
    # 1 Gbit/s: 0.2 ms of transfer under 1 ms of latency; never read as a slow link
    est = LinkEstimator()
    assert feed(est, small, 1000 * MBIT, steps=8, alpha=alpha).bandwidth >= 1000 * MBIT


def test_estimator_holds_latency_when_only_one_size_is_left():
    est = LinkEstimator(window_steps=4)
    feed(est, DENSE, 100 * MBIT, steps=4)
    # the probe stops (e.g. one bucket and no agreement timing): one size per step from now on
    link = feed(est, [DENSE[1]], 100 * MBIT, steps=6, probe=False)
    assert link.alpha == pytest.approx(ALPHA, rel=1e-6)
    assert link.bandwidth == pytest.approx(100 * MBIT, rel=1e-6)
    est.load_state_dict(est.state_dict())
    assert est.compute() == link


@pytest.mark.parametrize("where", ["first", "middle"])
def test_estimator_ignores_one_outlying_step(where):
    bandwidth = 100 * MBIT
    est = LinkEstimator()
    sizes = [*DENSE, PROBE]
    if where == "first":  # connection set-up makes the first collectives slow
        est.update(sizes, [20 * t for t in timed(sizes, bandwidth)])
        link = feed(est, DENSE, bandwidth)
    else:  # a straggler step
        feed(est, DENSE, bandwidth, steps=6)
        est.update(sizes, [t + 0.5 for t in timed(sizes, bandwidth)])
        link = est.compute()
    assert link.bandwidth == pytest.approx(bandwidth, rel=1e-6)
    assert link.alpha == pytest.approx(ALPHA, rel=1e-6)


def test_estimator_window_expires_old_samples():
    est = LinkEstimator(window_steps=3)
    feed(est, DENSE, 1000 * MBIT, steps=3)
    fast_max = est.compute().max_bandwidth
    link = feed(est, DENSE, 10 * MBIT, steps=3)
    assert link.max_bandwidth < fast_max / 50
    assert link.samples == 9


def test_memoised_step_fits_stay_bounded_and_equal_a_fresh_fit():
    """The estimator keeps each window step's own fit instead of refitting the window at every compute()."""
    rng = random.Random(0)
    est = LinkEstimator(window_steps=4)
    for i in range(50):
        # most steps fit their own latency; every third has one size only (its fit depends on the latency
        # estimate of the window, and must not be memoised)
        sizes = [2e6, 2e6] if i % 3 == 2 else [200.0] + [rng.choice([6e4, 5e5, 2e6]) for _ in range(3)]
        est.update(sizes, [1e-4 + b / (20 * MBIT) * rng.uniform(0.8, 1.3) for b in sizes])
        est.compute()
        assert len(est._fits) <= 2 * est.window_steps + 1  # pruned to (about) the window
        fresh = LinkEstimator(window_steps=4)
        fresh.load_state_dict(est.state_dict())  # same window, nothing memoised
        assert fresh.compute() == est.compute()


def test_estimator_state_dict_loads_with_weights_only():
    est = LinkEstimator(window_steps=5, decay=0.8)
    feed(est, DENSE, 50 * MBIT, steps=7)
    buf = io.BytesIO()
    torch.save(est.state_dict(), buf)
    buf.seek(0)
    other = LinkEstimator(window_steps=5, decay=0.8)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.compute() == est.compute()
    est.reset()
    assert est.compute().samples == 0


def test_estimator_ignores_invalid_samples():
    est = LinkEstimator()
    est.update([1e6, 0.0, 1e6, PROBE], [math.nan, 1.0, -1.0, 1e-3])
    assert est.compute().samples == 1
    with pytest.raises(ValueError, match="sizes"):
        est.update([1.0, 2.0], [1.0])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"window_steps": 0}, "window_steps"),
        ({"window_steps": 2.5}, "window_steps"),
        ({"decay": 0.0}, "decay"),
        ({"decay": 1.5}, "decay"),
        ({"min_size_ratio": 1.0}, "min_size_ratio"),
    ],
)
def test_estimator_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        LinkEstimator(**kwargs)


def test_tiny_unmeasurable_steps_do_not_vouch_for_a_fast_link():
    """Compressed steps on a slow link are unmeasurable too; a probe in the window keeps the estimate finite."""
    est = LinkEstimator()
    probe = 2e6
    for _ in range(3):  # compressed steps with a bandwidth probe at 20 Mbit/s
        feed(est, [3e3, probe], 20 * MBIT)
        feed(est, [3e3], 20 * MBIT)  # a compressed step without probe: 0.3 ms of transfer, unmeasurable
    assert est.compute().bandwidth == pytest.approx(20 * MBIT, rel=0.05)


def burst_timed(sizes, bandwidth, burst=131072, line=10_000 * MBIT):
    """A tbf token bucket: the first ``burst`` bytes of a collective pass at line rate, the rest at ``bandwidth``."""
    return [ALPHA + min(b, burst) / line + max(0.0, b - burst) / bandwidth for b in sizes]


def test_payloads_inside_a_shaper_burst_cannot_raise_the_estimate():
    """Measured at 20 Mbit/s behind a 128 KB tbf burst: PowerSGD's kilobytes (and 64 KB probes) passed at line
    rate, the estimate went infinite, and the policy relaxed to a dense step that took 4.3 s."""
    est = LinkEstimator()
    for _ in range(3):
        sizes = [*DENSE, PROBE]
        est.update(sizes, burst_timed(sizes, 20 * MBIT))
    assert est.compute().bandwidth == pytest.approx(20 * MBIT, rel=0.1)
    for probe in [None, 65536, None, 131072] * 4:  # compressed steps; probes that fit in the burst
        sizes = [3e3, 5e3, PROBE] + ([probe] if probe else [])
        est.update(sizes, burst_timed(sizes, 20 * MBIT))
        assert est.compute().bandwidth <= 20 * MBIT * 1.1
    # a slower link is still seen from small payloads alone (they may lower the estimate)
    for _ in range(3):
        sizes = [3e4, 5e4, PROBE]
        est.update(sizes, timed(sizes, 2 * MBIT))
    assert est.compute().bandwidth == pytest.approx(2 * MBIT, rel=0.1)
    # a probe comparable to the dense buckets measures a real recovery
    for _ in range(2):
        sizes = [3e3, 5e3, PROBE, 1e6]
        est.update(sizes, burst_timed(sizes, 1000 * MBIT))
    assert est.compute().bandwidth > 500 * MBIT
    # and the state survives a checkpoint
    other = LinkEstimator()
    other.load_state_dict(est.state_dict())
    assert other.compute() == est.compute()


def test_vouch_fraction_is_validated():
    for bad in (0, 1.5, True, "x"):
        with pytest.raises(ValueError, match="`vouch_fraction`"):
            LinkEstimator(vouch_fraction=bad)


def test_probe_size_budget_growth_floor_and_cap():
    largest = 8e6
    # the budget: 5 % of the 2 steps until the next probe at 20 Mbit/s, raised to the 64 KB floor
    assert probe_size(20 * MBIT, False, 0, 0.1, largest, 0.05, 2) == 65536
    assert probe_size(1000 * MBIT, False, 0, 0.1, largest, 0.05, 2) == pytest.approx(1.25e6, abs=4)
    # a probe that answered fast grows fourfold, up to the largest size (the vouching size), never above it
    assert probe_size(20 * MBIT, True, 65536, 0.1, largest, 0.05, 2) == 262144
    assert probe_size(20 * MBIT, True, 6e6, 0.1, largest, 0.05, 2) == largest
    # four times the last within a factor two of the largest: the largest itself (the rung below it costs nearly
    # as much and does not vouch: 1 MB then 1.1 MB at 20 Mbit/s on the digits MLP, 0.42 s + 0.45 s)
    assert probe_size(20 * MBIT, True, 262144, 0.1, 1.9e6, 0.05, 2) == 1_900_000
    assert probe_size(20 * MBIT, True, 262144, 0.1, 2.2e6, 0.05, 2) == 1_048_576
    # the largest probe vouches for the link: a quarter of an 8 MB bucket, rounded up, never above the bucket
    assert probe_cap(8e6, 0.25) == 2_000_004 and probe_cap(1000, 1.0) == 1000
    # a probe that answered slow is followed by one of the largest size (which can replace a vouched estimate)
    assert probe_size(20 * MBIT, False, 65536, 0.1, largest, 0.05, 2, slow=True) == largest
    # an infinite estimate does not jump to the largest bucket (it cost 1.9 s per probe at 20 Mbit/s)
    assert probe_size(math.inf, False, 0, 0.1, largest, 0.05, 2) == 65536
    assert probe_size(math.inf, False, 65536, 0.1, largest, 0.05, 2) == 131072
    assert probe_size(20 * MBIT, False, 0, 0.1, 1000, 0.05, 2) == 1000  # tiny model: the bucket itself
    assert probe_size(20 * MBIT, False, 0, 0.1, 0, 0.05, 2) == 0


def test_probe_wait_keeps_probes_within_their_budget():
    # a 26 ms probe with 5 % of 0.1 s steps: 6 steps (0.026 <= 0.05 * 0.1 * 6)
    assert probe_wait(0.026, 0.1, 0.05, 2) == 6
    assert probe_wait(0.001, 0.1, 0.05, 2) == 2  # never more often than `every` ...
    assert probe_wait(0.001, 0.1, 0.05, 2, follow_up=True) == 1  # ... unless the link answered off: probe on
    assert probe_wait(0.5, 0.1, 0.05, 2, follow_up=True) == 1
    assert probe_wait(0.5 + 0.125, 0.1, 0.05, 2) == 125  # the chain is paid for after its last probe
    link = LinkEstimate(alpha=ALPHA, bandwidth=20 * MBIT)
    assert probe_answered_fast(link, 131072, 0.001)  # a burst: 128 KB in 1 ms at a believed 20 Mbit/s
    assert not probe_answered_fast(link, 131072, 0.05)
    assert not probe_answered_fast(link, 131072, 0.0)  # no probe
    assert probe_answered_slow(link, 131072, 0.2)  # 128 KB take 52 ms at 20 Mbit/s
    assert not probe_answered_slow(link, 131072, 0.05) and not probe_answered_slow(link, 131072, 0.0)


def test_probe_wait_backs_off_while_the_link_answers_as_believed():
    # each calm probe doubles the wait: 4, 8, 16, 32 steps of 0.05 s ...
    assert [probe_wait(0.001, 0.05, 0.05, 2, calm=c) for c in range(6)] == [2, 4, 8, 16, 32, 32]
    # ... up to CALM_FACTOR x every, and CALM_SECONDS of steps: 0.4 s steps wait at most 10 steps
    assert probe_wait(0.001, 0.4, 0.05, 2, calm=10) == int(CALM_SECONDS / 0.4) == 10
    assert probe_wait(0.001, 10.0, 0.05, 2, calm=10) == 2  # never below `every`
    assert probe_wait(0.001, 0.05, 0.05, 2, calm=60) == 2 * CALM_FACTOR  # no overflow from a long calm
    # the budget still rules when it asks for more; an answer off the belief probes on at once
    assert probe_wait(1.0, 0.05, 0.05, 2, calm=1) == 400
    assert probe_wait(0.001, 0.05, 0.05, 2, follow_up=True, calm=5) == 1


def test_reference_is_the_current_largest_dense_payload():
    """DDP's first step has other buckets than the rebuilt ones (measured: one 43.8 KB bucket, then 18.7 KB at
    most): the hook passes the current largest dense bucket, so half-size (bf16) payloads vouch for the link."""
    est = LinkEstimator()
    est.update([43808.0, PROBE], timed([43808.0, PROBE], 100 * MBIT))
    assert not est.vouches(9360.0)  # a quarter of the first step's single bucket is 10952 bytes
    est.update([18720.0, PROBE], timed([18720.0, PROBE], 100 * MBIT), reference=18720.0)
    assert est.vouches(9360.0) and not est.vouches(4000.0) and not est.vouches(0.0)
