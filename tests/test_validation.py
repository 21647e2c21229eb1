"""Every public constructor argument refused at construction, naming it; and the helper that does it.

The table below is the fault matrix of the arguments: per constructor and argument, values of the wrong type, out
of range, nan, inf and unknown names, each of which must raise ``ValueError`` with the argument's name in the
message, in this process, before any process group exists. Values each argument accepts at its edges are listed
too, so that a check cannot pass by refusing everything.
"""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch

from lightning_netsense import AIMDPolicy, Decision, FixedPolicy, NetSenseMonitor, NetSensePolicy, NetSenseStrategy
from lightning_netsense._validation import (
    check_bool,
    check_choice,
    check_instance,
    check_int,
    check_mapping,
    check_number,
    check_timedelta,
    refuse,
)
from lightning_netsense.adaptive import PolicyTuning
from lightning_netsense.codecs import Int8Codec, PowerSGDCodec, TopKCodec
from lightning_netsense.hook import NetSenseState
from lightning_netsense.sensing import LinkEstimator
from lightning_netsense.strategy import DEFAULT_TIMEOUT

NAN, INF = math.nan, math.inf


def _codec(cls):
    return lambda **kw: cls.validate_options(kw)


def _fixed(mode):
    return lambda **kw: FixedPolicy(mode=mode, **kw)


