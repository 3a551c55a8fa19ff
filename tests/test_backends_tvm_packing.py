"""Code packing of the TVM backend (fxcompress/backends/tvm/packing.py): pure numpy, no TVM needed."""
import numpy as np
import pytest

from fxcompress.backends.tvm.packing import mma_k_per_load, pack_mma_words, pack_words, unpack_words


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_words_roundtrip_and_layout(bits):
    rng = np.random.default_rng(bits)
    qmin = -(2 ** (bits - 1))
    codes = rng.integers(qmin, 2 ** (bits - 1), size=(5, 37))
    words = pack_words(codes, bits, qmin)
    per = 32 // bits
    assert words.dtype == np.uint32 and words.shape == (5, -(-37 // per))
    np.testing.assert_array_equal(unpack_words(words, bits, 37, qmin), codes)
    # plain reference: code k of a row is bits [(k % per) * bits, ...) of word k // per, offset binary
    k = 13
    assert (int(words[2, k // per]) >> ((k % per) * bits)) & (2**bits - 1) == codes[2, k] - qmin


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_mma_words_matches_the_fragment_layout(bits):
    """Each lane's words hold exactly its mma.m16n8k16 A-fragment codes (PTX ISA layout), low/high halves paired."""
    rng = np.random.default_rng(0)
    qmin = -(2 ** (bits - 1))
    codes = rng.integers(qmin, -qmin, size=(32, 128))
    w = pack_mma_words(codes, qmin, bits)
    kpl = mma_k_per_load(bits)  # 64 (int4) / 32 (int8) of K per 16-byte load
    assert w.shape == (2, 128 // kpl, 32, 4) and w.dtype == np.uint32
    r = 16 // bits  # A registers per word
    for rb, kq, lane in [(0, 0, 0), (1, 1, 31), (0, 1, 13), (1, 0, 6)]:
        g, t = lane // 4, lane % 4
        for j in range(kpl // 16):  # 16-wide K slice inside the load
            for i, (dr, dc) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
                word = int(w[rb, kq, lane, j * (4 // r) + i // r])
                for h in range(2):
                    u = (word >> (bits * (i % r) + 16 * h)) & (2**bits - 1)
                    assert u + qmin == codes[rb * 16 + g + dr, kq * kpl + j * 16 + 2 * t + dc + h]
    with pytest.raises(ValueError, match="N % 16"):
        pack_mma_words(codes[:8], qmin, bits)
