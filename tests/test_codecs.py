"""Codec maths on one process: options, payload sizes, error bounds, top-k selection, PowerSGD projections,
non-finite propagation and error-feedback conservation (the 2-rank gloo runs are in test_codecs_dist.py)."""

import functools
import math

import pytest
import torch

from lightning_netsense.codecs import CODECS, BucketLayout, Int8Codec, PowerSGDCodec, TopKCodec
from lightning_netsense.codecs.topk import select_topk, topk_count
from lightning_netsense.feedback import ErrorFeedback
from lightning_netsense.observation import MODE_CODES
from lightning_netsense.policy import FixedPolicy

LOSSY = ("int8", "topk", "powersgd")
SHAPES = ((64, 32), (64,), (10, 64), (3, 5), (64, 32), (8, 4, 3, 3), (7,))


def _layout(shapes=SHAPES, index: int = 0, world: int = 2, extra: int = 0) -> BucketLayout:
    numel = sum(math.prod(s) for s in shapes) + extra
    return BucketLayout(index, numel, tuple(shapes), world)


def _grads(layout: BucketLayout, world: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(layout.numel, generator=g) * torch.rand(layout.numel, generator=g) for _ in range(world)]


def _exchange(codecs, xs, layout, **options):
    """Simulate one collective: every rank compresses, the payloads are summed or laid end to end, aggregated."""
    out = [c.compress(x, layout, **options) for c, x in zip(codecs, xs)]
    payloads = [p for p, _ in out]
    collected = torch.stack(payloads).sum(0) if codecs[0].summable else torch.cat(payloads)
    sent = [c.decompress(p, ctx, layout) for c, (p, ctx) in zip(codecs, out)]
    aggregated = [c.aggregate(collected.clone(), ctx, layout) for c, (_, ctx) in zip(codecs, out)]
    return payloads, out, sent, aggregated


def test_registry_follows_mode_codes():
    assert list(CODECS) == list(MODE_CODES)
    for name, cls in CODECS.items():
        assert cls.name == name


@pytest.mark.parametrize(
    ("mode", "option", "bad"),
    [
        ("topk", "density", 0.0),
        ("topk", "density", 1.5),
        ("topk", "density", -0.1),
        ("topk", "density", True),
        ("powersgd", "rank", 0),
        ("powersgd", "rank", 2.5),
        ("powersgd", "rank", True),
        ("powersgd", "bits", 8),
        ("powersgd", "bits", True),
        ("int8", "chunk_size", 0),
        ("int8", "chunk_size", 3.5),
    ],
)
def test_bad_options_name_the_option(mode, option, bad):
    with pytest.raises(ValueError, match=option):
        CODECS[mode].validate_options({option: bad})
    with pytest.raises(ValueError, match=option):
        FixedPolicy(mode=mode, **{option: bad})


def test_options_have_defaults_and_do_not_cross_modes():
    assert TopKCodec.validate_options({}) == {"density": 0.01}
    assert PowerSGDCodec.validate_options({}) == {"rank": 4, "bits": 32}
    assert Int8Codec.validate_options({"chunk_size": 256.0}) == {"chunk_size": 256.0}  # checkpoints store floats
    with pytest.raises(ValueError, match="density"):
        FixedPolicy(mode="int8", density=0.1)


@pytest.mark.parametrize("mode", LOSSY)
@pytest.mark.parametrize("shapes", [SHAPES, ((1,),), ((5000,),), ((256, 256), (256,)), ((3, 3),)])
@pytest.mark.parametrize("option", [None, "small", "large"])
def test_payload_bytes_are_exact(mode, shapes, option):
    values = {
        "int8": {"small": 3, "large": 4096},
        "topk": {"small": 1e-4, "large": 1.0},
        "powersgd": {"small": 1, "large": 8},
    }
    options = {} if option is None else {next(iter(CODECS[mode].default_options)): values[mode][option]}
    layout = _layout(shapes)
    codec = CODECS[mode]()
    x = torch.randn(layout.numel)
    for _ in range(3):  # PowerSGD alternates halves: both must be priced exactly
        expected = codec.payload_bytes(layout, **options)
        payload, ctx = codec.compress(x, layout, **options)
        assert payload.dim() == 1
        assert payload.numel() * payload.element_size() == expected
        codec.aggregate(torch.cat([payload] * 2) if not codec.summable else payload * 2, ctx, layout)