# (constructor label, constructor, argument, {kind: [bad values]}, [accepted edge values])
# Kinds: "type" (wrong type), "range" (out of range), "nan", "inf", "name" (an unknown name where names are looked up)
TABLE = [
    # ------------------------------------------------------------------ NetSenseStrategy
    ("strategy", NetSenseStrategy, "policy", {"type": ["fp16", FixedPolicy]}, [None, FixedPolicy("fp16")]),
    ("strategy", NetSenseStrategy, "error_feedback", {"type": ["yes", 1, None]}, [False]),
    ("strategy", NetSenseStrategy, "warmup_steps",
     {"type": [2.5, "1", True, 2.0], "range": [0, -1], "nan": [NAN], "inf": [INF]}, [1, 3]),
    ("strategy", NetSenseStrategy, "probe_every", {"type": [1.5, True], "range": [-1], "nan": [NAN], "inf": [INF]},
     [0, 5]),
    ("strategy", NetSenseStrategy, "probe_fraction", {"range": [0.0, 1.5], "nan": [NAN], "inf": [INF]}, [1.0]),
    ("strategy", NetSenseStrategy, "estimator", {"type": ["x", {"window_steps": 4}]}, [None, LinkEstimator()]),
    ("strategy", NetSenseStrategy, "find_unused_parameters", {"type": ["yes", 1, None]}, [True]),
    ("strategy", NetSenseStrategy, "static_graph", {"type": ["no", 0]}, [True]),
    ("strategy", NetSenseStrategy, "gradient_as_bucket_view", {"type": ["x", 1]}, [True]),
    ("strategy", NetSenseStrategy, "bucket_cap_mb",
     {"type": ["25", True, [25]], "range": [0, -1, 0.0], "nan": [NAN], "inf": [INF]}, [None, 0.5, 25]),
    ("strategy", NetSenseStrategy, "start_method", {"type": [1, None], "name": ["bogus", "Spawn"]},
     ["popen", "spawn", "fork", "forkserver"]),
    ("strategy", NetSenseStrategy, "process_group_backend",
     {"type": [1, ["gloo"]], "name": ["bogus", "cpu:bogus", "gloo,nccl", ""]},
     [None, "gloo", "nccl", "mpi", "ucc", "GLOO", "cpu:gloo", "cpu:gloo,cuda:nccl"]),
    ("strategy", NetSenseStrategy, "timeout",
     {"type": [30, 30.0, "30s", True], "range": [timedelta(0), timedelta(seconds=-5)], "nan": [NAN], "inf": [INF]},
     [None, timedelta(seconds=1), timedelta(hours=2)]),
    ("strategy", NetSenseStrategy, "accelerator", {"type": ["cpu", 1]}, [None]),
    ("strategy", NetSenseStrategy, "parallel_devices", {"type": ["cpu", ["cpu"], [0], torch.device("cpu")]},
     [None, [torch.device("cpu")] * 2]),
    ("strategy", NetSenseStrategy, "cluster_environment", {"type": ["slurm"]}, [None]),
    ("strategy", NetSenseStrategy, "checkpoint_io", {"type": ["torch"]}, [None]),
    ("strategy", NetSenseStrategy, "precision_plugin", {"type": ["16-mixed"]}, [None]),
    ("strategy", NetSenseStrategy, "ddp_comm_hook", {"type": [print]}, [None]),
    ("strategy", NetSenseStrategy, "ddp_comm_state", {"type": [object()]}, [None]),
    ("strategy", NetSenseStrategy, "ddp_comm_wrapper", {"type": [print]}, [None]),
    # keywords passed on to DistributedDataParallel
    ("strategy", NetSenseStrategy, "broadcast_buffers", {"type": ["x", 1]}, [None, False, True]),
    ("strategy", NetSenseStrategy, "init_sync", {"type": ["yes"]}, [True]),
    ("strategy", NetSenseStrategy, "check_reduction", {"type": ["yes"]}, [False]),
    ("strategy", NetSenseStrategy, "dim", {"type": [1.5, "0", True]}, [0]),
    ("strategy", NetSenseStrategy, "model_averaging_period", {"type": [4, "4"]}, [None]),
    ("strategy", NetSenseStrategy, "device_ids", {"type": [[0]]}, [None]),
    ("strategy", NetSenseStrategy, "process_group", {"type": [object()]}, [None]),
    ("strategy", NetSenseStrategy, "device_mesh", {"type": [object()]}, [None]),
    ("strategy", NetSenseStrategy, "bucket_cap", {"name": [25]}, []),
    ("strategy", NetSenseStrategy, "find_unused_parameter", {"name": [True]}, []),
    # ------------------------------------------------------------------ NetSensePolicy
    ("NetSensePolicy", NetSensePolicy, "modes",
     {"type": ["none", None, 3, [["none"]]], "range": [(), ("fp16", "int8"), ("none", "fp16", "fp16")],
      "name": [("none", "zip"), ("none", "topK")]},
     [("none",), ["none", "fp16"]]),
    ("NetSensePolicy", NetSensePolicy, "topk_density",
     {"type": ["0.1", True], "range": [0.0, 1.5, -0.1], "nan": [NAN], "inf": [INF]}, [1.0, 1e-4, 1]),
    ("NetSensePolicy", NetSensePolicy, "powersgd_rank",
     {"type": [2.5, 2.0, True, "8"], "range": [0, -1], "nan": [NAN], "inf": [INF]}, [1, 64]),
    ("PolicyTuning", PolicyTuning, "powersgd_bits", {"type": [True, "16", NAN], "range": [8, 64, 0]}, [16, 32]),
    ("PolicyTuning", PolicyTuning, "slack", {"type": ["1"], "range": [0.0, -1.0], "nan": [NAN], "inf": [INF]},
     [0.1, 3]),
    ("NetSensePolicy", NetSensePolicy, "max_rel_error", {"range": [0.0, -1.0], "nan": [NAN], "inf": [INF]}, [2.0]),
    ("PolicyTuning", PolicyTuning, "margin", {"range": [1.0, -0.1], "nan": [NAN], "inf": [INF]}, [0.0, 0.99]),
    ("PolicyTuning", PolicyTuning, "patience", {"type": [1.5, True], "range": [0], "nan": [NAN], "inf": [INF]},
     [1]),
    ("PolicyTuning", PolicyTuning, "max_patience", {"type": [64.0], "range": [1], "nan": [NAN], "inf": [INF]},
     [5, 1000]),
    ("PolicyTuning", PolicyTuning, "tolerance", {"range": [-0.1], "nan": [NAN], "inf": [INF]}, [0, 1.0]),
    ("PolicyTuning", PolicyTuning, "confirm", {"type": [1.5], "range": [0], "nan": [NAN], "inf": [INF]}, [1]),
    ("PolicyTuning", PolicyTuning, "urgent", {"range": [1.0, 0.5], "nan": [NAN], "inf": [INF]}, [1.01]),
    ("PolicyTuning", PolicyTuning, "efficiency_floor", {"range": [0.0, 1.5], "nan": [NAN], "inf": [INF]}, [1.0]),
    ("PolicyTuning", PolicyTuning, "max_slowdown", {"type": ["2"], "range": [0.5], "nan": [NAN]}, [1, INF]),
    ("PolicyTuning", PolicyTuning, "prior_errors",
     {"type": [[("topk", 0.5)], "topk", 0.5], "range": [{"topk": -1.0}], "nan": [{"topk": NAN}],
      "inf": [{"topk": INF}], "name": [{"topK": 0.0}, {1: 0.5}, {"zip": 0.1}]},
     [None, {}, {"topk": 0.5, "powersgd": 0.0}]),
    ("NetSensePolicy", NetSensePolicy, "tuning", {"type": [{"patience": 3}, "x"]}, [None, PolicyTuning()]),
    ("PolicyTuning", PolicyTuning, "first_mode", {"type": [1, None], "name": ["zstd", "AUTO"]},
     ["auto", "none", "int8", "powersgd"]),
    # ------------------------------------------------------------------ FixedPolicy and the codecs' options
    ("FixedPolicy", FixedPolicy, "mode", {"type": [3, None, ["fp16"]], "name": ["fp8", "FP16"]},
     ["none", "fp16", "bf16", "int8", "powersgd", "topk"]),
    ("FixedPolicy(topk)", _fixed("topk"), "density",
     {"type": ["0.1", True], "range": [0.0, 1.5, -0.1], "nan": [NAN], "inf": [INF]}, [None, 1.0, 0.01]),
    ("FixedPolicy(powersgd)", _fixed("powersgd"), "rank",
     {"type": [2.5, 2.0, True, "4"], "range": [0], "nan": [NAN], "inf": [INF]}, [None, 1, 16]),
    ("FixedPolicy(powersgd)", _fixed("powersgd"), "bits",
     {"type": [True, 16.5, "16"], "range": [8, 0], "nan": [NAN], "inf": [INF]}, [None, 16, 32]),
    ("FixedPolicy(int8)", _fixed("int8"), "chunk_size",
     {"type": [3.5, 64.0, True], "range": [0, -4], "nan": [NAN], "inf": [INF]}, [None, 1, 4096]),
    ("FixedPolicy(fp16)", _fixed("fp16"), "density", {"name": [0.1]}, [None]),
    ("FixedPolicy(int8)", _fixed("int8"), "rank", {"name": [4]}, [None]),
    ("TopKCodec", _codec(TopKCodec), "density", {"type": ["0.1", True], "range": [0.0, 2.0], "nan": [NAN],
                                                 "inf": [INF]}, [0.5, 1]),
    ("PowerSGDCodec", _codec(PowerSGDCodec), "rank",
     {"type": [2.5, True, "4"], "range": [0], "nan": [NAN], "inf": [INF]}, [1, 8.0]),  # 8.0: from a checkpoint
    ("PowerSGDCodec", _codec(PowerSGDCodec), "bits", {"type": [True, "32"], "range": [8], "nan": [NAN]}, [16, 32.0]),
    ("Int8Codec", _codec(Int8Codec), "chunk_size",
     {"type": [3.5, True, "64"], "range": [0], "nan": [NAN], "inf": [INF]}, [1, 1024.0]),
    ("Int8Codec", _codec(Int8Codec), "density", {"name": [0.1]}, []),
    # ------------------------------------------------------------------ Decision (what a policy of your own returns)
    ("Decision", Decision, "mode", {"type": [5, None], "range": [""]}, ["fp16", "my_codec"]),
    ("Decision(topk)", lambda **kw: Decision("topk", **kw), "options",
     {"type": [5, "density", [("density", 0.1)]], "name": [{1: 0.1}]}, [{}, {"density": 0.1}]),
    # ------------------------------------------------------------------ AIMDPolicy
    ("AIMDPolicy", AIMDPolicy, "initial_density",
     {"type": ["0.01"], "range": [0.0, 1.5, 0.0001], "nan": [NAN], "inf": [INF]}, [1.0, 0.001]),
    ("AIMDPolicy", AIMDPolicy, "decrease", {"type": [True], "range": [0.0, 1.0], "nan": [NAN], "inf": [INF]}, [0.5]),
    ("AIMDPolicy", AIMDPolicy, "increase", {"range": [-0.1, 1.5], "nan": [NAN], "inf": [INF]}, [0, 1]),
    ("AIMDPolicy", AIMDPolicy, "floor", {"range": [0.0, 1.5], "nan": [NAN], "inf": [INF]}, [0.01]),
    ("AIMDPolicy", AIMDPolicy, "threshold", {"type": ["0.9"], "range": [0.0], "nan": [NAN], "inf": [INF]}, [2.0]),
    # ------------------------------------------------------------------ NetSenseState
    ("NetSenseState", NetSenseState, "policy", {"type": ["fp16", NetSensePolicy]}, [None, NetSensePolicy()]),
    ("NetSenseState", NetSenseState, "process_group", {"type": ["x", 0, object()]}, [None]),
    ("NetSenseState", NetSenseState, "error_feedback", {"type": ["no", 0, None]}, [False]),
    ("NetSenseState", NetSenseState, "warmup_steps", {"type": [1.5, True], "range": [0], "nan": [NAN], "inf": [INF]},
     [1, 2]),
    ("NetSenseState", NetSenseState, "estimator", {"type": ["x", LinkEstimator]}, [None, LinkEstimator()]),
    ("NetSenseState", NetSenseState, "probe_every", {"type": [1.5, True], "range": [-1], "nan": [NAN], "inf": [INF]},
     [0, 8]),
    ("NetSenseState", NetSenseState, "probe_fraction",
     {"type": ["0.1", True], "range": [0.0, 1.5], "nan": [NAN], "inf": [INF]}, [1.0, 0.01]),
    # ------------------------------------------------------------------ LinkEstimator
    ("LinkEstimator", LinkEstimator, "window_steps", {"type": [2.5, True], "range": [0], "nan": [NAN], "inf": [INF]},
     [1]),
    ("LinkEstimator", LinkEstimator, "decay", {"type": ["0.7"], "range": [0.0, 1.5], "nan": [NAN], "inf": [INF]},
     [1.0]),
    ("LinkEstimator", LinkEstimator, "min_size_ratio", {"range": [1.0, 0.5], "nan": [NAN], "inf": [INF]}, [1.5]),
    ("LinkEstimator", LinkEstimator, "resolution", {"type": [True], "range": [-1e-3], "nan": [NAN], "inf": [INF]},
     [0]),
    ("LinkEstimator", LinkEstimator, "max_filter_steps", {"type": [1.5], "range": [0], "nan": [NAN], "inf": [INF]},
     [1]),
    ("LinkEstimator", LinkEstimator, "fast_drop", {"type": ["4"], "range": [1.0], "nan": [NAN]}, [1.5, INF]),
    ("LinkEstimator", LinkEstimator, "fast_drop_time", {"range": [-0.1], "nan": [NAN]}, [0, INF]),
    ("LinkEstimator", LinkEstimator, "vouch_fraction",
     {"type": [True, "x"], "range": [0.0, 1.5], "nan": [NAN], "inf": [INF]}, [1.0]),
    # ------------------------------------------------------------------ NetSenseMonitor
    ("NetSenseMonitor", NetSenseMonitor, "logging_interval", {"type": [1, None], "name": ["batch", "Step"]},
     ["step", "epoch"]),
    ("NetSenseMonitor", NetSenseMonitor, "log_every_n_steps",
     {"type": [2.0, True, "10"], "range": [-1], "nan": [NAN], "inf": [INF]}, [None, 0, 50]),
    ("NetSenseMonitor", NetSenseMonitor, "prog_bar", {"type": ["no", 0, None]}, [False]),
    ("NetSenseMonitor", NetSenseMonitor, "summary", {"type": ["no", 1, None]}, [False]),
]

