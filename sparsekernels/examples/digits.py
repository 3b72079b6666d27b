"""The built-in real dataset and model every accuracy measurement uses: scikit-learn's bundled handwritten
digits (1,797 8x8 grey images, 10 classes; no download) and a small BatchNorm CNN.

Used by the demo, the pruning-quality benchmark and the accuracy tests, so that they all measure the same
thing. Needs scikit-learn (``pip install -e ".[demo]"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsData", "load_digits_data", "DigitsCNN", "train_classifier", "evaluate_accuracy"]


@dataclass(frozen=True)
class DigitsData:
    """Train / test split of the digits, as ``[N, 1, 8, 8]`` float32 images (standardised) and int64 labels."""

    train: TensorDataset
    test: TensorDataset

    def train_loader(self, batch_size: int = 64, seed: int = 0) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        return DataLoader(self.train, batch_size=batch_size, shuffle=True, generator=g)

    def test_loader(self, batch_size: int = 512) -> DataLoader:
        return DataLoader(self.test, batch_size=batch_size)


def load_digits_data(test_fraction: float = 0.25, seed: int = 0) -> DigitsData:
    """Load scikit-learn's digits and split them (stratified, deterministic for a given ``seed``).

    Raises:
        ValueError: ``test_fraction`` not in (0, 1).
        ImportError: scikit-learn is not installed (the message says how to install it).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits_data(): expected 0 < test_fraction < 1, got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('the digits dataset needs scikit-learn: pip install -e ".[demo]"') from e
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = x_tr.mean(), x_tr.std()

    def to_ds(xs, ys):
        images = torch.tensor((xs - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(images, torch.tensor(ys, dtype=torch.int64))

    return DigitsData(to_ds(x_tr, y_tr), to_ds(x_te, y_te))


def _conv_bn_relu(cin: int, cout: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """A 3x3 convolution (no bias: BatchNorm follows), BatchNorm and ReLU."""
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)


class DigitsCNN(nn.Module):
    """A small VGG-style CNN for 8x8 digits: three conv-BN-ReLU stages, global pooling, a 2-layer head.

    ``width`` sets the first stage's channels (then 2x and 4x); keep it a multiple of 4 so every layer after
    the first is eligible for 2:4 along its input channels.
    """

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        if width < 1:
            raise ValueError(f"DigitsCNN: expected width >= 1, got {width}")
        w1, w2, w3 = width, 2 * width, 4 * width
        # one flat Sequential (not nested stages): the layer names features.0, features.1, ... are what saved
        # state dicts and the tests refer to
        self.features = nn.Sequential(
            *_conv_bn_relu(1, w1),
            *_conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w2, w3),
            *_conv_bn_relu(w3, w3),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(w3, w3),
            nn.ReLU(inplace=True),
            nn.Linear(w3, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_classifier(
    model: nn.Module,
    data: DigitsData,
    *,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` with AdamW + cosine schedule and cross-entropy; returns the mean loss of each epoch."""
    from tqdm.auto import tqdm

    if epochs < 1:
        raise ValueError(f"train_classifier(): expected epochs >= 1, got {epochs}")
    torch.manual_seed(seed)
    loader = data.train_loader(batch_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    losses = []
    model.train()
    for _ in tqdm(range(epochs), desc="train", disable=not progress, leave=False):
        total, count = 0.0, 0
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            count += len(y)
        losses.append(total / count)
    model.eval()
    return losses


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: DigitsData) -> float:
    """Test-set accuracy of ``model`` in percent (the model is put in eval mode)."""
    model.eval()
    correct = total = 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for x, y in data.test_loader():
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return 100.0 * correct / total
