"""tools/train_fashion_cnn.py: the IDX loader on the Debian Fashion-MNIST files and one CPU training step."""
import gzip
import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("train_fashion_cnn",
                                               Path(__file__).resolve().parents[1] / "tools" / "train_fashion_cnn.py")
tfc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tfc)


@pytest.mark.skipif(not tfc.DATA_DIR.is_dir(), reason="Debian dataset-fashion-mnist is not installed")
def test_fashion_mnist_loader_and_one_step():
    xtr, ytr, xte, yte = tfc.load_fashion_mnist()
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28) and xtr.dtype == torch.uint8
    assert torch.bincount(yte).tolist() == [1000] * 10
    for name, (model, rgb) in tfc.make_models().items():
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        xb = tfc.to_input(xtr[:4], 32 if rgb else 28, rgb)
        before = [p.detach().clone() for p in model.parameters()]
        loss = tfc.train_step(model, opt, xb, ytr[:4])
        assert loss > 0 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), name


def test_bad_idx_file(tmp_path):
    p = tmp_path / "bad-idx.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="not an IDX file"):
        tfc.read_idx(p)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        tfc.load_fashion_mnist(tmp_path / "nope")