_EXTRA = {("PolicyTuning", "max_patience"): {"patience": 4}}  # a bound that depends on another argument


def _bad_cases():
    for label, make, arg, bad, _ in TABLE:
        for kind, values in bad.items():
            for i, value in enumerate(values):
                yield pytest.param(make, arg, value, id=f"{label}-{arg}-{kind}{i}")


def _good_cases():
    for label, make, arg, _, good in TABLE:
        for i, value in enumerate(good):
            yield pytest.param(make, arg, value, id=f"{label}-{arg}-ok{i}")


def _kwargs(make, arg, value):
    label = next(row[0] for row in TABLE if row[1] is make)
    return {**_EXTRA.get((label, arg), {}), arg: value}


@pytest.mark.parametrize(("make", "arg", "value"), list(_bad_cases()))
def test_bad_argument_is_refused_at_construction_naming_it(make, arg, value):
    with pytest.raises(ValueError) as err:
        make(**_kwargs(make, arg, value))
    assert f"`{arg}`" in str(err.value), f"the message does not name `{arg}`: {err.value}"


@pytest.mark.parametrize(("make", "arg", "value"), list(_good_cases()))
def test_accepted_values_at_the_edges_construct(make, arg, value):
    make(**_kwargs(make, arg, value))


def test_every_public_constructor_argument_is_in_the_table():
    import inspect

    # a row counts for a class if it builds the class itself or a variant labelled after it ("FixedPolicy(topk)")
    rows = {(row[1], row[2]) for row in TABLE} | {(row[0].split("(")[0], row[2]) for row in TABLE}
    for cls in (NetSenseStrategy, NetSensePolicy, PolicyTuning, FixedPolicy, AIMDPolicy, NetSenseState,
                LinkEstimator, NetSenseMonitor, Decision):
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or p.kind is p.VAR_KEYWORD:
                continue
            assert (cls, name) in rows or (cls.__name__, name) in rows, f"{cls.__name__}({name}=...) has no row"
    for codec in (TopKCodec, PowerSGDCodec, Int8Codec):
        for option in codec.default_options:
            assert (codec.__name__, option) in rows, (codec.__name__, option)


