"""The update error: the maths on hand-made tensors, the optimizers' states, the sample, the shadow measurement."""

import math

import pytest
import torch
from torch import nn

from lightning_netsense.codecs import CODECS
from lightning_netsense.observation import Decision
from lightning_netsense.shadow import ShadowMeter, window_blocks
from lightning_netsense.update_error import (
    BucketSample,
    SecondMoments,
    preconditioner,
    relative,
    update_terms,
)


def _adam_state(grads, steps=0, **kwargs):
    """A one-parameter Adam that has taken ``steps`` steps on ``grads`` (its state as the hook would read it)."""
    p = nn.Parameter(torch.zeros(grads[0].shape))
    opt = torch.optim.Adam([p], lr=1e-3, **kwargs)
    for g in grads[:steps]:
        p.grad = g.clone()
        opt.step()
    return p, opt


def _error(exact, sent, param=None, opt=None, target=None):
    moments = SecondMoments([opt]) if opt is not None else None
    pre = preconditioner([(param if param is not None else nn.Parameter(exact.clone()), None)], moments)
    return relative(update_terms(exact, sent, pre, target).tolist())


def test_exact_is_zero_nothing_sent_is_one_and_sign_flips_are_counted():
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    p, opt = _adam_state([g])
    assert _error(g, g, p, opt) == (0.0, 0.0)
    err, flips = _error(g, torch.zeros_like(g), p, opt)
    assert err == pytest.approx(1.0) and flips == 0.0
    err, flips = _error(g, -g, p, opt)
    assert err == pytest.approx(2.0) and flips == 1.0  # a step that does harm: 1 - e^2 < 0
    assert math.isnan(relative([0.0, 0.0, 0.0, 0.0])[0])  # nothing measured


def test_sgd_measures_the_plain_relative_error():
    g = torch.randn(500, generator=torch.Generator().manual_seed(1))
    sent = g + 0.1 * torch.randn(500, generator=torch.Generator().manual_seed(2))
    p = nn.Parameter(torch.zeros(500))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    plain = float(torch.linalg.vector_norm(sent - g) / torch.linalg.vector_norm(g))
    assert _error(g, sent, p, opt)[0] == pytest.approx(plain, rel=1e-5)
    assert _error(g, sent)[0] == pytest.approx(plain, rel=1e-5)  # no optimizer known: the same


def test_adam_weighs_an_error_by_how_much_its_coordinate_moves_the_loss():
    """Gradients of two scales: 10 coordinates at 1e-2, 100,000 at 2e-8 (fp16 flushes those to zero). The plain
    relative error does not see the underflow; Adam takes steps of a similar size on every coordinate (two thirds
    of it here, with its eps), and the error counts each in proportion to its gradient over Adam's divisor."""
    g = torch.cat([torch.full((10,), 1e-2), torch.full((100_000,), 2e-8)])
    p, opt = _adam_state([g], steps=3)
    sent = CODECS["fp16"]().decompress(CODECS["fp16"]().compress(g.clone(), _layout(g.numel()))[0], None,
                                       _layout(g.numel()))
    assert float(sent[10:].abs().max()) == 0.0  # underflow
    plain = float(torch.linalg.vector_norm(sent - g) / torch.linalg.vector_norm(g))
    err, _ = _error(g, sent, p, opt)
    assert plain < 1e-3 and err > 0.05, (plain, err)
    bf16 = g.bfloat16().float()  # bfloat16 keeps float32's range: nothing flushes
    assert _error(g, bf16, p, opt)[0] < 0.01


def test_before_the_optimizers_first_step_adam_divides_by_the_gradient_itself():
    """The first step of Adam is a sign step: a low-rank projection's error there is a full-size step."""
    g = torch.randn(2000, generator=torch.Generator().manual_seed(3))
    p, opt = _adam_state([g], steps=0)
    assert "exp_avg_sq" not in opt.state[p]
    pre = preconditioner([(p, None)], SecondMoments([opt]))
    assert torch.equal(pre.a, torch.zeros(2000))  # no history
    assert torch.allclose(pre.weights(g), 1 / (g.abs().clamp_min(1e-2 * float(g.abs().median())) + 1e-8))
    rounded = torch.where(g.abs() < 0.02, torch.zeros_like(g), g)  # small coordinates rounded to zero
    assert _error(g, rounded, p, opt)[0] < 0.05
    noisy = g + torch.randn(2000, generator=torch.Generator().manual_seed(4))  # errors as large as the gradient
    assert _error(g, noisy, p, opt)[0] > 0.9


def test_the_optimizers_own_second_moment_and_bias_correction_are_read():
    g = torch.randn(100, generator=torch.Generator().manual_seed(5))
    p, opt = _adam_state([g, 2 * g], steps=2, betas=(0.9, 0.99), eps=1e-6)
    pre = preconditioner([(p, None)], SecondMoments([opt]))
    v = opt.state[p]["exp_avg_sq"]
    assert torch.allclose(pre.a, 0.99 * v)
    assert torch.allclose(pre.gain, torch.full((100,), 0.01))
    assert torch.allclose(pre.bias_correction, torch.full((100,), 1 - 0.99**3))  # for the coming third step
    assert torch.allclose(pre.eps, torch.full((100,), 1e-6))
    d = ((0.99 * v + 0.01 * g**2) / (1 - 0.99**3)).sqrt()
    assert torch.allclose(pre.weights(g), 1 / (torch.maximum(d, 1e-2 * d.median()) + 1e-6))


