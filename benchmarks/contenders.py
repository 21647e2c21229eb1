"""The contenders of the shaped-link benchmark, as Lightning strategies built the same way on every rank, plus the
torch PowerSGD pilot.

Every contender trains the same model, on the same data, from the same seed, through ``lightning.Trainer``; only
the strategy - the gradient exchange - differs:

==================  ===========================================================================================
``ideal``           no gradient exchange at all (one process per rank trains alone, no DDP): the compute-bound
                    limit.
``ideal_sync``      DDP with the exchange skipped (a hook that returns the local gradient at once), paying what
                    every DDP contender pays besides communication: DDP's bookkeeping and bucket copies, and the
                    ranks waiting for each other at the per-step agreement.
``ddp``             plain DDP: Lightning's ``DDPStrategy``, no communication hook.
``torch_fp16``      torch's ``fp16_compress_hook``, registered on CPU/gloo too (:class:`TorchHookStrategy`).
``torch_powersgd``  torch's ``powerSGD_hook`` (rank 4, error feedback, warm start, from step 2) - if the pilot shows
                    it cannot run on gloo with several buckets, this project's ``"powersgd"`` codec at rank 4 after
                    two plain steps stands in, labelled as such. Never a candidate for "best static".
``aimd``            ``NetSenseStrategy(policy=AIMDPolicy())``: the NetSenseML prototype's rule.
``fp16`` ...        the static twins: ``NetSenseStrategy(policy=TwinPolicy(mode))`` for every mode
``topk``            ``NetSensePolicy`` may pick (fp16, bf16, int8, powersgd, topk), with ``NetSensePolicy``'s
                    default options for it (PowerSGD rank 8 in bfloat16, top-k 1 %) and its first step. The best
                    twin per trace is "the best static" of the report: an oracle no user has.
``netsense``        ``NetSenseStrategy(policy=NetSensePolicy())``: the product, default arguments.
==================  ===========================================================================================

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
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from names import CONTENDERS, LABELS, REFERENCES, TWINS, label

from lightning_netsense import FixedPolicy
from lightning_netsense.adaptive import NetSensePolicy
from lightning_netsense.observation import Decision

__all__ = [
    "CONTENDERS", "LABELS", "REFERENCES", "TWINS", "TwinPolicy", "build_strategy", "label", "run_pilot",
    "skip_exchange_hook",
]

_PILOT_STEPS = 12


class TwinPolicy(FixedPolicy):
    """``mode`` held fixed with ``NetSensePolicy``'s default options for it, and ``NetSensePolicy``'s first step.

    A static twin differs from ``NetSensePolicy()`` in one thing only: it never changes mode. Its first step runs
    what ``NetSensePolicy().first_decision`` picks (:func:`~lightning_netsense.adaptive.first_step_mode`: int8 up to
    three ranks, bf16 from four), so that a comparison never turns on the first step alone. A ``FixedPolicy`` does
    not use the link estimate, so its state probes nothing and allows only codecs without per-bucket state in the
    first step; the first step's mode (stateless) is therefore listed among :meth:`candidates`.

    Args:
        mode: one of :data:`TWINS`.
        world_size: number of ranks the run will have (it decides NetSensePolicy's first mode).
    """

    def __init__(self, mode: str, world_size: int = 2) -> None:
        reference = NetSensePolicy()
        options = {d.mode: d for d in reference.candidates()}
        if mode not in TWINS:
            raise ValueError(f"Expected `mode` to be one of {TWINS}, but got {mode!r}")
        super().__init__(mode=mode, **dict(options[mode].options))
        self._reference = reference
        self.first = reference.first_decision(tuple(options.values()), world_size)

    def candidates(self) -> Sequence[Decision]:
        if self.first.mode in ("none", self.mode):
            return (self.decision,)
        return (self.decision, self.first)

    def first_decision(self, allowed: Sequence[Decision], world_size: int) -> Decision:
        return self._reference.first_decision(allowed, world_size)

    def __repr__(self) -> str:
        return f"TwinPolicy({self.decision.key}, first={self.first.key})"


def skip_exchange_hook(state, bucket):  # unannotated: DDP checks real annotations, and this module's are strings
    """A DDP communication hook that exchanges nothing: the bucket's local gradient, at once (``ideal_sync``)."""
    import torch

    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _torch_powersgd_state() -> Any:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    return psgd.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2,
                              use_error_feedback=True, warm_start=True, random_seed=0)