def test_unknown_keyword_of_a_fixed_signature_is_pythons_own_type_error():
    # Only NetSenseStrategy takes **kwargs (for DistributedDataParallel) and so looks names up itself; elsewhere
    # Python refuses an unknown keyword, naming it, before any check runs.
    for cls in (NetSensePolicy, PolicyTuning, FixedPolicy, AIMDPolicy, NetSenseState, LinkEstimator, NetSenseMonitor):
        with pytest.raises(TypeError, match="slak"):
            cls(slak=1.0)


def test_an_unknown_ddp_keyword_suggests_the_close_one():
    with pytest.raises(ValueError, match=r"Unknown keyword `bucket_cap`.*Did you mean `bucket_cap_mb`"):
        NetSenseStrategy(bucket_cap=25)


def test_model_averaging_period_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"`model_averaging_period`.*own.*hook"):
        NetSenseStrategy(model_averaging_period=4)


def test_ddp_keywords_are_passed_on_and_refused_defaults_dropped():
    strategy = NetSenseStrategy(broadcast_buffers=False, dim=0, device_ids=None, process_group=None)
    assert strategy._ddp_kwargs["broadcast_buffers"] is False and strategy._ddp_kwargs["dim"] == 0
    # device_ids=None passed on would collide with the device_ids Lightning gives DDP
    assert "device_ids" not in strategy._ddp_kwargs and "process_group" not in strategy._ddp_kwargs


