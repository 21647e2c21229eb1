"""Checks of the arguments ``NetSenseStrategy`` passes on to Lightning's ``DDPStrategy`` and to torch's
``DistributedDataParallel``: made in the main process, before any rank starts (DDP and gloo would otherwise fail
later, in every rank,, with messages that do not name the argument)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.parallel.distributed import DistributedDataParallel

from lightning_netsense._validation import check_bool, check_instance, check_int, refuse

__all__ = ["START_METHODS", "check_backend", "check_ddp_kwargs", "check_devices", "known_backends"]

START_METHODS = ("popen", "spawn", "fork", "forkserver")
# DistributedDataParallel flags that also take None (torch 2.13: "bool or None", default None)
_DDP_OPTIONAL_FLAGS = ("broadcast_buffers", "forward_sync_buffers")
# DistributedDataParallel keywords this strategy cannot pass on, and why
_DDP_REFUSED = {
    "module": "Lightning wraps the LightningModule itself",
    "device_ids": "Lightning sets them from the Trainer's devices",
    "process_group": "the hook averages over the world group, and process groups exist only once the ranks run",
    "device_mesh": "the hook averages over the world group, and device meshes exist only once the ranks run",
}


def known_backends() -> tuple[str, ...]:
    """Backends torch knows now (its own and those plugins have registered), lower case."""
    if not torch.distributed.is_available():
        return ()
    return tuple(b for b in torch.distributed.Backend.backend_list if b != "undefined")


def check_backend(value: Any) -> None:
    """``process_group_backend``: a backend torch knows, ``"device:backend"`` pairs of them, or ``None``."""
    if value is None:
        return
    known = known_backends()
    accepted = f"one of {', '.join(repr(b) for b in known)}, 'device:backend' pairs of them joined by ',', or None"
    why = "a backend a plugin registers is known once the plugin is imported"
    if not isinstance(value, str):
        raise refuse("process_group_backend", accepted, value, why)
    parts = value.lower().split(",")
    if len(parts) > 1 and not all(":" in part for part in parts):
        raise refuse("process_group_backend", accepted, value, why)
    if not all(part.split(":", 1)[-1].strip() in known for part in parts):
        raise refuse("process_group_backend", accepted, value, why)


def check_devices(value: Any) -> None:
    """``parallel_devices``: a list of ``torch.device`` or ``None``."""
    if value is None:
        return
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise refuse("parallel_devices", "a list of torch.device or None", value)
    for i, device in enumerate(value):
        check_instance(f"`parallel_devices` item {i}", device, torch.device, what="a torch.device")


def check_ddp_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Refuse what ``DistributedDataParallel`` would refuse (or this strategy cannot honour), before ranks start.

    Returns ``kwargs`` without the refused keywords given as ``None`` (their default: ``device_ids=None`` passed on
    would collide with the ``device_ids`` Lightning gives DDP).
    """
    if kwargs.get("model_averaging_period") is not None:
        raise ValueError(
            f"NetSenseStrategy cannot average models: `model_averaging_period` must not be given, but got "
            f"{kwargs['model_averaging_period']!r}. Post-local SGD averaging runs through a communication hook state "
            "of its own (PostLocalSGDState), and this strategy owns the hook; use DDPStrategy("
            "ddp_comm_state=PostLocalSGDState(...), ddp_comm_hook=post_localSGD_hook, model_averaging_period=...)."
        )
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    accepted = [n for n in params if n != "self" and n not in _DDP_REFUSED]
    for name, value in kwargs.items():
        # None is the default of each refused keyword, and LightningCLI passes every default it finds
        if value is None and (name in _DDP_REFUSED or name == "model_averaging_period"):
            continue
        if name in _DDP_REFUSED:
            raise ValueError(
                f"NetSenseStrategy cannot pass `{name}` to DistributedDataParallel: {_DDP_REFUSED[name]}; but got "
                f"{value!r}"
            )
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ValueError(
                f"Unknown keyword `{name}`: NetSenseStrategy passes keywords it does not take itself to "
                f"DistributedDataParallel, which accepts {', '.join(accepted)}.{hint}"
            )
        if isinstance(params[name].default, bool) or (name in _DDP_OPTIONAL_FLAGS and value is not None):
            check_bool(name, value, why="a DistributedDataParallel flag")
    if "dim" in kwargs:
        check_int("dim", kwargs["dim"])
    return {k: v for k, v in kwargs.items() if not (v is None and k in _DDP_REFUSED)}
