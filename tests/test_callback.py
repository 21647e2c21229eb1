"""NetSenseMonitor: keys and units, refusals, the summary table, and a 2-rank fit read back from TensorBoard and CSV."""

import csv
import io
import math
import os

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_netsense as ln
from lightning_netsense.callback import (
    LOGGED_KEYS,
    PROGRESS_BAR_KEYS,
    NetSenseMonitor,
    bandwidth_estimate,
    observation_metrics,
)
from lightning_netsense.observation import MODE_CODES, Decision, LinkEstimate, Observation
from lightning_netsense.progress import ModeTotals, summary_table


def _observation(mode="fp16", bandwidth=12.5e6, alpha=0.002, sent=500.0, dense=1000.0) -> Observation:
    return Observation(
        step=5,
        world_size=2,
        decision=Decision(mode),
        bucket_bytes=(1000,),
        backward_time=0.010,
        overlap_time=0.008,
        step_time=0.050,
        comm_time=0.004,
        exposed_comm_time=0.001,
        bytes_sent=sent,
        dense_bytes=dense,
        bytes_in_flight=sent,
        rel_error=0.01,
        residual_norm=0.5,
        update_error=0.2,
        sign_flips=0.03,
        link=LinkEstimate(alpha=alpha, bandwidth=bandwidth, samples=3),
    )


def test_docstring_lists_every_key_and_mode_code():
    doc = NetSenseMonitor.__doc__
    for key in LOGGED_KEYS:
        assert f"``{key}``" in doc, key
    for name, code in MODE_CODES.items():
        assert f"{code} ``{name}``" in doc, (name, code)
    for key in PROGRESS_BAR_KEYS:
        assert f"``{key}``" in doc, key


def test_observation_metrics_units():
    m = observation_metrics(_observation())
    assert set(m) == set(LOGGED_KEYS) - {"netsense/rel_error"}
    assert m["netsense/bandwidth_mbps"] == pytest.approx(100.0)  # 12.5 MB/s = 100 Mbit/s
    assert m["netsense/latency_ms"] == pytest.approx(2.0)
    assert m["netsense/mode"] == MODE_CODES["fp16"]
    assert m["netsense/compression_ratio"] == pytest.approx(2.0)
    assert m["netsense/bytes_sent"] == 500.0 and m["netsense/dense_bytes"] == 1000.0
    assert m["netsense/comm_time_ms"] == pytest.approx(4.0)
    assert m["netsense/exposed_comm_ms"] == pytest.approx(1.0)
    assert m["netsense/backward_time_ms"] == pytest.approx(10.0)
    assert m["netsense/step_time_ms"] == pytest.approx(50.0)
    assert m["netsense/residual_norm"] == 0.5
    assert m["netsense/update_error"] == 0.2 and m["netsense/sign_flips"] == 0.03


def test_observation_metrics_unknown_mode_and_unmeasured_link():
    m = observation_metrics(_observation(mode="mycodec", bandwidth=math.inf))
    assert m["netsense/mode"] == -1
    assert "netsense/bandwidth_mbps" not in m  # nothing measured yet: not logged as inf
    assert all(math.isfinite(v) for v in m.values())


