"""NetSenseStrategy: registry names, argument checks, hook registration and equivalence with plain DDP."""

import pickle

import pytest
import torch
from lightning.pytorch import Trainer

import lightning_netsense as ln
from lightning_netsense import FixedPolicy, NetSenseStrategy
from lightning_netsense.hook import NetSenseState


@pytest.mark.parametrize(
    ("name", "start_method"),
    [
        ("netsense_ddp", "popen"),
        ("netsense_ddp_spawn", "spawn"),
        ("netsense_ddp_fork", "fork"),
        ("netsense_ddp_notebook", "fork"),
    ],
)
def test_names_resolve_through_trainer(name, start_method):
    trainer = Trainer(strategy=name, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, NetSenseStrategy)
    assert trainer.strategy._start_method == start_method
    assert trainer.strategy.num_processes == 2


def test_register_strategies_is_idempotent():
    from lightning.pytorch.strategies import StrategyRegistry

    NetSenseStrategy.register_strategies(StrategyRegistry)  # a second import path must not raise
    assert "netsense_ddp" in StrategyRegistry
    assert "ddp" in StrategyRegistry  # the inherited names are untouched


@pytest.mark.parametrize("arg", ["ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"])
def test_own_hook_is_refused(arg):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    with pytest.raises(ValueError, match=arg):
        NetSenseStrategy(**{arg: fp16_compress_hook})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bucket_cap_mb": -1}, "bucket_cap_mb"),
        ({"bucket_cap_mb": True}, "bucket_cap_mb"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"error_feedback": "yes"}, "error_feedback"),
        ({"policy": "fp16"}, "policy"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NetSenseStrategy(**kwargs)


def test_state_pickles_without_process_group():
    state = NetSenseState(policy=FixedPolicy(mode="fp16"), warmup_steps=3)
    state.decision = ln.Decision("fp16")
    clone = pickle.loads(pickle.dumps(state))
    assert clone.process_group is None
    assert clone.decision == state.decision
    assert clone.warmup_steps == 3
    assert isinstance(clone.policy, FixedPolicy) and clone.policy.decision.mode == "fp16"
    assert set(clone.codecs) == set(state.codecs)


def test_strategy_pickles_for_spawn():
    strategy = NetSenseStrategy(policy=FixedPolicy(mode="bf16"), bucket_cap_mb=1)
    clone = pickle.loads(pickle.dumps(strategy))
    assert clone.policy.decision.mode == "bf16"
    assert clone._ddp_kwargs["bucket_cap_mb"] == 1


# ----------------------------------------------------------------------------- 2-rank gloo runs


def _lightning_fit(strategy_name: str, mode: str, max_steps: int, accumulate: int = 1) -> dict:
    """Train the digits MLP on this rank; return the flat parameters and what the hook saw."""
    import lightning.pytorch as pl
    from digits import DigitsClassifier, DigitsDataModule
    from lightning.pytorch.strategies import DDPStrategy

    class _Probe(pl.Callback):
        comm_hook = None

        def __init__(self) -> None:
            self.step_marked: list[bool] = []

        def on_train_batch_end(self, trainer, *args):
            self.comm_hook = trainer.strategy.model._get_ddp_logging_data().get("comm_hook")

        def on_before_backward(self, trainer, *args):
            # the strategy's training_step marked the start of this step's forward (it times the first step)
            state = getattr(trainer.strategy, "netsense_state", None)
            if state is not None:
                self.step_marked.append(state.recorder.started)

    pl.seed_everything(7, verbose=False)
    if strategy_name == "ddp":
        strategy = DDPStrategy(bucket_cap_mb=0.01)
    else:
        strategy = NetSenseStrategy(policy=FixedPolicy(mode=mode), bucket_cap_mb=0.01)
    probe = _Probe()
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[probe],
        limit_val_batches=0,
    )
    model = DigitsClassifier(hidden=64, depth=3, lr=1e-2)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    state = getattr(trainer.strategy, "netsense_state", None)
    return {
        "params": params,
        "comm_hook": probe.comm_hook,
        "steps": None if state is None else state.step,
        "mode_steps": None if state is None else dict(state.mode_steps),
        "step_marked": probe.step_marked,
        "buckets": None if state is None else len(state.last_observation.bucket_bytes),
    }


@pytest.mark.slow
def test_lightning_none_matches_plain_ddp_and_hook_is_registered(dist_pool):
    plain = dist_pool.run(_lightning_fit, "ddp", "none", 6)
    ours = dist_pool.run(_lightning_fit, "netsense", "none", 6)
    for rank in range(2):
        assert ours[rank]["comm_hook"] == "netsense_hook"  # DDP's own logging data names our hook, on CPU
        assert plain[rank]["comm_hook"] in (None, "", "builtin_allreduce")
        assert ours[rank]["buckets"] > 1, "the test needs several buckets"
        assert ours[rank]["steps"] == 6
        # plain allreduce through the hook is DDP's own arithmetic (divide, then sum): bit for bit
        torch.testing.assert_close(ours[rank]["params"], plain[rank]["params"], rtol=0, atol=0)
    torch.testing.assert_close(ours[0]["params"], ours[1]["params"], rtol=0, atol=0)


@pytest.mark.slow
def test_lightning_gradient_accumulation_counts_synchronising_steps(dist_pool):
    out = dist_pool.run(_lightning_fit, "netsense", "fp16", 5, accumulate=2)
    for rank in range(2):
        # the hook runs only on the micro-batch that synchronises: one boundary per optimizer step
        assert out[rank]["steps"] == 5
        assert out[rank]["mode_steps"] == {"fp16": 5}  # a stateless codec runs from the first step
        assert out[rank]["step_marked"] == [True] * 10  # every micro-batch's forward is inside a marked step
    torch.testing.assert_close(out[0]["params"], out[1]["params"], rtol=0, atol=0)


@pytest.mark.slow
def test_spawn_start_method_trains(tmp_path):
    """The real `netsense_ddp_spawn` path: the strategy and its policy cross a pickle into fresh processes."""
    import lightning.pytorch as pl
    from digits import DigitsClassifier, DigitsDataModule

    pl.seed_everything(0, verbose=False)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=NetSenseStrategy(policy=FixedPolicy(mode="bf16"), start_method="spawn"),
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    model = DigitsClassifier(hidden=32, depth=1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer.fit(model, DigitsDataModule(batch_size=16))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert trainer.state.finished
    assert not torch.equal(before, after), "weights came back from the spawned ranks unchanged"


def test_load_checkpoint_passes_lightning_25s_signature_through(tmp_path, monkeypatch):
    """Lightning 2.5's ``Strategy.load_checkpoint`` takes the path alone (2.6 added ``weights_only``)."""
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_netsense import NetSenseStrategy

    path = tmp_path / "c.ckpt"
    torch.save({"netsense": {"step": 3}}, path)

    def load_25(self, checkpoint_path):  # the 2.5 signature
        return torch.load(checkpoint_path, weights_only=True)

    monkeypatch.setattr(DDPStrategy, "load_checkpoint", load_25)
    strategy = NetSenseStrategy()
    assert strategy.load_checkpoint(path) == {"netsense": {"step": 3}}
    assert strategy._pending_state == {"step": 3}  # applied once the state exists (in the worker)