def _strategy_classes() -> tuple[type, type]:
    """``(TorchHookStrategy, cluster environment class)``, defined on first use (they import Lightning)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from lightning.fabric.plugins.environments import ClusterEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    class TorchHookStrategy(DDPStrategy):
        """Lightning's ``DDPStrategy`` with a torch communication hook registered on every device.

        Lightning's own strategy registers ``ddp_comm_hook`` on CUDA only; on CPU it is silently skipped. This one
        registers it after wrapping, as ``NetSenseStrategy`` does with its own hook. ``make_state`` builds the
        hook's state in the worker (a process-group-bound state must not be built before the group exists).
        """

        def __init__(self, hook: Any, make_state: Any = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._bench_hook, self._bench_make_state = hook, make_state
            self.hook_state: Any = None

        def configure_ddp(self) -> None:
            super().configure_ddp()
            self.hook_state = self._bench_make_state() if self._bench_make_state is not None else None
            self.model.register_comm_hook(self.hook_state, self._bench_hook)

    class FixedRanks(ClusterEnvironment):
        """One process per rank, started by the benchmark itself, its process group already initialised."""

        def __init__(self, rank: int, world_size: int) -> None:
            super().__init__()
            self._rank, self._world = rank, world_size

        @property
        def creates_processes_externally(self) -> bool:
            return True

        @property
        def main_address(self) -> str:
            return os.environ.get("MASTER_ADDR", "127.0.0.1")

        @property
        def main_port(self) -> int:
            return int(os.environ.get("MASTER_PORT", "29500"))

        @staticmethod
        def detect() -> bool:
            return True

        def world_size(self) -> int:
            return self._world

        def set_world_size(self, size: int) -> None:
            pass

        def global_rank(self) -> int:
            return self._rank

        def set_global_rank(self, rank: int) -> None:
            pass

        def local_rank(self) -> int:
            return 0

        def node_rank(self) -> int:
            return self._rank

    _CLASSES = (TorchHookStrategy, FixedRanks)
    return _CLASSES


_CLASSES: tuple[type, type] | None = None


def build_strategy(name: str, rank: int, world_size: int, torch_powersgd: bool = True,
                   bucket_cap_mb: float | None = None) -> tuple[Any, bool]:
    """The Lightning strategy of contender ``name`` on ``rank``; returns ``(strategy, standin)``.

    ``ideal`` gets ``None`` (the Trainer's single-device default: no DDP at all). Every DDP contender gets the same
    DDP arguments: BatchNorm buffers are synced once at construction, not in every forward (their traffic would
    pass outside the gradient hook that no contender can compress).

    Args:
        name: one of :data:`CONTENDERS`.
        rank: this process's rank (the process group must be initialised).
        world_size: number of ranks.
        torch_powersgd: whether torch's PowerSGD hook runs on this workload (the pilot); ``False``: the stand-in.
        bucket_cap_mb: DDP bucket size (``None``: DDP's default, 25 MiB).
    """
    if name not in CONTENDERS:
        raise ValueError(f"Expected `name` to be one of {CONTENDERS}, but got {name!r}")
    if name == "ideal":
        return None, False
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_netsense import NetSenseStrategy
    from lightning_netsense.aimd import AIMDPolicy

    hook_strategy, env_class = _strategy_classes()
    common: dict[str, Any] = {"cluster_environment": env_class(rank, world_size), "forward_sync_buffers": False}
    if bucket_cap_mb is not None:
        common["bucket_cap_mb"] = bucket_cap_mb
    if name == "ddp":
        return DDPStrategy(**common), False
    if name == "ideal_sync":
        return hook_strategy(skip_exchange_hook, **common), False
    if name == "torch_fp16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

        return hook_strategy(fp16_compress_hook, **common), False
    if name == "torch_powersgd":
        if torch_powersgd:
            from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import powerSGD_hook

            return hook_strategy(powerSGD_hook, make_state=_torch_powersgd_state, **common), False
        # the stand-in: our PowerSGD at torch's rank, after torch's two plain steps (start_powerSGD_iter=2)
        return NetSenseStrategy(policy=FixedPolicy(mode="powersgd", rank=4), warmup_steps=2, **common), True
    if name == "aimd":
        return NetSenseStrategy(policy=AIMDPolicy(), **common), False
    if name in TWINS:
        return NetSenseStrategy(policy=TwinPolicy(name, world_size), **common), False
    return NetSenseStrategy(policy=NetSensePolicy(), **common), False


# ---------------------------------------------------------------------------------------------- the pilot
def _pilot_rank(rank: int, port: int, workload: str, out: str, options: dict[str, Any]) -> None:
    """One rank of the pilot: a few steps of torch's PowerSGD hook on the workload with DDP's default buckets."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from workloads import make_workload

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    w = make_workload(workload, rank, 2, **options)
    model = DDP(w.model, forward_sync_buffers=False)
    state = _torch_powersgd_state()
    model.register_comm_hook(state, powerSGD_hook)
    opt = w.make_optimizer(model)
    for _ in range(_PILOT_STEPS):
        x, y = next(w.batches)
        opt.zero_grad(set_to_none=True)
        w.loss(model(x), y).backward()
        opt.step()
    with open(out, "w") as f:
        json.dump({"ok": True, "buckets": len(state.p_memory_dict)}, f)  # one warm-start P set per bucket
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pilot(workload: str, timeout: float = 90.0, options: dict[str, Any] | None = None) -> dict[str, Any]:
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
                 "--workload", workload, "--out", outs[r], "--options", json.dumps(options or {})],
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
    p.add_argument("--pilot", action="store_true", help="run the pilot for every workload and print the outcome")
    p.add_argument("--pilot-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workload", default="digits")
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=90.0)
    args = p.parse_args(argv)
    if args.pilot_rank is not None:
        _pilot_rank(args.pilot_rank, args.port, args.workload, args.out, json.loads(args.options))
        return
    for workload in ("digits", "cnn", "gpt"):
        print(workload, json.dumps(run_pilot(workload, args.timeout)))


if __name__ == "__main__":
    main()
