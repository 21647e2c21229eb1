"""The contenders of the shaped-link benchmark, built the same way on every rank, plus the torch PowerSGD pilot.

Every contender trains the same model, on the same data, from the same seed; only the gradient exchange differs:

=================  ============================================================================================
``ideal``          no gradient exchange at all (local gradients only, no DDP): the compute-bound limit.
``ideal_sync``     DDP with the exchange skipped (a hook that returns the local gradient at once), paying what
                   every DDP contender pays besides communication: DDP's bookkeeping and bucket copies, and the
                   ranks waiting for each other at the per-step agreement - the limit of synchronous training
                   with free communication.
``ddp``            plain DDP, no communication hook (torch's built-in bucketed allreduce).
``fp16``           torch's ``fp16_compress_hook`` registered with ``register_comm_hook`` (on CPU/gloo too).
``powersgd``       torch's ``powerSGD_hook`` (rank 4, error feedback, warm start, from step 2) - if the pilot
                   shows it cannot run on gloo with several buckets, this project's ``"powersgd"`` codec
                   (rank 4) stands in, and the output says so.
``topk``           static top-k 1 % with error feedback (DGC-like): ``FixedPolicy(mode="topk", density=0.01)``.
``aimd``           the NetSenseML prototype's rule: ``AIMDPolicy()``.
``netsense``       ``NetSensePolicy()`` - the product.
=================  ============================================================================================

The last four register :func:`lightning_netsense.netsense_hook` with a :class:`NetSenseState` directly and call
``state.begin_step()`` before the forward and ``state.begin_backward()`` / ``state.end_step()`` around each
backward pass - exactly what :class:`NetSenseStrategy` does from its ``training_step``, ``pre_backward`` and
``post_backward``.

``python benchmarks/contenders.py --pilot`` runs the torch PowerSGD pilot on its own (2 local processes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CONTENDERS", "LABELS", "REFERENCES", "STATIC_COMPRESSORS", "Contender", "build", "hook_state", "run_pilot"]

#: contender names in table order
CONTENDERS: tuple[str, ...] = ("ideal", "ideal_sync", "ddp", "fp16", "powersgd", "topk", "aimd", "netsense")
#: the references: no exchange at all, unshaped; each rank trains its own model (no time to accuracy of their own)
REFERENCES: tuple[str, ...] = ("ideal", "ideal_sync")
#: human-readable names
LABELS: dict[str, str] = {
    "ideal": "ideal (no comm)",
    "ideal_sync": "ideal, synced (DDP, no exchange)",
    "ddp": "plain DDP",
    "fp16": "torch fp16 hook",
    "powersgd": "torch PowerSGD r4",
    "powersgd_standin": "PowerSGD r4 (ours, stand-in)",
    "topk": "top-k 1% + EF",
    "aimd": "AIMDPolicy",
    "netsense": "NetSensePolicy",
}
#: contenders whose compressor never changes (candidates for "the best static compressor")
STATIC_COMPRESSORS: tuple[str, ...] = ("fp16", "powersgd", "topk")
_PILOT_STEPS = 12


@dataclass
class Contender:
    """One contender on one rank: the model to train and what to call around each backward pass.

    Attributes:
        name: contender name (``"powersgd"`` also when the stand-in runs; see ``standin``).
        model: the module to call (DDP-wrapped unless ``ideal``).
        state: the :class:`NetSenseState` of hook-based contenders, else ``None``.
        fixed_mode: mode label of contenders without a NetSenseState (``"none"``, ``"fp16"``, ...).
        standin: ``True`` when this project's PowerSGD stands in for torch's.
    """

    name: str
    model: Any
    state: Any = None
    fixed_mode: str = "none"
    standin: bool = False
    keep: list = field(default_factory=list)  # objects that must outlive the hook (torch PowerSGD state)

    def begin_step(self) -> None:
        if self.state is not None:
            self.state.begin_step()

    def begin_backward(self) -> None:
        if self.state is not None:
            self.state.begin_backward()

    def end_step(self) -> None:
        if self.state is not None:
            self.state.end_step()

    def step_info(self) -> dict[str, Any]:
        """Mode used by the step just finished, and the link estimate after it (hook contenders only)."""
        if self.state is None or self.state.last_observation is None:
            return {"mode": self.fixed_mode}
        obs = self.state.last_observation
        bw = obs.link.bandwidth
        return {
            "mode": obs.decision.key,
            "bw_mbit": bw * 8e-6 if bw != float("inf") else None,
            "alpha_ms": obs.link.alpha * 1e3,
            "hook_bytes": obs.bytes_sent,
            "comm_s": obs.comm_time,
            "backward_s": obs.backward_time,
        }


def build(name: str, model: Any, torch_powersgd: bool = True, bucket_cap_mb: float | None = None) -> Contender:
    """Wrap ``model`` for contender ``name`` (the default process group must be initialised, except for ideal).

    Args:
        name: one of :data:`CONTENDERS`.
        model: the freshly built module (same weights on every rank).
        torch_powersgd: use torch's PowerSGD for ``"powersgd"``; ``False`` uses this project's codec instead.
        bucket_cap_mb: DDP bucket size (``None``: DDP's default, 25 MiB).
    """
    if name not in CONTENDERS:
        raise ValueError(f"Expected `name` to be one of {CONTENDERS}, but got {name!r}")
    if name == "ideal":
        return Contender(name, model, fixed_mode="local")  # no exchange at all
    from torch.nn.parallel import DistributedDataParallel as DDP

    # BatchNorm running statistics are only used in evaluation; syncing them every forward would add traffic
    # outside the gradient hook that no contender can compress (they are still synced once, at init)
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb, forward_sync_buffers=False)
    if name == "ideal_sync":
        ddp.register_comm_hook(None, skip_exchange_hook)
        return Contender(name, ddp, fixed_mode="local")
    if name == "ddp":
        return Contender(name, ddp)
    if name == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

        ddp.register_comm_hook(None, fp16_compress_hook)
        return Contender(name, ddp, fixed_mode="fp16")
    if name == "powersgd" and torch_powersgd:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        state = psgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2, use_error_feedback=True,
            warm_start=True, random_seed=0,
        )
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
        return Contender(name, ddp, fixed_mode="powersgd(torch)", keep=[state])

    from lightning_netsense.hook import netsense_hook

    state = hook_state(name)
    ddp.register_comm_hook(state, netsense_hook)
    return Contender(name, ddp, state=state, standin=name == "powersgd")


def skip_exchange_hook(state, bucket):  # unannotated: DDP checks real annotations, and this module's are strings
    """A DDP communication hook that exchanges nothing: the bucket's local gradient, at once (``ideal_sync``)."""
    import torch

    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def hook_state(name: str) -> Any:
    """The :class:`NetSenseState` of a hook-based contender (``powersgd`` stand-in, ``topk``, ``aimd``,
    ``netsense``); it binds to the process group lazily, so building it needs none."""
    from lightning_netsense import FixedPolicy
    from lightning_netsense.hook import NetSenseState

    if name == "powersgd":
        policy = FixedPolicy(mode="powersgd", rank=4)
    elif name == "topk":
        policy = FixedPolicy(mode="topk", density=0.01)
    elif name == "aimd":
        from lightning_netsense.aimd import AIMDPolicy

        policy = AIMDPolicy()
    elif name == "netsense":
        from lightning_netsense.adaptive import NetSensePolicy

        policy = NetSensePolicy()
    else:
        raise ValueError(f"Expected a hook-based contender (powersgd, topk, aimd, netsense), but got {name!r}")
    # a static compressor never reads the link estimate: it must not pay for the bandwidth probes the state
    # sends while a lossy mode runs (DGC does not probe either). FixedPolicy says so itself
    # (`uses_link_estimate = False`); probe_every=0 makes it independent of that default.
    if name == "powersgd":  # torch's start_powerSGD_iter=2: two plain steps, as the hook it stands in for
        return NetSenseState(policy=policy, probe_every=0, warmup_steps=2)
    if name in STATIC_COMPRESSORS:
        return NetSenseState(policy=policy, probe_every=0)
    return NetSenseState(policy=policy)


# ---------------------------------------------------------------------------------------------- the pilot
def _pilot_rank(rank: int, port: int, workload: str, out: str) -> None:
    """One rank of the pilot: a few steps of torch's PowerSGD hook on the workload with DDP's default buckets."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from workloads import loss_fn, make_workload

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    w = make_workload(workload, rank, 2)
    c = build("powersgd", w.model, torch_powersgd=True)
    opt = w.make_optimizer(c.model)
    for _ in range(_PILOT_STEPS):
        x, y = next(w.batches)
        opt.zero_grad(set_to_none=True)
        loss_fn(c.model(x), y).backward()
        opt.step()
    # torch keeps one warm-start P matrix set per compressed bucket
    buckets = len(c.keep[0].p_memory_dict)
    with open(out, "w") as f:
        json.dump({"ok": True, "buckets": buckets}, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pilot(workload: str, timeout: float = 90.0) -> dict[str, Any]:
    """Try torch's PowerSGD hook for a few steps on 2 local gloo ranks; ``{"ok": bool, "reason": str, ...}``.

    DESIGN.md records that it failed ("Received data size doesn't match expected size") or hung on gloo with
    several buckets; the pilot re-checks on this workload with a timeout instead of trusting that note.
    """
    import tempfile

    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"r{r}.json") for r in (0, 1)]
        logs = [open(os.path.join(tmp, f"r{r}.log"), "w+") for r in (0, 1)]  # noqa: SIM115 - closed below
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--pilot-rank", str(r), "--port", str(port),
                 "--workload", workload, "--out", outs[r]],
                stdout=logs[r], stderr=subprocess.STDOUT,
            )
            for r in (0, 1)
        ]
        t0 = time.monotonic()
        try:
            while any(p.poll() is None for p in procs) and time.monotonic() - t0 < timeout:
                if any(p.poll() not in (None, 0) for p in procs):
                    time.sleep(2.0)  # let the other rank fail or report too
                    break
                time.sleep(0.1)
            hung = [p.poll() is None for p in procs]
        finally:  # also on Ctrl-C or SIGTERM: never leave a pilot rank behind
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        tails = []
        for f in logs:
            f.seek(0)
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
            # the most telling line: gloo's enforce message or the exception, else the last one
            errors = [ln for ln in lines if "doesn't match" in ln or "Error:" in ln or "enforce fail" in ln]
            tails.append((errors or lines or [""])[-1])
            f.close()
        seconds = time.monotonic() - t0
        if all(os.path.exists(o) for o in outs):
            with open(outs[0]) as f:
                info = json.load(f)
            return {"ok": True, "reason": "", "buckets": info["buckets"], "seconds": seconds}
        failed = [t for p, t in zip(procs, tails) if p.returncode not in (0, None, -9) and t]
        if failed:
            reason = "failed: " + failed[0][-300:]
        elif all(hung):
            reason = f"hung: no rank finished {_PILOT_STEPS} steps within {timeout:.0f} s"
        else:
            reason = "failed: " + (tails[0] or tails[1])[-300:]
        return {"ok": False, "reason": reason, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="torch PowerSGD pilot on gloo with DDP's default buckets")
    p.add_argument("--pilot", action="store_true", help="run the pilot for both workloads and print the outcome")
    p.add_argument("--pilot-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workload", default="digits")
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=90.0)
    args = p.parse_args(argv)
    if args.pilot_rank is not None:
        _pilot_rank(args.pilot_rank, args.port, args.workload, args.out)
        return
    for workload in ("digits", "cnn"):
        print(workload, json.dumps(run_pilot(workload, args.timeout)))


if __name__ == "__main__":
    main()