def test_payload_bytes_compress():
    layout = _layout(((1024, 1024),))
    dense = layout.numel * 4
    assert Int8Codec().payload_bytes(layout) == layout.numel + 4 * 1024
    assert TopKCodec().payload_bytes(layout, density=0.01) == 8 * math.ceil(0.01 * layout.numel)
    assert PowerSGDCodec().payload_bytes(layout, rank=4) == 4 * 1024 * 4
    assert dense / PowerSGDCodec().payload_bytes(layout) == 256


# ----------------------------------------------------------------------------- int8
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_int8_error_within_half_a_step_per_chunk(chunk):
    layout = _layout()
    codecs = [Int8Codec(), Int8Codec()]
    xs = _grads(layout, 2)
    xs[0][:200] = 0.0  # a zero chunk must decode to zeros, not NaN
    _, _, sent, agg = _exchange(codecs, xs, layout, chunk_size=chunk)
    nchunks = math.ceil(layout.numel / chunk)
    bounds = []
    for x, s in zip(xs, sent):
        amax = torch.nn.functional.pad(x.abs(), (0, nchunks * chunk - layout.numel)).view(nchunks, chunk).amax(1)
        bound = (amax / 127 / 2).repeat_interleave(chunk)[: layout.numel]
        assert ((s - x).abs() <= bound * (1 + 1e-5) + 1e-12).all()
        bounds.append(bound)
    mean = (xs[0] + xs[1]) / 2
    assert ((agg[0] - mean).abs() <= (bounds[0] + bounds[1]) / 2 * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(agg[0], agg[1])
    assert (sent[0][:200] == 0).all()
    assert (agg[0] - mean).abs().max() > 0  # it is lossy


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_int8_non_finite_reaches_the_aggregate(bad):
    layout = _layout()
    codecs = [Int8Codec(), Int8Codec()]
    xs = _grads(layout, 2)
    xs[0][1500] = bad
    _, _, sent, agg = _exchange(codecs, xs, layout, chunk_size=1024)
    assert not torch.isfinite(agg[0][1024:2048]).any()  # the whole chunk: AMP's scaler must see it
    assert torch.isfinite(agg[0][:1024]).all() and torch.isfinite(agg[0][2048:]).all()
    assert not torch.isfinite(sent[0]).all()  # and error feedback resets instead of keeping it


# ----------------------------------------------------------------------------- top-k
def test_topk_keeps_largest_magnitudes_with_signs_and_adds_duplicates():
    layout = _layout(((1000,),))
    codecs = [TopKCodec(), TopKCodec()]
    xs = [torch.randn(1000) * 0.01 for _ in range(2)]
    # both ranks keep indices 10 and 20 (duplicates), each keeps one index of its own; negative values too
    xs[0][[10, 20, 30]] = torch.tensor([-5.0, 3.0, 4.0])
    xs[1][[10, 20, 40]] = torch.tensor([2.0, -7.0, -6.0])
    payloads, _, sent, agg = _exchange(codecs, xs, layout, density=0.003)
    assert payloads[0].dtype == torch.int32 and payloads[0].numel() == 2 * 3
    torch.testing.assert_close(sent[0][[10, 20, 30]], xs[0][[10, 20, 30]], rtol=0, atol=0)
    assert (sent[0] != 0).sum() == 3
    expected = torch.zeros(1000)
    expected[10], expected[20], expected[30], expected[40] = (-5 + 2) / 2, (3 - 7) / 2, 4 / 2, -6 / 2
    torch.testing.assert_close(agg[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(agg[1], expected, rtol=0, atol=0)


def test_topk_count():
    assert topk_count(1000, 0.01) == 10
    assert topk_count(10, 0.01) == 1
    assert topk_count(1001, 0.01) == 11
    assert topk_count(7, 1.0) == 7


@pytest.mark.parametrize("numel", [1 << 17, 1 << 20])
def test_sampled_selection_is_exact(numel):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen).pow(4)
    k = topk_count(numel, 0.01)
    exact = select_topk(x.abs(), k, "exact")
    sampled = select_topk(x.abs(), k, "sampled", generator=gen)
    assert sampled.numel() == k and sampled.unique().numel() == k
    torch.testing.assert_close(x.abs()[sampled].sort().values, x.abs()[exact].sort().values, rtol=0, atol=0)


def test_sampled_selection_falls_back_when_the_sample_misleads():
    # nearly all mass in a tiny set the sample is unlikely to hit: the sampled threshold keeps too few candidates
    numel, k = 1 << 17, 1000
    x = torch.zeros(numel)
    x[:10] = 100.0
    x[10:] = torch.linspace(0, 1, numel - 10)
    gen = torch.Generator().manual_seed(0)
    got = select_topk(x, k, "sampled", generator=gen)
    torch.testing.assert_close(x[got].sort().values, torch.topk(x, k).values.sort().values, rtol=0, atol=0)


def test_topk_does_not_touch_the_global_rng():
    layout = _layout(((1 << 17,),))
    x = torch.randn(layout.numel)
    before = torch.get_rng_state()
    TopKCodec().compress(x, layout)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("numel", [1000, 1 << 17])
def test_topk_non_finite_is_always_sent(bad, numel):
    layout = _layout(((numel,),))
    codecs = [TopKCodec(), TopKCodec()]
    xs = [torch.randn(numel) for _ in range(2)]
    xs[0][numel // 2] = bad
    _, _, sent, agg = _exchange(codecs, xs, layout, density=0.01)
    assert not math.isfinite(float(agg[0][numel // 2]))
    assert not math.isfinite(float(agg[1][numel // 2]))
    assert not torch.isfinite(sent[0]).all()


# ----------------------------------------------------------------------------- PowerSGD
def test_powersgd_is_the_projection_of_the_mean_and_alternates():
    layout = _layout()
    codecs = [PowerSGDCodec(), PowerSGDCodec()]
    for step in range(4):
        xs = _grads(layout, 2, seed=step)
        mean = (xs[0] + xs[1]) / 2
        _, out, sent, agg = _exchange(codecs, xs, layout, rank=2)
        _, left, p, q, _ = out[0][1]
        assert left == (step % 2 == 0)
        assert torch.equal(agg[0], agg[1])  # identical factors on every rank
        expected = mean.clone()
        for shape, (off, mat) in zip(SHAPES, _matrix_views(mean)):
            if len(shape) < 2 or (shape[0] + mat.shape[1]) * 2 > mat.numel():
                continue  # vectors and the 3x5 matrix travel uncompressed (exact)
            (group_index,) = [i for i, g in enumerate(out[0][1][0].plan.groups) if off in g.offsets]
            j = out[0][1][0].plan.groups[group_index].offsets.index(off)
            pg, qg = p[group_index][j], q[group_index][j]
            proj = mat @ qg @ qg.T if left else pg @ pg.T @ mat
            expected[off : off + mat.numel()] = proj.reshape(-1)
        torch.testing.assert_close(agg[0], expected, rtol=1e-5, atol=1e-6)
        assert agg[0].norm() <= mean.norm() * (1 + 1e-6)
        # the codec's own contribution is the same projection of its own input
        assert (sent[0] - xs[0]).norm() <= xs[0].norm()


def test_powersgd_bfloat16_payload_halves_the_bytes_and_feeds_its_rounding_back():
    layout = _layout()
    full, half = [PowerSGDCodec(), PowerSGDCodec()], [PowerSGDCodec(), PowerSGDCodec()]
    assert half[0].payload_bytes(layout, rank=2, bits=16) * 2 == full[0].payload_bytes(layout, rank=2)
    for step in range(3):
        xs = _grads(layout, 2, seed=step)
        expected_bytes = half[0].payload_bytes(layout, rank=2, bits=16)  # the next step's, both halves in turn
        payloads, out, sent, agg = _exchange(half, xs, layout, rank=2, bits=16)
        _, _, sent32, agg32 = _exchange(full, xs, layout, rank=2)
        assert payloads[0].dtype == torch.bfloat16
        assert payloads[0].numel() * 2 == expected_bytes
        if step == 0:  # same seeded factors: only the rounding differs
            assert not torch.equal(sent[0], sent32[0])
        assert agg[0].dtype == torch.float32 and torch.equal(agg[0], agg[1])  # same factors on every rank
        # the same projection, up to bfloat16's rounding (8-bit mantissa: ~0.3 % per element)
        torch.testing.assert_close(agg[0], agg32[0], rtol=0.05, atol=0.02 * float(agg32[0].abs().max()))
        # what error feedback keeps is what the rounded payload did not carry, exactly
        payload, ctx = out[0]
        residual = half[0].subtract_sent_(xs[0].clone(), payload, ctx, layout)
        torch.testing.assert_close(residual, xs[0] - sent[0], rtol=0, atol=1e-6)


def _matrix_views(flat):
    off = 0
    for shape in SHAPES:
        n = math.prod(shape)
        yield off, flat[off : off + n].view(shape[0], -1) if len(shape) >= 2 else flat[off : off + n]
        off += n


def test_powersgd_warm_start_finds_a_low_rank_gradient():
    torch.manual_seed(0)
    layout = _layout(((128, 96),), world=1)
    low = (torch.randn(128, 3) @ torch.randn(3, 96)).reshape(-1)
    codec = PowerSGDCodec()
    errors = []
    for _ in range(4):
        payload, ctx = codec.compress(low, layout, rank=3)
        got = codec.aggregate(payload, ctx, layout)
        errors.append(float((got - low).norm() / low.norm()))
    assert errors[0] > 0.5  # random initial factors
    assert errors[-1] < 1e-4  # the warm-started power iteration found the rank-3 subspace
    codec.reset()
    payload, ctx = codec.compress(low, layout, rank=3)
    assert float((codec.aggregate(payload, ctx, layout) - low).norm() / low.norm()) > 0.5


def test_powersgd_rank_change_reinitialises():
    layout = _layout()
    codec = PowerSGDCodec()
    x = torch.randn(layout.numel)
    for rank in (2, 2, 3, 1):
        payload, ctx = codec.compress(x, layout, rank=rank)
        assert ctx[2][0].shape[-1] == rank
        codec.aggregate(payload, ctx, layout)


def test_powersgd_non_finite_reaches_every_rank_and_spares_the_factors():
    layout = _layout()
    codecs = [PowerSGDCodec(), PowerSGDCodec()]
    for step in range(4):
        xs = _grads(layout, 2, seed=step)
        if step == 1:
            xs[0][5] = math.inf  # inside the first 64x32 matrix
        _, _, sent, agg = _exchange(codecs, xs, layout)
        finite = bool(torch.isfinite(agg[0]).all()) and bool(torch.isfinite(agg[1]).all())
        assert finite == (step != 1)
        if step == 1:
            assert not torch.isfinite(sent[0]).all()
    for codec in codecs:
        for state in codec._states.values():
            assert all(torch.isfinite(t).all() for t in state.p + state.q)


# ----------------------------------------------------------------------------- error feedback
@pytest.mark.parametrize(
    "modes", [("int8",), ("topk",), ("powersgd",), ("fp16",), ("bf16",), ("topk", "int8", "powersgd", "fp16")]
)
def test_error_feedback_conserves_the_gradient(modes):
    """Over T steps, what was sent plus the final residual equals the sum of the gradients (modes may switch).

    ``compensate``/``settle`` with each codec's ``subtract_sent_`` (the hook's allocation-free path) keeps exactly
    ``compensated - decompress(payload)`` as the residual."""
    layout = _layout(world=1)
    codecs = {m: CODECS[m]() for m in modes}
    feedback = ErrorFeedback()
    gen = torch.Generator().manual_seed(0)
    total_grad = torch.zeros(layout.numel, dtype=torch.float64)
    total_sent = torch.zeros(layout.numel, dtype=torch.float64)
    for step in range(12):
        codec = codecs[modes[step % len(modes)]]
        grad = torch.randn(layout.numel, generator=gen)
        original = grad.clone()
        compensated = feedback.compensate(layout.index, grad)
        payload, ctx = codec.compress(compensated, layout)
        sent = codec.decompress(payload, ctx, layout)
        expected = compensated - sent
        bound = {"payload": payload, "ctx": ctx, "layout": layout}
        err2, _ = feedback.settle(
            layout.index,
            compensated,
            functools.partial(codec.subtract_sent_, **bound),
            functools.partial(codec.residual_sq_norm, **bound),
        )
        torch.testing.assert_close(feedback.residual(layout.index), expected, rtol=0, atol=1e-6)
        assert float(err2) == pytest.approx(float(expected.norm()) ** 2, rel=1e-4)  # stated or measured alike
        assert feedback.norm() == pytest.approx(float(expected.norm()), rel=1e-5)
        assert torch.equal(grad, original)  # the bucket itself is not touched
        assert float(err2) > 0  # lossy
        # the aggregate of a world of one is exactly what was sent
        torch.testing.assert_close(codec.aggregate(payload, ctx, layout), sent, rtol=1e-6, atol=1e-6)
        total_grad += grad.double()
        total_sent += sent.double()
    residual = feedback.residual(layout.index).double()
    torch.testing.assert_close(total_sent + residual, total_grad, rtol=0, atol=1e-4)
    assert residual.norm() > 0


@pytest.mark.parametrize("mode", ["int8", "topk", "powersgd", "fp16", "bf16"])
def test_subtract_sent_is_compensated_minus_own_contribution(mode):
    layout = _layout(world=2)
    codec = CODECS[mode]()
    compensated = torch.randn(layout.numel, generator=torch.Generator().manual_seed(1))
    payload, ctx = codec.compress(compensated, layout)
    expected = compensated - codec.decompress(payload, ctx, layout)
    torch.testing.assert_close(codec.subtract_sent_(compensated.clone(), payload, ctx, layout), expected)


@pytest.mark.parametrize(
    ("mode", "options"),
    [("topk", {}), ("topk", {"density": 0.3}), ("powersgd", {"bits": 32}), ("powersgd", {"bits": 16}),
     ("powersgd", {"rank": 1, "bits": 16}), ("int8", {}), ("fp16", {}), ("bf16", {})],
)
def test_residual_sq_norm_is_the_norm_of_the_residual_or_unknown(mode, options):
    """Top-k and PowerSGD state ``||compensated - sent||^2`` from ``||compensated||^2`` and the payload (Pythagoras),
    on both PowerSGD halves and with its bfloat16 rounding; the other codecs leave it to be measured (None)."""
    layout = _layout(world=2)
    codec = CODECS[mode]()
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # PowerSGD: the left half, the right half (factors advanced by the aggregate), left again
        compensated = torch.randn(layout.numel, generator=gen)
        payload, ctx = codec.compress(compensated, layout, **options)
        ref2 = float(compensated.double().norm()) ** 2
        measured = float(codec.subtract_sent_(compensated.clone(), payload, ctx, layout).double().norm()) ** 2
        known = codec.residual_sq_norm(torch.tensor(ref2), payload, ctx, layout)
        if mode in ("int8", "fp16", "bf16"):
            assert known is None
        else:
            assert 0 < measured < ref2
            assert isinstance(known, torch.Tensor) and known.dim() == 0  # a device tensor: nothing waits
            assert float(known) == pytest.approx(measured, rel=1e-4)
        collected = payload.clone() if codec.summable else payload.repeat(layout.world_size)
        codec.aggregate_into(collected, ctx, layout, torch.empty(layout.numel))


def test_powersgd_residual_norm_counts_the_bfloat16_rounding():
    """On a rank-1 gradient the warm-started projection becomes exact, and what remains of the residual is the
    payload's bfloat16 rounding: the stated norm must hold it (``ref2 - ||p||^2`` alone would read zero)."""
    layout = _layout(shapes=((64, 32),), world=1)
    gen = torch.Generator().manual_seed(4)
    grad = torch.outer(torch.randn(64, generator=gen), torch.randn(32, generator=gen)).reshape(-1)
    codec = PowerSGDCodec()
    for _ in range(4):  # left, right, left, right: the factors lock onto the gradient's singular vectors
        payload, ctx = codec.compress(grad, layout, rank=1, bits=16)
        ref2 = float(grad.double().norm()) ** 2
        measured = float(codec.subtract_sent_(grad.clone(), payload, ctx, layout).double().norm()) ** 2
        known = float(codec.residual_sq_norm(torch.tensor(ref2), payload, ctx, layout))
        codec.aggregate_into(payload.clone(), ctx, layout, torch.empty(layout.numel))
    assert 1e-9 * ref2 < measured < 1e-3 * ref2  # the projection is exact up to the rounding
    assert known == pytest.approx(measured, rel=0.2)  # float32 products: without the rounding term, half of it


@pytest.mark.parametrize("mode", ["none", "int8", "topk", "powersgd", "fp16", "bf16"])
def test_aggregate_into_the_bucket_equals_aggregate(mode):
    layout = _layout(world=2)
    gen = torch.Generator().manual_seed(2)
    payloads = []
    for _ in range(2):  # two ranks' payloads, as the collective would deliver them
        codec = CODECS[mode]()
        payload, ctx = codec.compress(torch.randn(layout.numel, generator=gen), layout)
        payloads.append(payload)
    collected = payloads[0] + payloads[1] if codec.summable else torch.cat(payloads)
    expected = CODECS[mode]().aggregate(collected.clone(), ctx, layout) if mode != "powersgd" else None
    if mode == "powersgd":  # aggregate advances the warm start: compare two identical codecs
        twin = CODECS[mode]()
        _, twin_ctx = twin.compress(torch.randn(layout.numel, generator=torch.Generator().manual_seed(2)), layout)
        expected = twin.aggregate(collected.clone(), twin_ctx, layout)
    bucket = torch.full((layout.numel,), float("nan"))
    out = codec.aggregate_into(collected.clone(), ctx, layout, bucket)
    assert out.data_ptr() == bucket.data_ptr()
    torch.testing.assert_close(bucket, expected.view_as(bucket))