def test_a_coordinate_without_gradient_or_history_does_not_count_and_a_tiny_one_is_bounded():
    """An input that is always zero (the digits' border pixels): its weights have no gradient and no second moment;
    a codec that smears a value onto them moves nothing the loss depends on."""
    g = torch.cat([torch.randn(1000, generator=torch.Generator().manual_seed(6)), torch.zeros(100)])
    p, opt = _adam_state([g], steps=5)
    sent = g.clone()
    sent[1000:] = 1e-3
    assert _error(g, sent, p, opt)[0] == 0.0
    g[1000:] = 1e-12  # nearly dead: weighs at most 1 / (1 % of the median divisor)
    p, opt = _adam_state([g], steps=5)
    err, _ = _error(g, sent, p, opt)
    assert 0 < err < 0.5


def test_optimizers_recognised():
    params = [nn.Parameter(torch.zeros(3)) for _ in range(5)]
    opts = [
        torch.optim.AdamW([params[0]]),
        torch.optim.RMSprop([params[1]]),
        torch.optim.Adagrad([params[2]]),
        torch.optim.SGD([params[3]], lr=0.1),
        torch.optim.Adadelta([params[4]]),
    ]
    moments = SecondMoments(opts)
    assert moments.params == params
    assert [None if m is None else m.key for m in map(moments.moments, params)] == [
        "exp_avg_sq", "square_avg", "sum", None, None
    ]
    assert moments.moments(nn.Parameter(torch.zeros(1))) is None  # not an optimizer's parameter


def test_the_sample_finds_each_coordinate_in_its_gradient():
    shapes = [(7, 5), (3,), (11, 2), (1,)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    for size in (5, 20, 1000):
        sample = BucketSample(flat.numel(), [p.numel() for p in params], size, torch.device("cpu"), seed=1)
        assert sample.indices.numel() == min(size, flat.numel())
        parts = torch.cat([params[i].detach().reshape(-1)[local] for i, local in sample.parts])
        assert torch.equal(sample.gather(flat), parts)


def test_window_blocks_spread_over_the_model_and_stay_within_the_budget():
    shapes = [(64, 8), (64,), (256, 64), (256,), (64, 256), (10, 64), (10,)]
    picked = window_blocks(shapes, budget=4096, blocks=3)
    assert [i for i, _ in picked] == [0, 4, 5]  # first, middle and last of the four matrices
    assert sum(rows * math.prod(shapes[i][1:]) for i, rows in picked) <= 4096
    assert window_blocks([(5,), (3,)], 100, 4) == []  # no matrix: nothing to measure on
    assert window_blocks([(100, 1000)], 10, 2) == [(0, 1)]  # at least one whole row


def _layout(numel, shapes=None):
    from lightning_netsense.codecs import BucketLayout

    return BucketLayout(0, numel, shapes or ((numel,),), 1)


def test_the_shadow_measures_every_candidate_on_a_window_of_real_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    meter = ShadowMeter(budget=8192, blocks=2)
    params = list(model.parameters())
    meter.choose(params)
    assert meter.ready
    codecs = {name: cls() for name, cls in CODECS.items()}
    decisions = [Decision("int8"), Decision("fp16"), Decision("topk", {"density": 0.01}),
                 Decision("powersgd", {"rank": 2, "bits": 32}), Decision("none")]
    for step in range(6):
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        meter.capture(params, [p.grad for p in params])
        meter.measure(codecs, decisions, SecondMoments([opt]))
        opt.step()
    errors = meter.errors
    assert set(errors) == {"int8", "fp16", "topk", "powersgd"}  # the lossy candidates
    assert errors["fp16"] < errors["int8"] < 0.2 < errors["topk"]
    assert 0 < errors["powersgd"] < 2
    # an incomplete window (a bucket that did not arrive) measures nothing
    before = dict(meter.errors)
    meter.capture(params[:1], [params[0].grad])
    meter.measure(codecs, decisions, SecondMoments([opt]))
    assert meter.errors == before


def test_the_shadow_prices_a_mode_with_its_mean_squared_error_over_the_last_steps():
    """A low-rank projection's error swings from step to step; the price is the running mean of ``e**2``."""
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 4))
    params = list(model.parameters())
    codecs = {name: cls() for name, cls in CODECS.items()}
    decisions = [Decision("powersgd", {"rank": 1, "bits": 32}), Decision("topk", {"density": 0.05})]

    def run(smoothing):
        torch.manual_seed(0)
        for p, q in zip(params, nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 4)).parameters()):
            p.data.copy_(q.data)
        meter = ShadowMeter(budget=4096, blocks=2, smoothing=smoothing)
        meter.choose(params)
        seen = []
        for step in range(8):
            x = torch.randn(16, 32, generator=torch.Generator().manual_seed(step))
            model.zero_grad()
            model(x).square().mean().backward()
            meter.capture(params, [p.grad for p in params])
            meter.measure(codecs, decisions, None)
            seen.append(dict(meter.errors))
        return meter, seen

    _, last = run(1.0)  # the last step alone
    meter, smoothed = run(0.25)
    for mode in ("powersgd", "topk"):
        per_step = [s[mode] for s in last]
        assert len(set(per_step)) > 1  # the error changes from step to step
        mean = per_step[0] ** 2
        for e, s in zip(per_step[1:], smoothed[1:]):
            mean += 0.25 * (e * e - mean)
            assert s[mode] == pytest.approx(math.sqrt(mean), rel=1e-5)
    meter.reset()  # a new run or a resume: nothing measured
    assert meter.errors == {}
