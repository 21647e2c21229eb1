"""LightningCLI for the digits demo: choose the strategy, policy and monitor from YAML.

    python examples/cli.py fit --config examples/configs/netsense_ddp.yaml
    python examples/cli.py fit --config examples/configs/netsense_fixed_fp16.yaml --trainer.max_epochs 3
    python examples/cli.py fit --print_config --config examples/configs/netsense_fixed_fp16.yaml

``import lightning_netsense`` must run before the CLI builds the Trainer: Lightning has no entry point for
third-party strategies, so the name ``netsense_ddp`` exists only once the package has registered it.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

import lightning_netsense  # noqa: F401  (registers "netsense_ddp", "netsense_ddp_spawn", ...)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import DigitsClassifier, DigitsDataModule


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and, with ``run=True``, run) the CLI; ``args`` replaces ``sys.argv[1:]`` (used by the tests)."""
    return LightningCLI(
        DigitsClassifier,
        DigitsDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
