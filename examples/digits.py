"""Digits demo: train a small network on scikit-learn's handwritten digits with ``strategy="netsense_ddp"``.

The data (1,797 8x8 images) ships inside scikit-learn: nothing is downloaded.

    python examples/digits.py                      # 2 CPU processes, adaptive policy, TensorBoard logs
    python examples/digits.py --mode topk          # force one codec
    tensorboard --logdir lightning_logs            # bandwidth, mode, error under netsense/
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits, split 70/10/20 (train/val/test) with a fixed seed, pixels scaled to [0, 1].

    Args:
        batch_size: samples per batch and rank.
        seed: seed of the split.
    """

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, but got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_train, n_val = int(0.7 * len(x)), int(0.1 * len(x))
        idx = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
        self.sets = {k: TensorDataset(x[v], y[v]) for k, v in idx.items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["train"], batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["val"], batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["test"], batch_size=256)


class DigitsClassifier(pl.LightningModule):
    """A multi-layer perceptron for 8x8 digits.

    Args:
        hidden: width of each hidden layer (1024 with depth 3 gives ~8 MB of gradients: enough for
            communication to matter on a slow link).
        depth: number of hidden layers.
        lr: Adam learning rate.
    """

    def __init__(self, hidden: int = 256, depth: int = 2, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _policy(mode: str):
    import lightning_netsense as ln

    if mode == "adaptive":
        return ln.NetSensePolicy()
    return ln.FixedPolicy(mode=mode)


def main(argv: list[str] | None = None) -> float:
    import lightning_netsense as ln
    from lightning_netsense.codecs import CODECS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="CPU processes (default 2)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--mode", default="adaptive", help="'adaptive' (default) or a codec: " + ", ".join(CODECS))
    parser.add_argument("--logdir", default="lightning_logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    torch.set_num_threads(1)
    callbacks: list[pl.Callback] = []
    if hasattr(ln, "NetSenseMonitor"):
        callbacks.append(ln.NetSenseMonitor())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=ln.NetSenseStrategy(policy=_policy(args.mode)),
        max_epochs=args.epochs,
        logger=pl.loggers.TensorBoardLogger(args.logdir, name="digits"),
        callbacks=callbacks,
        log_every_n_steps=5,
        enable_model_summary=False,
    )
    model, data = DigitsClassifier(), DigitsDataModule()
    trainer.fit(model, data)
    (result,) = trainer.test(model, data, verbose=False)
    acc = result["test_acc"]
    if trainer.is_global_zero:
        state = trainer.strategy.netsense_state
        steps = ", ".join(f"{m}: {n}" for m, n in sorted(state.mode_steps.items())) if state else "-"
        print(f"test accuracy: {acc:.2%}  (steps per mode: {steps}; TensorBoard logs in {trainer.logger.log_dir})")
    return acc


if __name__ == "__main__":
    main()
