"""One benchmark job on one rank, through ``lightning.Trainer``: the module, the data, the clock and the agreement.

``bench_worker.py`` keeps the process (and its process group) alive across jobs; every job builds a fresh workload,
strategy (``contenders.build_strategy``) and Trainer, so every contender runs the product path: the Trainer's fit
loop, the strategy's ``training_step`` / ``pre_backward`` / ``post_backward`` / ``optimizer_step``, and its hook.

:class:`BenchClock` is the only callback:

1. ``on_train_start`` (DDP has wrapped the model and broadcast its weights on the unshaped link): write
   ``ready_<job>_<rank>``, wait for ``go_<job>`` while the driver puts the link into the trace's starting state,
   then start the clock and evaluate at step 0;
2. ``on_train_batch_end`` (after the optimizer step): record the step's training clock (wall time since go minus
   evaluation), wall time, loss and, for ``NetSenseStrategy``, the mode that ran, the link estimate, the hook's
   wire bytes and the bandwidth probe of the boundary (``state.probes.last``). Then agree with the other rank in
   one 2-float ``all_reduce``: stop (the time cap) and evaluate (every ``eval_every`` steps, or once
   ``eval_every_s`` training seconds passed). A rank that stopped alone would leave the other in a collective, so
   both decide on the same numbers and set ``trainer.should_stop`` together. Evaluation runs outside the
   training clock; with ``stop_at_target`` the ranks agree (outside the clock) to stop once it reached the target.

The Trainer has every overhead of its own turned off (progress bar, logger, checkpointing, sanity check, model
summary), so that contenders differ in their strategy only.
"""

from __future__ import annotations

import os
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["BenchClock", "BenchModule", "reached", "run_job"]


class BenchModule(L.LightningModule):
    """A workload as a LightningModule: its model, loss and optimizer (``workloads.Workload``)."""

    def __init__(self, work: Any) -> None:
        super().__init__()
        self.net = work.model
        self._work = work

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self._work.loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._work.make_optimizer(self.net)


class _Batches(IterableDataset):
    """The workload's infinite iterator of this rank's batches (already batched, already sharded)."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return self.batches


def reached(value: float, target: float, metric: str) -> bool:
    """Whether an evaluation ``value`` meets ``target``: accuracy at or above it, loss at or below it."""
    return value <= target if metric == "loss" else value >= target


def _wait_for(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.005)
    return False


class BenchClock(Callback):
    """Start on the driver's go, time every step, agree on stopping and evaluating, evaluate outside the clock.

    Args:
        job: the job (``steps``, ``cap_s``, ``eval_every``, ``eval_every_s``, ``target``, ``stop_at_target``).
        rank: this process's rank.
        control: the driver's control folder (``ready_*`` / ``go_*`` files).
        evaluate: quality of a model on the held-out split, or ``None`` (throughput workloads).
        metric: ``"accuracy"`` or ``"loss"``.
        synced: whether the ranks train one model (every contender but the ideal) and must agree.
        sent_bytes: reads the bytes this process has sent so far (read at go and at the end of training).
    """

    def __init__(self, job: dict[str, Any], rank: int, control: str, evaluate: Any, metric: str,
                 synced: bool, sent_bytes: Any = None) -> None:
        self.job, self.rank, self.control = job, rank, control
        self.evaluate_fn, self.metric, self.synced = evaluate, metric, synced
        self.sent_bytes = sent_bytes
        self.bytes_sent = 0
        self.steps: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.stop_reason = "steps"
        self.t_go = self.t_ready = self.t_end = 0.0
        self._t0 = 0.0
        self._excluded = 0.0  # evaluation seconds (and their agreement), outside the training clock
        self._flag = torch.zeros(2)
        self._eval_every_s = float(job.get("eval_every_s") or float("inf"))

    # ------------------------------------------------------------------ clock
    def _train_s(self) -> float:
        return time.perf_counter() - self._t0 - self._excluded

    def _evaluate(self, trainer: Any, module: BenchModule, step: int) -> bool:
        """Evaluate (outside the clock); True when the ranks agree that the target is met and they should stop."""
        if self.evaluate_fn is None:
            return False
        t = time.perf_counter()
        train = t - self._t0 - self._excluded
        value = self.evaluate_fn(module.net)
        self.evals.append({"step": step, "train_s": train, "value": value})
        stop = False
        target = self.job.get("target")
        if self.job.get("stop_at_target") and target is not None:
            flag = torch.tensor([1.0 if reached(value, target, self.metric) else 0.0])
            if self.synced:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag[0] > 0)
        self._excluded += time.perf_counter() - t
        return stop

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        jid = self.job["id"]
        self.t_ready = time.time()
        open(os.path.join(self.control, f"ready_{jid}_{self.rank}"), "w").close()
        if not _wait_for(os.path.join(self.control, f"go_{jid}"), self.job.get("go_timeout", 120.0)):
            raise RuntimeError(f"no go_{jid} from the driver")
        if self.sent_bytes is not None:
            self.bytes_sent = -self.sent_bytes()
        self.t_go = time.time()
        self._t0 = time.perf_counter()
        self._evaluate(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        rec: dict[str, Any] = {"step": step, "train_s": self._train_s(), "wall": time.time(),
                               "excluded_s": self._excluded}
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        rec["loss"] = float(loss) if loss is not None else None
        rec.update(step_info(trainer.strategy))
        # stop together: the slowest clock decides. The same all_reduce agrees on evaluating, every `eval_every`
        # steps or once `eval_every_s` training seconds passed since the last evaluation, so that time to target
        # has the same resolution in seconds for slow contenders as for fast ones
        t = time.perf_counter()
        last_eval = self.evals[-1]["train_s"] if self.evals else 0.0
        self._flag[0] = 1.0 if rec["train_s"] >= self.job["cap_s"] else 0.0
        self._flag[1] = 1.0 if self.evaluate_fn is not None and rec["train_s"] - last_eval >= self._eval_every_s else 0.0
        if self.synced:
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        cap, due = bool(self._flag[0] > 0), bool(self._flag[1] > 0)
        rec["train_s"] += time.perf_counter() - t  # the agreement belongs to the step
        self.steps.append(rec)
        last = cap or step >= self.job["steps"]
        if cap:
            self.stop_reason = "cap"
        if last or due or step % self.job["eval_every"] == 0:
            if self._evaluate(trainer, pl_module, step) and not last:
                self.stop_reason = "target"
                last = True
        if last:
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.t_end = time.time()
        if self.sent_bytes is not None:
            self.bytes_sent += self.sent_bytes()


def step_info(strategy: Any) -> dict[str, Any]:
    """What the step just finished ran and measured, from ``NetSenseStrategy``'s state (``{}`` for others)."""
    state = getattr(strategy, "netsense_state", None)
    if state is None or state.last_observation is None:
        return {}
    obs = state.last_observation
    bw = obs.link.bandwidth
    probe_bytes, probe_s = state.probes.last
    return {
        "mode": obs.decision.key,
        "bw_mbit": bw * 8e-6 if bw != float("inf") else None,
        # the fit saw only latency: the policy takes the link as faster than anything measured
        "bw_inf": bw == float("inf") and obs.link.samples > 0,
        "vouched": bool(obs.link.vouched),
        "hook_bytes": obs.bytes_sent,
        "dense_bytes": obs.dense_bytes,
        "comm_s": obs.comm_time,
        "backward_s": obs.backward_time,
        "probe_bytes": probe_bytes,
        "probe_s": probe_s,
    }


