"""Checkpoint state: the decision state (step, decision, estimator, policy) and the monitor's totals survive
``trainer.fit(ckpt_path=...)``, load with ``torch.load(weights_only=True)``, and residuals restart from zero."""

import os
from typing import Any

import pytest
import torch

import lightning_netsense as ln
from lightning_netsense import Decision, Policy
from lightning_netsense.callback import NetSenseMonitor
from lightning_netsense.hook import NetSenseState


class CountingPolicy(Policy):
    """fp16 every step; remembers how often it decided and which observation steps it saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[int] = []

    def candidates(self):
        return (Decision("fp16"),)

    def decide(self, observation):
        self.calls += 1
        self.seen.append(observation.step)
        return Decision("fp16")

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.seen = [int(s) for s in state["seen"]]


def test_state_dict_round_trips_through_weights_only_load(tmp_path):
    state = NetSenseState(policy=CountingPolicy())
    state.estimator.update([1e5, 2e5], [0.011, 0.021])
    state.estimator.update([1e5], [0.012])
    state.policy.calls, state.policy.seen = 2, [0, 1]
    state.step, state.decision = 2, Decision("fp16")
    state.mode_steps = {"none": 2}
    state.total_bytes_sent = state.total_dense_bytes = 3e5
    state.ledger.errors, state.ledger.costs = {"fp16": 3e-4}, {"fp16": 2e-9}
    torch.save({"netsense": state.state_dict()}, tmp_path / "s.ckpt")
    loaded = torch.load(tmp_path / "s.ckpt", weights_only=True)["netsense"]

    fresh = NetSenseState(policy=CountingPolicy())
    fresh.load_state_dict(loaded)
    assert fresh.state_dict() == state.state_dict()
    assert fresh.estimator.compute() == state.estimator.compute()
    assert fresh.policy.seen == [0, 1] and fresh.decision == Decision("fp16")


# ----------------------------------------------------------------------------- 2-rank gloo run


def _train_then_resume(root: str, first_steps: int, total_steps: int) -> dict:
    import lightning.pytorch as pl
    from digits import DigitsClassifier, DigitsDataModule
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    class _Probe(pl.Callback):
        def __init__(self, monitor):
            self.monitor = monitor
            self.at_start: dict = {}
            self.first_observed_step: int | None = None

        def on_train_start(self, trainer, pl_module):
            state = trainer.strategy.netsense_state
            self.at_start = {
                "step": state.step,
                "decision": state.decision.to_dict(),
                "estimator": state.estimator.state_dict(),
                "policy": state.policy.state_dict(),
                "mode_steps": dict(state.mode_steps),
                "residual_norm": state.feedback.norm(),
                "totals": self.monitor.state_dict(),
            }

        def on_train_batch_end(self, trainer, *args):
            if self.first_observed_step is None:
                self.first_observed_step = trainer.strategy.netsense_state.last_observation.step

    def trainer(max_steps, callbacks, checkpointing):
        return Trainer(
            accelerator="cpu",
            devices=2,
            # two warm-up steps (the default is one): the resumed run must run all of them again
            strategy=ln.NetSenseStrategy(policy=CountingPolicy(), warmup_steps=2),
            max_steps=max_steps,
            logger=CSVLogger(root, name="logs", version=0),
            callbacks=callbacks,
            enable_checkpointing=checkpointing,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )

    pl.seed_everything(5, verbose=False)
    dirpath = os.path.join(root, "ckpt")
    monitor = NetSenseMonitor(summary=False)
    ckpt = ModelCheckpoint(dirpath=dirpath, filename="resume", every_n_train_steps=first_steps, save_top_k=-1)
    first = trainer(first_steps, [monitor, ckpt], True)
    first.fit(DigitsClassifier(hidden=32, depth=2), DigitsDataModule(batch_size=16))
    state = first.strategy.netsense_state
    saved = {
        "path": os.path.join(dirpath, "resume.ckpt"),
        "state": state.state_dict(),
        "residual_norm": state.feedback.norm(),
        "totals": monitor.state_dict(),
    }

    monitor = NetSenseMonitor(summary=False)
    probe = _Probe(monitor)
    second = trainer(total_steps, [monitor, probe], False)
    second.fit(DigitsClassifier(hidden=32, depth=2), DigitsDataModule(batch_size=16), ckpt_path=saved["path"])
    state = second.strategy.netsense_state
    return {
        "saved": saved,
        "at_start": probe.at_start,
        "first_observed_step": probe.first_observed_step,
        "end": {"step": state.step, "policy": state.policy.state_dict(), "mode_steps": dict(state.mode_steps)},
        "totals": {m: t.steps for m, t in monitor.totals.items()},
        "global_step": second.global_step,
    }


@pytest.mark.slow
def test_resume_continues_the_decision_state(dist_pool, tmp_path):
    first, total = 4, 7
    out = dist_pool.run(_train_then_resume, str(tmp_path), first, total)
    saved = out[0]["saved"]

    # the file rank 0 wrote holds plain data only, and exactly the state the ranks had when it was written
    ckpt = torch.load(saved["path"], weights_only=True)
    assert ckpt["netsense"] == saved["state"]
    assert ckpt["netsense"]["step"] == first
    # the policy is consulted from the last warm-up step on (not while the next step is forced plain)
    consulted = list(range(1, first))
    assert ckpt["netsense"]["policy"] == {"calls": len(consulted), "seen": consulted}
    assert ckpt["callbacks"][NetSenseMonitor().state_key] == saved["totals"]

    for rank in range(2):
        r = out[rank]
        start = r["at_start"]
        # restored before the first resumed step, on every rank (checkpoints are read by all ranks)
        assert start["step"] == first
        assert start["decision"] == saved["state"]["decision"] == {"mode": "fp16", "options": {}}
        assert start["estimator"] == saved["state"]["estimator"] and start["estimator"]["steps"]
        assert start["policy"] == saved["state"]["policy"]
        assert start["mode_steps"] == {"none": 2, "fp16": first - 2}
        assert start["totals"] == saved["totals"]
        # lossy residuals are per rank: not in the checkpoint, reset on resume
        assert r["saved"]["residual_norm"] > 0 and start["residual_norm"] == 0.0
        # and training continues from there: the step counter, the policy's memory, the monitor's totals
        assert r["first_observed_step"] == first
        assert r["global_step"] == total
        assert r["end"]["step"] == total
        # after the resume the warm-up runs again (a fresh DDP wrapper rebuilds its buckets): step `first`'s
        # boundary precedes a forced plain step, so the policy is next consulted at `first + 1`
        consulted = list(range(1, first)) + list(range(first + 1, total))
        assert r["end"]["policy"] == {"calls": len(consulted), "seen": consulted}
        assert r["end"]["mode_steps"] == r["totals"]
        assert sum(r["totals"].values()) == total and r["totals"]["fp16"] > first - 2


def test_a_checkpoint_of_another_policy_leaves_this_policys_state_alone():
    """The policy state a checkpoint holds belongs to the class that wrote it; another one starts afresh (a strict
    custom policy would raise on keys it does not know)."""
    from lightning_netsense import FixedPolicy

    writer = NetSenseState(policy=CountingPolicy())
    writer.policy.calls = 7
    writer.decision = Decision("fp16")
    saved = writer.state_dict()
    assert saved["policy_class"] == "CountingPolicy"

    class StrictPolicy(FixedPolicy):
        def load_state_dict(self, state):
            raise KeyError("not mine")

    reader = NetSenseState(policy=StrictPolicy(mode="int8"))
    reader.load_state_dict(saved)  # no KeyError: not handed to it
    assert reader.step == saved["step"] and reader.decision == Decision("none")
