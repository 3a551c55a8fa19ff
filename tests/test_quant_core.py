import numpy as np
import pytest
import torch

from fxcompress.quant import QuantSpec, QuantWeight, dequantize, minmax_params, pack, packed_nbytes, quantize, unpack

ALL_SPECS = [QuantSpec(b, sym, "per_tensor", None) for b in (2, 3, 4, 8) for sym in (True, False)] + \
            [QuantSpec(b, sym, "per_channel", None) for b in (2, 3, 4, 8) for sym in (True, False)] + \
            [QuantSpec(b, sym, "per_group", g) for b in (2, 3, 4, 8) for sym in (True, False) for g in (16, 32)]


def np_reference(w: np.ndarray, spec: QuantSpec):
    """The affine quantizer written plainly in numpy, one group at a time."""
    out, rows = w.shape[0], w.reshape(w.shape[0], -1)
    codes = np.zeros_like(rows, dtype=np.int64)
    deq = np.zeros_like(rows)
    if spec.granularity == "per_tensor":
        groups = [(slice(None), slice(None))]
    elif spec.granularity == "per_channel":
        groups = [(slice(r, r + 1), slice(None)) for r in range(out)]
    else:
        groups = [(slice(r, r + 1), slice(c, c + spec.group_size)) for r in range(out)
                  for c in range(0, rows.shape[1], spec.group_size)]
    if spec.symmetric:
        qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    else:
        qmin, qmax = 0, 2**spec.bits - 1
    for rs, cs in groups:
        g = rows[rs, cs]
        if spec.symmetric:
            s, z = max(np.abs(g).max() / qmax, 1e-8), 0.0
        else:
            s = max((g.max() - g.min()) / (qmax - qmin), 1e-8)
            z = np.clip(np.round(qmin - g.min() / s), qmin, qmax)
        q = np.clip(np.round(g / s) + z, qmin, qmax)
        codes[rs, cs] = q
        deq[rs, cs] = (q - z) * s
    return codes.reshape(w.shape), deq.reshape(w.shape)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_quantize_matches_numpy(spec):
    w = torch.randn(12, 64, dtype=torch.float64)
    scale, zp = minmax_params(w, spec)
    codes = quantize(w, scale.double(), zp.double(), spec)
    deq = dequantize(codes, scale.double(), zp.double(), spec, dtype=torch.float64)
    ref_codes, ref_deq = np_reference(w.numpy(), spec)
    # float32 scales: codes may differ by one only where a value sits on a rounding tie
    mism = (codes.numpy() != ref_codes)
    assert mism.mean() < 0.002
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    close = np.abs(deq.numpy() - ref_deq) <= 1e-5 + 1e-5 * np.abs(ref_deq)
    assert (close | mism).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_bound(bits):
    w = torch.randn(8, 128)
    spec = QuantSpec(bits, False, "per_group", 32)
    scale, zp = minmax_params(w, spec)
    deq = dequantize(quantize(w, scale, zp, spec), scale, zp, spec)
    err = (deq - w).reshape(8, 4, 32).abs()
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-6).all()  # round-to-nearest within half a step


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 1001])
def test_pack_roundtrip(bits, n):
    for qmin in (0, -(2 ** (bits - 1))):
        codes = torch.randint(qmin, qmin + 2**bits, (n,), dtype=torch.int32)
        p = pack(codes, bits, qmin)
        assert p.dtype == torch.uint8 and p.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
        assert torch.equal(unpack(p, bits, n, qmin), codes)


def test_pack_layout_is_low_bits_first():
    assert pack(torch.tensor([1, 2]), 4).tolist() == [0x21]
    # 3-bit: 0b101, 0b011, 0b111 -> bit stream 101 110 111 (LSB first) -> bytes 0xDD, 0x01
    assert pack(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.tensor([1]), 5)
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 10)


@pytest.mark.parametrize("spec", ALL_SPECS[::3], ids=str)
def test_quant_weight_roundtrip(spec):
    w = torch.randn(6, 64)
    qw = QuantWeight.from_float(w, spec)
    scale, zp = minmax_params(w, spec)
    assert torch.equal(qw.codes(), quantize(w, scale, zp, spec))
    assert torch.allclose(qw.dequantize(), dequantize(qw.codes(), scale, zp, spec))
    assert qw.packed.numel() == (w.numel() * spec.bits + 7) // 8


@pytest.mark.parametrize("field,kwargs,match", [
    ("bits", dict(bits=5), "bits"),
    ("bits", dict(bits=16), "bits"),
    ("granularity", dict(granularity="per_row"), "granularity"),
    ("group_size", dict(granularity="per_group", group_size=0), "group_size"),
    ("group_size", dict(granularity="per_channel", group_size=64), "group_size"),
])
def test_spec_validation(field, kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_group_size_must_divide():
    spec = QuantSpec(4, False, "per_group", 48)
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=64"):
        QuantWeight.from_float(torch.randn(4, 64), spec)


def test_spec_ranges():
    assert (QuantSpec(3, True, "per_channel", None).qmin, QuantSpec(3, True, "per_channel", None).qmax) == (-4, 3)
    assert (QuantSpec(3, False, "per_channel", None).qmin, QuantSpec(3, False, "per_channel", None).qmax) == (0, 7)