def run_job(job: dict[str, Any], rank: int, world: int, control: str, sent_bytes: Any = None) -> dict[str, Any]:
    """Train one job through a fresh ``lightning.Trainer``; returns this rank's result (see ``bench_worker.py``).

    ``sent_bytes`` reads the bytes this process has sent so far (its own TCP sockets); ``None``: not counted.
    """
    from contenders import build_strategy
    from workloads import make_workload

    t_start = time.time()
    work = make_workload(job["workload"], rank, world, seed=job["seed"], **job.get("workload_options", {}))
    synced = job["contender"] != "ideal"
    strategy, standin = build_strategy(job["contender"], rank, world, torch_powersgd=job.get("torch_powersgd", False),
                                       bucket_cap_mb=job.get("bucket_cap_mb"))
    clock = BenchClock(job, rank, control, work.evaluate, work.metric, synced, sent_bytes if synced else None)
    module = BenchModule(work)
    kwargs: dict[str, Any] = {"strategy": strategy, "num_nodes": world} if synced else {}
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=job["steps"], max_epochs=-1, callbacks=[clock],
        enable_progress_bar=False, logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
        enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
        default_root_dir=os.path.join(control, f"trainer_{rank}"), **kwargs,
    )
    loader = DataLoader(_Batches(work.batches), batch_size=None, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    state = getattr(trainer.strategy, "netsense_state", None)
    steps = clock.steps
    if state is not None:
        mode_steps = dict(state.mode_steps)
    else:
        fixed = {"ideal": "local", "ideal_sync": "local", "ddp": "none", "torch_fp16": "fp16",
                 "torch_powersgd": "powersgd(torch)"}[job["contender"]]
        mode_steps = {fixed: len(steps)}
    return {
        "id": job["id"],
        "rank": rank,
        "job": job,
        "t_go": clock.t_go,
        "t_end": time.time(),
        "stop": clock.stop_reason,
        "metric": work.metric if work.evaluate is not None else None,
        "params": sum(p.numel() for p in work.model.parameters()),
        "batch_size": work.batch_size,
        "standin": standin,
        "steps": steps,
        "evals": clock.evals,
        "mode_steps": mode_steps,
        "hook_bytes": state.total_bytes_sent if state is not None else None,
        "socket_bytes": clock.bytes_sent,
        # where a job's wall time goes besides training: set-up (workload, Trainer, DDP) before ready, the wait for
        # the driver's go, training with its evaluations, and the Trainer's teardown
        "timing": {"setup_s": clock.t_ready - t_start, "go_wait_s": clock.t_go - clock.t_ready,
                   "train_wall_s": clock.t_end - clock.t_go, "teardown_s": time.time() - clock.t_end,
                   "eval_s": clock._excluded},
    }
