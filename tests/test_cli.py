"""examples/cli.py + examples/configs/*.yaml: every config parses into the objects it names, and runs on 2 ranks."""

import glob
import os

import pytest

import lightning_netsense as ln
from lightning_netsense.callback import NetSenseMonitor

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")
ALL_CONFIGS = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))

# what each config must build: the policy class and, for a fixed policy, its mode
EXPECTED = {
    "netsense_ddp.yaml": (None, None),  # by name: the strategy's default policy, whatever it is
    "netsense_fixed_fp16.yaml": (ln.FixedPolicy, "fp16"),
    "netsense_adaptive.yaml": ("NetSensePolicy", None),
}


def test_every_config_is_covered():
    assert {os.path.basename(p) for p in ALL_CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=os.path.basename)
def test_config_builds_strategy_policy_and_monitor(path, tmp_path, monkeypatch):
    from cli import cli_main

    monkeypatch.chdir(tmp_path)  # the configs log to ./lightning_logs
    cli = cli_main(["--config", path], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ln.NetSenseStrategy)
    assert strategy.num_processes == 2 and strategy.root_device.type == "cpu"
    assert sum(isinstance(c, NetSenseMonitor) for c in cli.trainer.callbacks) == 1
    policy_cls, mode = EXPECTED[os.path.basename(path)]
    if isinstance(policy_cls, str):
        assert type(strategy.policy).__name__ == policy_cls
    elif policy_cls is not None:
        assert type(strategy.policy) is policy_cls
    if mode is not None:
        assert strategy.policy.decision.mode == mode
    if os.path.basename(path) == "netsense_adaptive.yaml":  # the tuning object and the probes, from YAML
        assert strategy.policy.tuning.patience == 5 and strategy.policy.modes == ("none", "fp16", "int8", "topk")
        assert strategy._netsense_config["probe_every"] == 2


def _run_cli(config: str, root: str, max_steps: int) -> dict:
    from cli import cli_main

    cli = cli_main(
        [
            "fit",
            "--config",
            config,
            f"--trainer.max_steps={max_steps}",
            "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
            "--trainer.logger.init_args.version=0",
            "--model.hidden=32",
            "--data.batch_size=16",
        ]
    )
    trainer = cli.trainer
    state = trainer.strategy.netsense_state
    return {
        "strategy": type(trainer.strategy).__name__,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "mode_steps": dict(state.mode_steps),
        "log_dir": trainer.log_dir,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "mode_steps"),
    [("netsense_ddp.yaml", None), ("netsense_fixed_fp16.yaml", {"fp16": 3})],
)
def test_config_runs_on_two_ranks(dist_pool, tmp_path, name, mode_steps):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = dist_pool.run(_run_cli, os.path.join(CONFIGS, name), str(tmp_path), 3)
    for rank in range(2):
        assert out[rank]["strategy"] == "NetSenseStrategy" and out[rank]["world_size"] == 2
        assert out[rank]["global_step"] == 3
        assert sum(out[rank]["mode_steps"].values()) == 3
        if mode_steps is not None:
            assert out[rank]["mode_steps"] == mode_steps
    log_dir = out[0]["log_dir"]
    # LightningCLI saved the resolved config next to the logs; the monitor logged through the config's logger
    with open(os.path.join(log_dir, "config.yaml")) as f:
        assert "lightning_netsense.callback.NetSenseMonitor" in f.read()
    acc = EventAccumulator(log_dir)
    acc.Reload()
    assert [e.step for e in acc.Scalars("netsense/mode")] == [0, 1, 2]
