"""One rank of a Lightning run with ``NetSenseStrategy``, started as its own process by ``tests/test_faults.py``.

The rank joins its group as an externally launched one (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``, as a cluster launcher sets them), trains the digits MLP and, after each step, writes the step number
to the file ``<beacon><rank>`` (so the test knows when to kill or freeze a rank) and sleeps ``--step-sleep`` seconds
(so that the run idles instead of taking the cores). ``--ckpt-in`` resumes from a checkpoint, ``--ckpt-out`` writes
one at the end, ``--result`` gets a JSON summary of what the run's state was at its start and end.

    python tests/fault_worker.py --rank 0 --world-size 2 --port 29500 --timeout 10 --steps 1000 --beacon /tmp/beacon
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))


def _policy(name: str):
    from lightning_netsense import AIMDPolicy, FixedPolicy, NetSensePolicy

    return {"netsense": NetSensePolicy, "fp16": lambda: FixedPolicy(mode="fp16"), "aimd": AIMDPolicy}[name]()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=None, help="process-group timeout, s (default: the strategy's)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--policy", default="netsense", choices=("netsense", "fp16", "aimd"))
    p.add_argument("--beacon", default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--ckpt-in", default=None)
    p.add_argument("--ckpt-out", default=None)
    p.add_argument("--result", default=None)
    args = p.parse_args(argv)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(args.port),
        WORLD_SIZE=str(args.world_size),
        RANK=str(args.rank),
        LOCAL_RANK=str(args.rank),
        NODE_RANK="0",
        PL_DISABLE_FORK="1",
    )
    import lightning.pytorch as pl
    import torch
    from digits import DigitsClassifier, DigitsDataModule

    from lightning_netsense import NetSenseStrategy

    torch.set_num_threads(1)

    class _Beacon(pl.Callback):
        def __init__(self) -> None:
            self.at_start: dict = {}

        def on_train_start(self, trainer, pl_module):
            state = trainer.strategy.netsense_state
            self.at_start = {"step": state.step, "global_step": trainer.global_step,
                             "decision": state.decision.to_dict(), "mode_steps": dict(state.mode_steps)}

        def on_train_batch_end(self, trainer, *rest):
            if args.beacon:
                path = f"{args.beacon}{args.rank}"
                with open(path + ".tmp", "w") as f:
                    f.write(str(trainer.global_step))
                os.replace(path + ".tmp", path)
            if args.step_sleep:
                time.sleep(args.step_sleep)

    strategy_kwargs = {} if args.timeout is None else {"timeout": timedelta(seconds=args.timeout)}
    beacon = _Beacon()
    pl.seed_everything(3, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.world_size,
        strategy=NetSenseStrategy(policy=_policy(args.policy), **strategy_kwargs),
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[beacon],
    )
    model = DigitsClassifier(hidden=32, depth=2)
    trainer.fit(model, DigitsDataModule(batch_size=16), ckpt_path=args.ckpt_in)
    if args.ckpt_out:
        trainer.save_checkpoint(args.ckpt_out)
    if args.result and args.rank == 0:
        state = trainer.strategy.netsense_state
        with open(args.result, "w") as f:
            json.dump({"at_start": beacon.at_start, "step": state.step, "global_step": trainer.global_step,
                       "mode_steps": dict(state.mode_steps), "world_size": trainer.world_size,
                       "finite": all(bool(torch.isfinite(q).all()) for q in model.parameters())}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
