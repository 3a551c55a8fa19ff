"""Real photos without ImageNet: scikit-learn's two sample photos, cut into many fixed crops.

No ImageNet images ship in any package here, so compressed ImageNet models are measured by their
agreement with the float model on real photos.  ``photos()`` returns the photos bundled with
scikit-learn (``china.jpg``, ``flower.jpg``, 427x640 RGB), decoded by :mod:`fxcompress.data.jpeg`
(no Pillow needed); ``photo_crops(n)`` cuts ``n`` deterministic random-resized crops (area 8-100%,
aspect 3/4-4/3, half of them mirrored) resized to ``size`` and normalized with the ImageNet
mean/std that torchvision's ImageNet models expect.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PHOTO_NAMES = ("china.jpg", "flower.jpg")
# the range of an ImageNet-normalized image, (0 - max mean) / its std .. (1 - min mean) / its std: the input range
# for integer activations without data (ActivationConfig(input_range=IMAGENET_INPUT_RANGE))
IMAGENET_INPUT_RANGE = (min(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)),
                        max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)))


def _sklearn_images_dir() -> str:
    try:
        import sklearn.datasets
    except ModuleNotFoundError:
        raise FileNotFoundError("the sample photos ship with scikit-learn: pip install scikit-learn") from None
    return os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    from .jpeg import decode_jpeg

    path = os.path.join(_sklearn_images_dir(), name)
    with open(path, "rb") as f:
        img = decode_jpeg(f.read())
    img.setflags(write=False)
    return img


def photos() -> dict[str, np.ndarray]:
    """The bundled photos as read-only uint8 arrays (H, W, 3), keyed by file name."""
    return {n: _photo(n) for n in PHOTO_NAMES}


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) floats in [0, 1] -> ImageNet-normalized."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def photo_crops(n: int = 256, size: int = 224, seed: int = 0, normalized: bool = True) -> torch.Tensor:
    """``n`` fixed crops (N, 3, size, size), alternating between the photos; the same for the same arguments."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    rng = np.random.default_rng(seed)
    imgs = [torch.from_numpy(np.array(_photo(p))).permute(2, 0, 1).float() / 255.0 for p in PHOTO_NAMES]
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = imgs[i % len(imgs)]
        h, w = img.shape[1:]
        for _ in range(10):
            area = h * w * rng.uniform(0.08, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            ch, cw = int(round(math.sqrt(area / aspect))), int(round(math.sqrt(area * aspect)))
            if 0 < ch <= h and 0 < cw <= w:
                break
        else:
            ch = cw = min(h, w)
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[:, y0:y0 + ch, x0:x0 + cw][None]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if rng.uniform() < 0.5:
            crop = crop.flip(-1)
        out[i] = crop[0].clamp(0, 1)
    return normalize(out) if normalized else out
