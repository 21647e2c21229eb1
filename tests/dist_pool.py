"""A pool of real gloo ranks shared by the multi-process tests.

Starting a process that imports torch and Lightning costs seconds on 2 cores, so the suite starts
``world_size`` workers once, each with an initialised gloo process group (and the environment variables a
Lightning ``Trainer`` needs to join it as an externally launched rank), and runs test functions on them.
A function must be importable (module level in a test module); each rank returns its own result.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, inbox: Any, outbox: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        PL_DISABLE_FORK="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            outbox.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    """``world_size`` spawned processes joined in one gloo group; :meth:`run` calls a function on all."""

    def __init__(self, world_size: int = 2) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self._inboxes[r], self._outbox), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 240.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order.

        Raises:
            AssertionError: with the worker's traceback if a rank raised.
            TimeoutError: if the ranks did not all answer within ``timeout`` seconds (a hang); the pool is
                then shut down and marked broken, so the next test gets a fresh one.
        """
        if self.broken:
            raise RuntimeError("DistPool is broken by an earlier hang")
        for box in self._inboxes:
            box.put((fn, args, kwargs))
        results: dict[int, Any] = {}
        errors: list[str] = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._outbox.get(timeout=timeout)
            except queue.Empty:
                self.broken = True
                self.close(force=True)
                raise TimeoutError(f"{fn.__name__} did not finish on every rank within {timeout} s (hang?)") from None
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise AssertionError("\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        if not force:
            for box in self._inboxes:
                box.put(None)
            for p in self._procs:
                p.join(timeout=20)
        for p in self._procs:
            if p.is_alive():
                p.kill()
