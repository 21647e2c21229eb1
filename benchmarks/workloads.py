"""The benchmark workloads: digits time-to-accuracy, ResNet-18-sized CNN throughput, GPT time-to-loss.

Written in plain torch (torchvision cannot be installed beside this torch). Each workload gives the model, an
infinite iterator of per-rank training batches (same seed on every contender, so every contender sees the same
data in the same order), the loss, and - for digits - an evaluation on the held-out test split.

* ``digits``: scikit-learn's handwritten digits (1,797 8x8 images, shipped with scikit-learn, no download), split
  70/10/20 exactly as :class:`examples.digits.DigitsDataModule` does, and an MLP from
  :class:`examples.digits.DigitsClassifier` (``hidden=1024, depth=3``: 2.2 M parameters, 8.7 MB of fp32
  gradients - enough that communication matters). Evaluated on the 360 test images.
* ``cnn``: a ResNet-18 (BasicBlock, [2, 2, 2, 2], 64-512 channels, 11.2 M parameters, 44.7 MB of gradients) on
  synthetic 32x32 RGB images with random labels: throughput only.
* ``gpt``: a small GPT-style transformer (pre-LayerNorm blocks, causal self-attention, tied input/output
  embeddings; 4 layers of width 128: 0.83 M parameters) trained at byte level with AdamW on Python's own standard
  library sources (shipped with every Python, no download). Evaluated as the validation loss (nats per byte) on
  modules held out of training.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["GPT", "WORKLOADS", "Workload", "byte_corpus", "make_workload", "resnet18"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- ResNet-18
class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


def resnet18(num_classes: int = 10, stem: str = "imagenet", width: int = 64) -> nn.Module:
    """ResNet-18 (He et al. 2016): BasicBlock x [2, 2, 2, 2], 64/128/256/512 channels, 11.2 M parameters.

    Args:
        num_classes: outputs of the final linear layer.
        width: channels of the first stage (64: the standard network; 32: a quarter of the parameters and of the
            compute, 2.8 M parameters); the later stages have 2, 4 and 8 times as many.
        stem: ``"imagenet"`` (7x7 stride-2 convolution and max-pool, as torchvision's ``resnet18``: a 32x32
            image is 8x8 after the stem) or ``"cifar"`` (3x3 stride-1 convolution, no pool: 16x the compute).
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"Expected `width` to be an integer >= 1, but got {width!r}")
    w = width
    if stem == "imagenet":
        layers: list[nn.Module] = [nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                   nn.MaxPool2d(3, 2, 1)]
    elif stem == "cifar":
        layers = [nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
    else:
        raise ValueError(f"Expected `stem` to be 'imagenet' or 'cifar', but got {stem!r}")
    cin = w
    for cout, stride in ((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------- GPT
class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head self-attention, then a 4x GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT-style language model over bytes; the output layer is the token embedding (tied weights).

    Args:
        vocab: vocabulary size (256: bytes).
        width: model width.
        layers: transformer blocks.
        heads: attention heads per block.
        context: longest sequence (positional embeddings).
    """

    def __init__(self, vocab: int = 256, width: int = 128, layers: int = 4, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.ln(self.blocks(x)) @ self.tok.weight.T


#: standard-library modules of the training text and of the held-out validation text
_TRAIN_MODULES = ("argparse", "ast", "dataclasses", "difflib", "functools", "inspect", "pathlib", "shutil",
                  "subprocess", "typing", "tarfile", "zipfile", "pickle", "enum", "configparser", "statistics")
_VAL_MODULES = ("textwrap", "calendar", "fractions")


def byte_corpus(modules: tuple[str, ...]) -> Tensor:
    """The UTF-8 bytes of standard-library modules' sources, concatenated, as a ``uint8`` tensor."""
    root = sysconfig.get_paths()["stdlib"]
    data = b"".join(open(os.path.join(root, f"{m}.py"), "rb").read() for m in modules)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _windows(text: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    rows = text[starts[:, None] + torch.arange(context + 1)].long()
    return rows[:, :-1], rows[:, 1:]


def _gpt(rank: int, world: int, seed: int, batch: int, width: int, layers: int, heads: int, context: int,
         lr: float, val_batches: int) -> Workload:
    train, val = byte_corpus(_TRAIN_MODULES), byte_corpus(_VAL_MODULES)
    torch.manual_seed(seed)
    model = GPT(width=width, layers=layers, heads=heads, context=context)
    # a fixed validation set: the same windows for every contender and evaluation
    vgen = torch.Generator().manual_seed(1234)
    vx, vy = _windows(val, torch.randint(0, len(val) - context - 1, (val_batches * 32,), generator=vgen), context)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        # each rank its own stream of random windows, the same for every contender
        gen = torch.Generator().manual_seed(seed * 1000 + rank)
        while True:
            yield _windows(train, torch.randint(0, len(train) - context - 1, (batch,), generator=gen), context)

    def evaluate(m: nn.Module) -> float:
        was = m.training
        m.eval()
        with torch.no_grad():
            losses = [gpt_loss(m(x), y) for x, y in zip(vx.split(32), vy.split(32))]
        m.train(was)
        return float(torch.stack(losses).mean())

    return Workload(
        name="gpt",
        model=model,
        batches=batches(),
        make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01),
        evaluate=evaluate,
        batch_size=batch,
        metric="loss",
    )


def gpt_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy per byte, nats."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ---------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """What a rank needs to train and evaluate one workload.

    Attributes:
        name: ``"digits"`` or ``"cnn"``.
        model: freshly initialised model (same weights on every rank: built under the same seed).
        batches: infinite iterator of this rank's ``(x, y)`` training batches.
        make_optimizer: builds the optimizer for the (possibly DDP-wrapped) parameters.
        evaluate: quality of a model on the held-out split (see ``metric``), or ``None`` for throughput-only
            workloads.
        batch_size: samples per rank and step.
        metric: ``"accuracy"`` (higher is better) or ``"loss"`` (nats, lower is better).
    """

    name: str
    model: nn.Module
    batches: Iterator[tuple[Tensor, Tensor]]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    evaluate: Callable[[nn.Module], float] | None
    batch_size: int
    metric: str = "accuracy"

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """The training loss of this workload."""
        return gpt_loss(out, y) if self.name == "gpt" else loss_fn(out, y)


def _digits_split(seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's digits split 70/10/20 with the permutation :class:`DigitsDataModule` uses."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.7 * len(x)), int(0.1 * len(x))
    idx = {"train": perm[:n_train], "val": perm[n_train: n_train + n_val], "test": perm[n_train + n_val:]}
    return {k: (x[v], y[v]) for k, v in idx.items()}


def _sharded_batches(x: Tensor, y: Tensor, batch: int, rank: int, world: int, seed: int) -> Iterator:
    """Epochs of a seeded global shuffle, split across ranks as DistributedSampler does (rank::world)."""
    epoch = 0
    while True:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        mine = perm[rank::world]
        for i in range(0, len(mine) - batch + 1, batch):  # drop_last: every step has full batches
            j = mine[i: i + batch]
            yield x[j], y[j]
        epoch += 1


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def _digits(rank: int, world: int, seed: int, batch: int, hidden: int, depth: int, lr: float) -> Workload:
    sys.path.insert(0, os.path.join(_ROOT, "examples"))
    from digits import DigitsClassifier

    sets = _digits_split(seed=0)  # the demo's split, whatever the training seed
    torch.manual_seed(seed)
    # the LightningModule's own network: its training_step logs through a Trainer, which we do not run
    model = DigitsClassifier(hidden=hidden, depth=depth, lr=lr).net
    xt, yt = sets["test"]
    return Workload(
        name="digits",
        model=model,
        batches=_sharded_batches(*sets["train"], batch, rank, world, seed),
        make_optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=lr),
        evaluate=lambda m: _accuracy(m, xt, yt),
        batch_size=batch,
    )


def _cnn(rank: int, world: int, seed: int, batch: int, stem: str, lr: float, width: int) -> Workload:
    torch.manual_seed(seed)
    model = resnet18(stem=stem, width=width)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed * 1000 + rank)
        # a fixed pool of synthetic images: throughput does not depend on the pixel values
        pool_x = torch.randn(8 * batch, 3, 32, 32, generator=gen)
        pool_y = torch.randint(0, 10, (8 * batch,), generator=gen)
        i = 0
        while True:
            j = torch.arange(i, i + batch) % len(pool_x)
            yield pool_x[j], pool_y[j]
            i += batch

    return Workload(
        name="cnn",
        model=model,
        batches=batches(),
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
        evaluate=None,
        batch_size=batch,
    )


#: default options per workload (overridable on the command line of the benchmark)
WORKLOADS: dict[str, dict] = {
    "digits": {"batch": 32, "hidden": 1024, "depth": 3, "lr": 1e-3},
    "cnn": {"batch": 32, "stem": "imagenet", "lr": 0.01, "width": 64},
    "gpt": {"batch": 32, "width": 128, "layers": 4, "heads": 4, "context": 64, "lr": 2e-3, "val_batches": 8},
}


def make_workload(name: str, rank: int, world: int, seed: int = 0, **options) -> Workload:
    """Build workload ``name`` for ``rank`` of ``world`` with :data:`WORKLOADS` defaults overridden by ``options``."""
    if name not in WORKLOADS:
        raise ValueError(f"Expected `name` to be one of {sorted(WORKLOADS)}, but got {name!r}")
    unknown = sorted(set(options) - set(WORKLOADS[name]))
    if unknown:
        raise ValueError(f"Option `{unknown[0]}` does not apply to workload {name!r} (accepted: {sorted(WORKLOADS[name])})")
    opts = {**WORKLOADS[name], **options}
    if name == "digits":
        return _digits(rank, world, seed, **opts)
    if name == "gpt":
        return _gpt(rank, world, seed, **opts)
    return _cnn(rank, world, seed, **opts)


def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits, y)
