"""A small residual CNN with BatchNorm on scikit-learn's bundled handwritten digits (8x8, 10 classes).

Real data that ships inside a package (no downloads).  Trained weights ship in
``weights/digits_resnet.safetensors``; ``tools/train_digits_resnet.py`` is the recipe.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).parent / "weights" / "digits_resnet.safetensors"


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """ResNet-style: stem, 4 basic blocks (32 -> 64 channels), global pool, linear head."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def load_digits_split(test_fraction: float = 0.25, seed: int = 0):
    """(x_train, y_train, x_test, y_test): float32 images (N, 1, 8, 8) scaled to [0, 1], int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def train_digits_resnet(epochs: int = 30, seed: int = 0, progress: bool = False) -> DigitsResNet:
    """The recipe behind the shipped weights (about half a minute on 2 CPU cores)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    xtr, ytr, _, _ = load_digits_split()
    model = DigitsResNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="train digits", disable=not progress):
        model.train()
        for idx in torch.randperm(len(ytr), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def pretrained_digits_resnet() -> DigitsResNet:
    """The shipped trained DigitsResNet, in eval mode."""
    from safetensors.torch import load_file

    model = DigitsResNet()
    model.load_state_dict(load_file(WEIGHTS))
    return model.eval()


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy of ``model`` (anything callable on a batch) in percent."""
    correct = 0
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        out = out[0] if isinstance(out, (tuple, list)) else out
        correct += int((torch.as_tensor(out).argmax(-1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(y)
