"""Names of the shaped-link benchmark's contenders, workloads' metrics and traces: no heavy imports (the report and
the plots read them without importing torch or Lightning)."""

from __future__ import annotations

__all__ = ["CONTENDERS", "LABELS", "REFERENCES", "TWINS", "label"]

#: contender names in table order
CONTENDERS: tuple[str, ...] = ("ideal", "ideal_sync", "ddp", "torch_fp16", "torch_powersgd", "aimd", "fp16", "bf16",
                               "int8", "powersgd", "topk", "netsense")
#: the references: unshaped, no exchange; each rank's model is never averaged (no quality of their own)
REFERENCES: tuple[str, ...] = ("ideal", "ideal_sync")
#: the static twins: every mode NetSensePolicy may pick, held fixed (candidates for "the best static")
TWINS: tuple[str, ...] = ("fp16", "bf16", "int8", "powersgd", "topk")
#: human-readable names
LABELS: dict[str, str] = {
    "ideal": "ideal (no comm)",
    "ideal_sync": "ideal, synced (DDP, no exchange)",
    "ddp": "plain DDP",
    "torch_fp16": "torch fp16 hook",
    "torch_powersgd": "torch PowerSGD r4",
    "torch_powersgd_standin": "PowerSGD r4 (ours, stand-in for torch's)",
    "aimd": "AIMDPolicy",
    "fp16": "twin fp16",
    "bf16": "twin bf16",
    "int8": "twin int8",
    "powersgd": "twin PowerSGD r8 bf16",
    "topk": "twin top-k 1%",
    "netsense": "NetSensePolicy",
}


def label(name: str, standin: bool = False) -> str:
    """The table label of contender ``name`` (the stand-in's when ``standin``)."""
    return LABELS["torch_powersgd_standin"] if standin else LABELS[name]
