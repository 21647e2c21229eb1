"""The fault matrix, kept as tests: what the runtime does when a step, a rank or a resume goes wrong.

``docs/faults.md`` states what happens in each case; each claim there that can be checked on this machine without
root is checked here:

- a non-finite gradient step (an AMP overflow) under a skip, in every mode: the non-finite value reaches every rank,
  so every rank skips the same step; parameters stay finite and identical, and the error-feedback residual of the
  rank that overflowed is reset, not poisoned;
- a killed rank: the survivor raises within the failure-detection budget (the process-group timeout), at once in
  practice (its peer's sockets close), and no process remains;
- a frozen rank (``SIGSTOP``): the survivor raises once the budget has passed, not before and not much after;
- resume from a checkpoint with another policy, and with another world size (2 -> 1 -> 2 ranks).

Link outages need a kernel-shaped link (root): they are in ``tests/test_shaped_faults.py`` under ``-m shaped``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_netsense import FixedPolicy
from lightning_netsense.hook import NetSenseState, netsense_hook

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "fault_worker.py")
MODES = ("none", "fp16", "bf16", "int8", "powersgd", "topk")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)


# ----------------------------------------------------------------------------- non-finite step under a skip


def _non_finite_step_under_a_skip(mode: str, bad: float, bad_step: int = 3, steps: int = 6) -> dict:
    """Train with the hook; at ``bad_step`` rank 0's input holds ``bad``; skip every step whose gradient is not finite.

    The skip is the rank's own decision from its own gradients, as AMP's ``GradScaler`` takes it: it is the same on
    every rank only if the hook carries the non-finite value to every rank.
    """
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.005)
    state = NetSenseState(policy=FixedPolicy(mode=mode))
    ddp.register_comm_hook(state, netsense_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rank = dist.get_rank()
    skipped, modes, residual_finite = [], [], []
    before = after = None
    for step in range(steps):
        x, y = _batch(rank, step)
        if step == bad_step and rank == 0:
            x[0, 0] = bad
        if step == bad_step:
            before = {"resets": state.feedback.resets}
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        modes.append(state.active_decision.mode)
        state.end_step()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        skipped.append(not finite)
        if finite:
            opt.step()
        residual_finite.append(math.isfinite(state.feedback.norm()))
        if step == bad_step:
            after = {"resets": state.feedback.resets, "residuals": len(state.feedback)}
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"skipped": skipped, "modes": modes, "residual_finite": residual_finite, "params": params,
            "resets": after["resets"] - before["resets"], "residuals_after_bad": after["residuals"],
            "buckets": len(state.ledger.layouts())}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_step_under_a_skip_keeps_replicas_finite_and_identical(dist_pool, mode):
    for bad in (math.inf, math.nan):
        out = dist_pool.run(_non_finite_step_under_a_skip, mode, bad)
        for rank in range(2):
            r = out[rank]
            assert r["modes"][3] == mode, f"the bad step ran {r['modes'][3]}, not {mode}: {r['modes']}"
            # every rank saw the non-finite average, so every rank skipped that step and only that one
            assert r["skipped"] == [False, False, False, True, False, False], (bad, rank, r["skipped"])
            assert bool(torch.isfinite(r["params"]).all())
            # the error-feedback memory never holds a non-finite value
            assert all(r["residual_finite"]), (bad, rank, r["residual_finite"])
        torch.testing.assert_close(out[0]["params"], out[1]["params"], rtol=0, atol=0)
        if mode != "none":
            # the rank whose gradient overflowed dropped the residual of the bucket(s) concerned; the other kept its
            assert out[0]["resets"] >= 1 and out[1]["resets"] == 0, (bad, out[0]["resets"], out[1]["resets"])
            assert out[0]["residuals_after_bad"] < out[0]["buckets"] == out[1]["residuals_after_bad"]


# ----------------------------------------------------------------------------- killed and frozen ranks

_BUDGET_S = 10.0  # the process-group timeout the fault runs are given (`NetSenseStrategy(timeout=...)`)
_SLACK_S = 10.0  # what the issue allows on top of the budget for every rank to have raised and exited


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _start_ranks(tmp_path, world_size: int, *extra: str) -> tuple[list[subprocess.Popen], list]:
    port = _free_port()
    procs, logs = [], []
    for r in range(world_size):
        log = open(tmp_path / f"rank{r}.log", "w")  # a file, not a pipe: a full pipe would freeze the rank itself
        logs.append(log)
        cmd = [sys.executable, WORKER, "--rank", str(r), "--world-size", str(world_size), "--port", str(port), *extra]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT))
    return procs, logs


def _wait_for_step(tmp_path, procs, rank: int, step: int, timeout: float = 120.0) -> None:
    beacon = tmp_path / f"beacon{rank}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        try:
            if int(beacon.read_text()) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} did not reach step {step}:\n{_tails(tmp_path, len(procs))}")


def _tails(tmp_path, world_size: int) -> str:
    return "\n".join(f"--- rank {r}:\n" + (tmp_path / f"rank{r}.log").read_text()[-2500:] for r in range(world_size))


def _rank_fault(tmp_path, sig: signal.Signals, victim: int) -> dict:
    """Two ranks train; once ``victim`` has run 3 steps it gets ``sig``; how long until the survivor exits."""
    procs, logs = _start_ranks(
        tmp_path, 2, "--timeout", str(_BUDGET_S), "--steps", "100000", "--step-sleep", "0.05",
        "--beacon", str(tmp_path / "beacon"),
    )
    survivor = procs[1 - victim]
    try:
        _wait_for_step(tmp_path, procs, victim, 3)
        os.kill(procs[victim].pid, sig)
        t0 = time.monotonic()
        try:
            code = survivor.wait(timeout=_BUDGET_S + _SLACK_S + 30)
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        for log in logs:
            log.close()
    return {"code": code, "seconds": seconds, "log": (tmp_path / f"rank{1 - victim}.log").read_text(),
            "alive": [p.poll() is None for p in procs], "tails": _tails(tmp_path, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0], ids=["store-host"])  # rank 1 killed: the same error, as fast
def test_killed_rank_makes_the_survivor_raise_within_the_budget(tmp_path, victim):
    out = _rank_fault(tmp_path, signal.SIGKILL, victim)
    assert out["code"] not in (None, 0), f"the survivor did not fail (exit {out['code']}):\n{out['tails']}"
    assert out["seconds"] < _BUDGET_S + _SLACK_S, f"{out['seconds']:.1f} s:\n{out['tails']}"
    # gloo sees the closed connection: the error names the peer, and the hook's collective
    assert "Connection" in out["log"] or "closed" in out["log"], out["tails"]
    assert out["alive"] == [False, False]


@pytest.mark.slow
def test_frozen_rank_makes_the_survivor_raise_once_the_budget_has_passed(tmp_path):
    out = _rank_fault(tmp_path, signal.SIGSTOP, 1)
    assert out["code"] not in (None, 0), f"the survivor did not fail (exit {out['code']}):\n{out['tails']}"
    # detected by the timeout given through NetSenseStrategy(timeout=...): not before it, not long after it
    assert _BUDGET_S - 1 <= out["seconds"] < _BUDGET_S + _SLACK_S, f"{out['seconds']:.1f} s:\n{out['tails']}"
    # gloo's words depend on where the rank waits: "Timed out waiting 10000ms for recv operation to complete",
    # "Application timeout caused pair closure"
    assert re.search(r"timed out|timeout", out["log"], re.IGNORECASE), out["tails"]
    assert out["alive"] == [False, False]


# ----------------------------------------------------------------------------- resume: another policy, world size


def _fit(root: str, policy: str, steps: int, ckpt_in: str | None = None, ckpt_out: str | None = None) -> dict:
    """On each pool rank: train the digits MLP to ``steps`` (resuming from ``ckpt_in``), write ``ckpt_out``."""
    import lightning.pytorch as pl
    from digits import DigitsClassifier, DigitsDataModule
    from fault_worker import _policy

    from lightning_netsense import NetSenseStrategy

    class _Start(pl.Callback):
        at_start: dict = {}

        def on_train_start(self, trainer, pl_module):
            state = trainer.strategy.netsense_state
            self.at_start = {"step": state.step, "global_step": trainer.global_step,
                             "mode_steps": dict(state.mode_steps), "samples": state.estimator.compute().samples}

    start = _Start()
    pl.seed_everything(3, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=NetSenseStrategy(policy=_policy(policy)), max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[start], default_root_dir=root,
    )
    model = DigitsClassifier(hidden=32, depth=2)
    trainer.fit(model, DigitsDataModule(batch_size=16), ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    state = trainer.strategy.netsense_state
    return {"at_start": start.at_start, "step": state.step, "global_step": trainer.global_step,
            "mode_steps": dict(state.mode_steps), "decision": state.decision.key,
            "params": torch.cat([p.detach().flatten() for p in model.parameters()])}


@pytest.mark.slow
def test_resume_with_another_policy(dist_pool, tmp_path):
    ckpt = str(tmp_path / "netsense.ckpt")
    first = dist_pool.run(_fit, str(tmp_path), "netsense", 4, None, ckpt)
    assert first[0]["step"] == 4
    for policy, mode in (("fp16", "fp16"), ("aimd", "topk")):
        out = dist_pool.run(_fit, str(tmp_path), policy, 9, ckpt)
        for r in out:
            # the counters and totals continue from the checkpoint...
            assert r["at_start"]["step"] == 4 and r["at_start"]["global_step"] == 4
            assert r["at_start"]["mode_steps"] == first[0]["mode_steps"]
            assert r["at_start"]["samples"] > 0  # the same ranks: the link estimate carries over
            assert r["step"] == 9 and sum(r["mode_steps"].values()) == 9
            # ...and the new policy decides from the resumed run's warm-up on (the saved decision is not kept)
            added = {m: n - first[0]["mode_steps"].get(m, 0) for m, n in r["mode_steps"].items()}
            assert added.get(mode, 0) >= 3, (policy, first[0]["mode_steps"], r["mode_steps"])
            assert {m for m, n in added.items() if n} <= {mode, "none"}, (policy, first[0]["mode_steps"], added)
            assert bool(torch.isfinite(r["params"]).all())
        assert out[0]["decision"] == out[1]["decision"]
        torch.testing.assert_close(out[0]["params"], out[1]["params"], rtol=0, atol=0)


@pytest.mark.slow
def test_resume_with_another_world_size(dist_pool, tmp_path):
    two = str(tmp_path / "two.ckpt")
    one = str(tmp_path / "one.ckpt")
    first = dist_pool.run(_fit, str(tmp_path), "netsense", 4, None, two)
    # 2 -> 1: a single rank, as its own process (the pool's ranks are already in a group of two)
    result = tmp_path / "one.json"
    procs, logs = _start_ranks(tmp_path, 1, "--steps", "7", "--ckpt-in", two, "--ckpt-out", one,
                               "--result", str(result))
    try:
        code = procs[0].wait(timeout=180)
    finally:
        if procs[0].poll() is None:
            procs[0].kill()
            procs[0].wait()
        logs[0].close()
    assert code == 0, _tails(tmp_path, 1)
    single = json.loads(result.read_text())
    assert single["world_size"] == 1 and single["finite"]
    assert single["at_start"]["step"] == 4 and single["at_start"]["global_step"] == 4
    assert single["step"] == 7 and single["global_step"] == 7
    assert single["at_start"]["mode_steps"] == first[0]["mode_steps"]
    # 1 -> 2: back in the pool
    out = dist_pool.run(_fit, str(tmp_path), "netsense", 10, one)
    for r in out:
        assert r["at_start"]["step"] == 7 and r["at_start"]["global_step"] == 7
        assert r["at_start"]["mode_steps"] == single["mode_steps"]
        assert r["at_start"]["samples"] == 0  # measured on one rank: the estimate starts afresh on two
        assert r["step"] == 10 and sum(r["mode_steps"].values()) == 10
        assert bool(torch.isfinite(r["params"]).all())
    assert out[0]["decision"] == out[1]["decision"]
    torch.testing.assert_close(out[0]["params"], out[1]["params"], rtol=0, atol=0)