def test_a_message_names_the_argument_the_accepted_range_and_the_value():
    with pytest.raises(ValueError) as err:
        NetSenseStrategy(bucket_cap_mb=math.nan)
    assert str(err.value) == "Expected `bucket_cap_mb` to be a finite number > 0 or None (MiB), but got nan"
    with pytest.raises(ValueError) as err:
        NetSenseStrategy(timeout=30)
    assert "timedelta(seconds=30)" in str(err.value) and "`timeout`" in str(err.value)


# ----------------------------------------------------------------------------- the failure-detection budget


def test_default_failure_detection_budget_is_minutes_not_half_an_hour():
    assert DEFAULT_TIMEOUT == timedelta(minutes=5)
    assert NetSenseStrategy()._timeout == DEFAULT_TIMEOUT
    # what the registered names build (`Trainer(strategy="netsense_ddp")`) gets it too
    from lightning.pytorch import Trainer

    trainer = Trainer(strategy="netsense_ddp", accelerator="cpu", devices=2, logger=False, enable_progress_bar=False)
    assert trainer.strategy._timeout == DEFAULT_TIMEOUT


def test_timeout_overrides_the_budget():
    assert NetSenseStrategy(timeout=timedelta(seconds=12))._timeout == timedelta(seconds=12)
    assert NetSenseStrategy(timeout=None)._timeout is None  # torch's own default for the backend


# ----------------------------------------------------------------------------- the helper


def test_check_int():
    assert check_int("n", 3, low=1, high=3) == 3
    assert check_int("n", None, allow_none=True) is None
    assert check_int("n", 8.0, integral_float=True) == 8 and type(check_int("n", 8.0, integral_float=True)) is int
    for bad in (True, False, 2.5, "3", NAN, INF, None, 8.0):
        with pytest.raises(ValueError, match="`n`"):
            check_int("n", bad)
    for bad in (NAN, INF, 2.5):
        with pytest.raises(ValueError, match="`n`"):
            check_int("n", bad, integral_float=True)
    with pytest.raises(ValueError, match=r"^Expected `n` to be an integer >= 1 \(why\), but got 0$"):
        check_int("n", 0, low=1, why="why")
    with pytest.raises(ValueError, match=r"an integer in \[1, 3\] or None, but got 4$"):
        check_int("n", 4, low=1, high=3, allow_none=True)