def test_bandwidth_falls_back_to_delivery_rate_when_fit_is_unbounded():
    # the fit found no transfer term (B = inf) but collectives were measured: report the best delivery rate
    link = LinkEstimate(alpha=1e-4, bandwidth=math.inf, max_bandwidth=25e6, min_rtt=1e-4, samples=4)
    assert bandwidth_estimate(link) == 25e6
    assert bandwidth_estimate(LinkEstimate(bandwidth=5e6, max_bandwidth=25e6)) == 5e6
    assert not math.isfinite(bandwidth_estimate(LinkEstimate()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logging_interval": "batch"}, "logging_interval"),
        ({"log_every_n_steps": -1}, "log_every_n_steps"),
        ({"log_every_n_steps": 2.0}, "log_every_n_steps"),
        ({"log_every_n_steps": True}, "log_every_n_steps"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NetSenseMonitor(**kwargs)


def test_refuses_trainer_without_logger():
    trainer = Trainer(accelerator="cpu", devices=2, strategy=ln.NetSenseStrategy(), logger=False)
    with pytest.raises(MisconfigurationException, match=r"logger=False"):
        NetSenseMonitor().setup(trainer, None, "fit")


def test_refuses_other_strategy(tmp_path):
    trainer = Trainer(accelerator="cpu", devices=1, logger=CSVLogger(tmp_path))
    with pytest.raises(MisconfigurationException, match=r"needs `NetSenseStrategy`.*SingleDeviceStrategy"):
        NetSenseMonitor().setup(trainer, None, "fit")
    NetSenseMonitor().setup(trainer, None, "validate")  # only fit is checked: nothing is logged elsewhere


def test_summary_table_rows_and_totals():
    from rich.console import Console

    totals = {"fp16": ModeTotals(), "none": ModeTotals()}
    totals["none"].add(seconds=1.0, bytes_sent=4e6, dense_bytes=4e6, rel_error=0.0)
    for _ in range(3):
        totals["fp16"].add(seconds=1.0, bytes_sent=2e6, dense_bytes=4e6, rel_error=0.002)
    totals["fp16"].add(seconds=0.0, bytes_sent=0.0, dense_bytes=0.0, rel_error=math.nan)  # not poisoning the mean
    out = io.StringIO()
    Console(file=out, width=200).print(summary_table(totals))
    text = out.getvalue()
    lines = text.splitlines()
    row_none = next(line for line in lines if "none (0)" in line)
    row_fp16 = next(line for line in lines if "fp16 (1)" in line)
    assert lines.index(row_none) < lines.index(row_fp16)  # weakest compression first
    assert "25.0%" in row_none and "75.0%" in row_fp16
    assert "1.00x" in row_none and "2.00x" in row_fp16
    assert f"{0.006 / 4:.1e}" in row_fp16  # mean error over the 4 fp16 steps
    total = next(line for line in lines if "total" in line)
    assert "5" in total and "10.00" in total and "16.00" in total and "1.60x" in total


def test_monitor_state_loads_with_weights_only(tmp_path):
    monitor = NetSenseMonitor()
    monitor.totals = {"none": ModeTotals(2, 0.5, 10.0, 10.0, 0.0), "fp16": ModeTotals(3, 0.7, 6.0, 12.0, 0.01)}
    torch.save({"callbacks": {monitor.state_key: monitor.state_dict()}}, tmp_path / "s.ckpt")
    loaded = torch.load(tmp_path / "s.ckpt", weights_only=True)
    other = NetSenseMonitor()
    other.load_state_dict(loaded["callbacks"][monitor.state_key])
    assert other.totals == monitor.totals


# ----------------------------------------------------------------------------- 2-rank gloo run

_COLLECTIVES = ("barrier", "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "all_gather_object")


class _CountingMonitor(NetSenseMonitor):
    """Counts the collectives the monitor itself issues in each ``on_train_batch_end``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, *args, **kwargs):
        import torch.distributed as dist

        count = [0]
        saved = {name: getattr(dist, name) for name in _COLLECTIVES}

        def counting(fn):
            def wrapped(*a, **k):
                count[0] += 1
                return fn(*a, **k)

            return wrapped

        for name, fn in saved.items():
            setattr(dist, name, counting(fn))
        try:
            super().on_train_batch_end(trainer, *args, **kwargs)
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)
        self.calls.append((trainer.global_step, count[0]))


class _PlainFirstFp16(ln.FixedPolicy):
    """fp16 from the second step: a mode change for the text summary to show (FixedPolicy compresses from the first)."""

    def __init__(self) -> None:
        super().__init__(mode="fp16")

    def first_decision(self, allowed, world_size):
        return ln.Decision("none")


def _fit_with_monitor(root: str, max_steps: int, every: int) -> dict:
    import lightning.pytorch as pl
    from digits import DigitsClassifier, DigitsDataModule
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    class _Probe(pl.Callback):
        def __init__(self):
            self.local_errors: list[tuple[int, float]] = []
            self.bar: dict = {}

        def on_train_batch_end(self, trainer, pl_module, *args):
            state = trainer.strategy.netsense_state
            self.local_errors.append((trainer.global_step, state.last_local.rel_error))
            self.bar = dict(trainer.progress_bar_callback.get_metrics(trainer, pl_module))

    pl.seed_everything(3, verbose=False)
    monitor, probe = _CountingMonitor(), _Probe()  # cadence: the Trainer's log_every_n_steps
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ln.NetSenseStrategy(policy=_PlainFirstFp16()),
        max_steps=max_steps,
        log_every_n_steps=every,
        logger=[
            TensorBoardLogger(root, name="tb", version=0),
            CSVLogger(root, name="csv", version=0),
        ],
        callbacks=[monitor, probe, RichProgressBar()],
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(DigitsClassifier(hidden=32, depth=2), DigitsDataModule(batch_size=16))
    return {
        "calls": monitor.calls,
        "local_errors": probe.local_errors,
        "bar": {k: float(v) for k, v in probe.bar.items() if k in PROGRESS_BAR_KEYS},
        "totals": {m: t.to_dict() for m, t in monitor.totals.items()},
        "mode_steps": dict(trainer.strategy.netsense_state.mode_steps),
    }


@pytest.mark.slow
def test_two_rank_fit_logs_every_key_to_tensorboard_and_csv(dist_pool, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    max_steps, every = 6, 2
    out = dist_pool.run(_fit_with_monitor, str(tmp_path), max_steps, every)
    logged_steps = list(range(every, max_steps + 1, every))  # in global_step at batch end: 2, 4, 6
    logged_x = [s - 1 for s in logged_steps]  # x axis: the 0-based step index, as Lightning's own metrics

    # no collective of the monitor's own, except on logged steps (the torchmetrics sync of the error)
    for rank in range(2):
        for step, count in out[rank]["calls"]:
            assert (count > 0) == (step in logged_steps), (rank, step, count)
    assert [s for s, _ in out[0]["calls"]] == list(range(1, max_steps + 1))

    # TensorBoard, read with tensorboard's own reader: every key, one value per logged step
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    acc.Reload()
    scalars = {key: acc.Scalars(key) for key in LOGGED_KEYS}
    for key, events in scalars.items():
        assert [e.step for e in events] == logged_x, key
    # the policy's first step runs plain DDP (its `first_decision`), fp16 from the second on
    assert [e.value for e in scalars["netsense/mode"]] == [MODE_CODES["fp16"]] * 3
    ratios = [e.value for e in scalars["netsense/compression_ratio"]]
    assert all(r == pytest.approx(2.0, rel=0.01) for r in ratios)
    sent = [e.value for e in scalars["netsense/bytes_sent"]]
    dense = [e.value for e in scalars["netsense/dense_bytes"]]
    assert all(s == pytest.approx(d / 2, rel=0.01) for s, d in zip(sent, dense))
    # error: mean over both ranks and over the steps since the previous logged step
    for i, step in enumerate(logged_steps):
        window = range(step - every + 1, step + 1)
        local = [e for rank in range(2) for s, e in out[rank]["local_errors"] if s in window]
        expected = sum(local) / len(local)
        assert scalars["netsense/rel_error"][i].value == pytest.approx(expected, rel=1e-5, abs=1e-12)
    # logged step 2 averages step 1 (plain: error 0) and step 2 (fp16)
    assert 0 < scalars["netsense/rel_error"][0].value < scalars["netsense/rel_error"][1].value
    # the mode's name as text, once per change
    text_tag = "netsense/mode/text_summary"
    assert text_tag in acc.Tags()["tensors"]
    texts = acc.Tensors(text_tag)
    assert [t.step for t in texts] == [0, 1]  # first step in "none", fp16 from the second step: one change
    assert b"fp16" in texts[1].tensor_proto.string_val[0]

    # CSV: the same keys at the same steps
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("netsense/mode")]
    assert [int(r["step"]) for r in rows] == logged_x
    # the same x as Lightning's own step metrics (train_loss is logged by the model on every step here)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        loss_steps = {int(r["step"]) for r in csv.DictReader(f) if r.get("train_loss")}
    assert set(logged_x) <= loss_steps
    for key in LOGGED_KEYS:
        assert [float(r[key]) for r in rows] == pytest.approx([e.value for e in scalars[key]], rel=1e-6), key

    # the bar shows bandwidth and mode (rank 0 draws it); the summary's totals match the strategy's own counts
    bar = out[0]["bar"]
    assert set(bar) == set(PROGRESS_BAR_KEYS)
    assert bar["netsense_mode"] == MODE_CODES["fp16"] and bar["netsense_Mbps"] > 0
    for rank in range(2):
        totals = out[rank]["totals"]
        assert {m: t["steps"] for m, t in totals.items()} == out[rank]["mode_steps"] == {"none": 1, "fp16": 5}
        assert totals["fp16"]["dense_bytes"] == pytest.approx(2 * totals["fp16"]["bytes_sent"], rel=0.01)
    assert os.path.isdir(tmp_path / "tb" / "version_0")


# ----------------------------------------------------------------------------- cadence, without processes


class _RecordingLogger:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []
        self.experiment = type("Exp", (), {"add_text": lambda self, tag, text, global_step: None})()

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def _drive(monitor: NetSenseMonitor, steps: int, trainer_every: int, epoch_every: int | None = None):
    """Feed ``steps`` boundaries (errors 0.1, 0.2, ...) through the monitor's hooks with stand-in objects."""
    from types import SimpleNamespace

    from lightning_netsense.observation import Measurements

    logger = _RecordingLogger()
    state = SimpleNamespace(step=0, last_observation=None, last_local=None)
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(netsense_state=state),
        loggers=[logger],
        log_every_n_steps=trainer_every,
        global_step=0,
        is_global_zero=True,
        progress_bar_callback=None,
    )
    module = SimpleNamespace(device=torch.device("cpu"))
    monitor.on_train_start(trainer, module)
    for i in range(1, steps + 1):
        state.step, trainer.global_step = i, i
        state.last_observation = _observation(mode="fp16" if i > 2 else "none")
        state.last_local = Measurements(rel_error=i / 10)
        monitor.on_train_batch_end(trainer, module, None, None, i - 1)
        monitor.on_train_batch_end(trainer, module, None, None, i - 1)  # no new boundary: ignored
        if epoch_every and i % epoch_every == 0:
            monitor.on_train_epoch_end(trainer, module)
    return logger.logged


@pytest.mark.parametrize(("own", "trainer_every", "expected"), [(None, 3, [3, 6]), (2, 50, [2, 4, 6]), (0, 1, [])])
def test_step_cadence_and_windowed_error(own, trainer_every, expected):
    logged = _drive(NetSenseMonitor(log_every_n_steps=own), 7, trainer_every)
    # logged after optimizer steps `expected` (global_step), at x = global_step - 1 like Lightning's own metrics
    assert [s for s, _ in logged] == [s - 1 for s in expected]
    previous = 0
    for (_, metrics), step in zip(logged, expected):
        assert set(metrics) == set(LOGGED_KEYS)
        window = [i / 10 for i in range(previous + 1, step + 1)]
        assert metrics["netsense/rel_error"] == pytest.approx(sum(window) / len(window))
        previous = step


def test_epoch_interval_logs_once_per_epoch_with_the_epoch_mean():
    monitor = NetSenseMonitor(logging_interval="epoch", log_every_n_steps=1)
    logged = _drive(monitor, 6, 1, epoch_every=3)
    assert [s for s, _ in logged] == [2, 5]
    assert logged[1][1]["netsense/rel_error"] == pytest.approx((0.4 + 0.5 + 0.6) / 3)
    assert {m: t.steps for m, t in monitor.totals.items()} == {"none": 2, "fp16": 4}
