"""Recipe for the shipped DigitsResNet weights: python tools/train_digits_resnet.py"""
from pathlib import Path

from safetensors.torch import save_file

from fxcompress.models.digits import WEIGHTS, accuracy, load_digits_split, train_digits_resnet

if __name__ == "__main__":
    model = train_digits_resnet(progress=True)
    _, _, xte, yte = load_digits_split()
    print(f"test accuracy: {accuracy(model, xte, yte):.2f}%")
    Path(WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS))
    print(f"wrote {WEIGHTS}")