def test_check_number():
    assert check_number("x", 1, low=0) == 1.0 and type(check_number("x", 1)) is float
    assert check_number("x", INF, low=1, allow_inf=True) == INF
    assert check_number("x", None, allow_none=True) is None
    assert check_number("x", 0, low=0) == 0.0 and check_number("x", 1, high=1) == 1.0
    for value, kwargs in [
        (NAN, {}), (NAN, {"allow_inf": True}), (INF, {}), (-INF, {}), (True, {}), ("1", {}), (None, {}),
        (0, {"low": 0, "low_open": True}), (1, {"high": 1, "high_open": True}), (-0.1, {"low": 0}), (2, {"high": 1}),
        (-INF, {"low": 0, "allow_inf": True}),
    ]:
        with pytest.raises(ValueError, match="`x`"):
            check_number("x", value, **kwargs)
    with pytest.raises(ValueError, match=r"^Expected `x` to be a finite number in \(0, 1\], but got 2$"):
        check_number("x", 2, low=0, high=1, low_open=True)  # the value as given, not as converted
    with pytest.raises(ValueError, match=r"a number of seconds >= 1 \(math.inf: never\), but got nan$"):
        check_number("x", NAN, low=1, allow_inf=True, unit="of seconds", why="math.inf: never")
    with pytest.raises(ValueError, match=r"a finite number < 0 or None"):
        check_number("x", 0, high=0, high_open=True, allow_none=True)


def test_check_bool_and_choice():
    assert check_bool("b", False) is False
    for bad in ("no", 0, 1, None, "False"):
        with pytest.raises(ValueError, match=r"^Expected `b` to be a bool, but got "):
            check_bool("b", bad)
    assert check_choice("c", 16, (16, 32)) == 16
    assert check_choice("c", 16.0, (16, 32)) == 16.0  # equal values (checkpoints store floats)
    assert check_choice("c", None, ("a",), allow_none=True) is None
    with pytest.raises(ValueError, match=r"^Expected `c` to be one of 0, 1, but got True$"):
        check_choice("c", True, (0, 1))  # a bool is not 1
    with pytest.raises(ValueError, match=r"one of 'a', 'b', but got \['a'\]$"):
        check_choice("c", ["a"], ("a", "b"))


def test_check_instance_and_timedelta():
    assert check_instance("e", LinkEstimator(), LinkEstimator) is not None
    with pytest.raises(ValueError, match=r"^Expected `e` to be a LinkEstimator or None, but got 'x'$"):
        check_instance("e", "x", LinkEstimator, allow_none=True)
    with pytest.raises(ValueError, match=r"to be an int or a float, but got"):
        check_instance("e", "x", (int, float))
    with pytest.raises(ValueError, match=r"^Expected `e` to be a thing, but got 1$"):
        check_instance("e", 1, str, what="a thing")
    assert check_timedelta("t", timedelta(seconds=1)) == timedelta(seconds=1)
    assert check_timedelta("t", None, allow_none=True) is None
    for bad in (timedelta(0), timedelta(seconds=-1), 5, None, "5s"):
        with pytest.raises(ValueError, match="`t`"):
            check_timedelta("t", bad)


def test_check_mapping():
    assert check_mapping("m", {"a": 1}, ("a", "b"), lambda name, v: 2 * v) == {"a": 2}
    assert check_mapping("m", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"^Expected `m` value of 'a' to be a finite number >= 0, but got -1$"):
        check_mapping("m", {"a": -1}, ("a",), lambda name, v: check_number(name, v, low=0))
    with pytest.raises(ValueError, match=r"^Expected the keys of `m` to be among 'a', 'b', but got 'A'$"):
        check_mapping("m", {"A": 1}, ("a", "b"))
    with pytest.raises(ValueError, match=r"^Expected the keys of `m` to be strings, but got 1$"):
        check_mapping("m", {1: 1})
    with pytest.raises(ValueError, match=r"^Expected `m` to be a mapping \(dict\), but got \[\('a', 1\)\]$"):
        check_mapping("m", [("a", 1)])


def test_refuse_and_long_values_are_shortened():
    err = refuse("x", "short", "y" * 500)
    assert isinstance(err, ValueError) and len(str(err)) < 150 and str(err).endswith("...")
