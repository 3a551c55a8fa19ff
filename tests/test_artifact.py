import json

import pytest
import torch

import fxcompress as fxc
from toymodels import DecoderBlock


@pytest.fixture
def quantized():
    x = torch.randn(1, 4, 64)
    gm = fxc.capture(DecoderBlock().eval(), (x,))
    res = fxc.rtn_pass(gm, fxc.RTNConfig(bits=3, symmetric=False, granularity="per_group", group_size=32))
    return res.gm, x


def test_save_load_bit_exact(tmp_path, quantized):
    gm, x = quantized
    fxc.save(gm, tmp_path / "a")
    gm2 = fxc.load(tmp_path / "a")
    sd, sd2 = gm.state_dict(), gm2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)
    assert torch.equal(gm(x), gm2(x))
    assert [r.as_dict() for r in fxc.report(gm2)] == [r.as_dict() for r in fxc.report(gm)]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["format_version"] == 1


def test_corrupt_artifacts(tmp_path, quantized):
    gm, _ = quantized
    d = fxc.save(gm, tmp_path / "a")
    w = d / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(fxc.ArtifactError, match="weights.safetensors is corrupt"):
        fxc.load(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(fxc.ArtifactError, match="corrupt"):
        fxc.load(d)
    with pytest.raises(fxc.ArtifactError, match="manifest.json is missing"):
        fxc.load(tmp_path / "nothing")


def test_future_format_version(tmp_path, quantized):
    d = fxc.save(quantized[0], tmp_path / "a")
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(fxc.ArtifactError, match="format_version 99"):
        fxc.load(d)
