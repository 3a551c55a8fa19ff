"""The tensor-core batch kernel (fxcompress/backends/tvm/kernels/mma_batch.py) on a GPU (gpu mark; the lead runs
these on an H100): 5..32 rows, int4 / int8 x group / channel x zero point off / on, several tiles, each epilogue,
against float references."""
import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from fxcompress.backends.tvm import TVMBuildConfig, compile_tvm  # noqa: E402
from fxcompress.backends.tvm.kernels.epilogue import Epilogue, swiglu_row_order  # noqa: E402
from fxcompress.backends.tvm.kernels.mma_batch import batch_tile, packed_mma_batch_primfunc  # noqa: E402
from fxcompress.backends.tvm.packing import pack_mma_words  # noqa: E402
from fxcompress.nn import QuantLinear  # noqa: E402
from fxcompress.quant import QuantSpec  # noqa: E402
from test_backends_tvm_kernels import MMA_VARIANTS, _Branches  # noqa: E402

pytestmark = pytest.mark.gpu


# the default tiles (staged); 3 row tiles x 4 warps with 3 loads in flight (a last partial load group), staged and
# not; 1 row tile x 2 warps / 2 row tiles x 1 warp, not staged
TILES = {"r3w4pf3-staged": {"rows16": (3, 4, 3, 1), "rows32": (3, 4, 3, 1)},
         "r3w4pf3": {"rows16": (3, 4, 3, 0), "rows32": (3, 4, 3, 0)},
         "small": {"rows16": (1, 2, 8, 0), "rows32": (2, 1, 4, 0)}}
CASES = [(m, "default") for m in (5, 8, 9, 16, 24, 32)] + [(m, t) for t in TILES for m in (9, 32)]


@pytest.mark.parametrize("m,tile", CASES)
def test_cuda_mma_batch_5_to_32_rows_matches_reference(m, tile):
    """Every variant at 5..32 rows (1..4 n8 tiles), N = 384 (24 row tiles), K = 1024, through a whole build: the
    default tile at each row count, the other tiles at 9 and 32 rows."""
    torch.manual_seed(m)
    k, n = 1024, 384
    layers = [QuantLinear.from_linear(nn.Linear(k, n, bias=zp), QuantSpec(bits, not zp, gran,
                                                                          128 if gran == "per_group" else None))
              for bits, gran, zp in MMA_VARIANTS]
    model = _Branches(layers).eval()
    x = torch.randn(1, m, k)
    r = compile_tvm(model, (x,), target="cuda", dtype=torch.float16,
                    config=TVMBuildConfig(mma_batch_tiles=TILES.get(tile)))
    assert [layer["kernel"] for layer in r.info["layers"]] == ["fxc_mma_batch"] * len(layers)
    y = r(x.half().cuda()).float().cpu()
    for i, (layer, variant) in enumerate(zip(layers, MMA_VARIANTS)):
        ref = layer(x.half().float())
        err = (y[..., i * n:(i + 1) * n] - ref).abs().max().item()
        assert err <= 5e-3 * ref.abs().max().item(), (variant, err)


def _run(f, arrays, out):
    lib = tvm.compile(tvm.IRModule({"main": f}), target="cuda")
    lib = getattr(lib, "mod", lib)
    dev = tvm.cuda(0)
    args = [tvm.runtime.tensor(a, dev) for a in arrays] + [tvm.runtime.empty(out.shape, str(out.dtype), dev)]
    lib["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("m", [5, 16, 32])
@pytest.mark.parametrize("epilogue", ["none", "residual", "float32", "swiglu"])
def test_cuda_mma_batch_epilogues_match_reference(m, epilogue, stage):
    """The kernel alone, each epilogue (int4 g128, zero point, bias, 4 row tiles x 8 warps, activations staged in
    shared memory or not), against numpy."""
    rng = np.random.default_rng(m)
    k, n, bits, gs, qmin = 2048, 512, 4, 128, -8
    codes = rng.integers(-8, 8, size=(n, k))
    scale = rng.uniform(0.005, 0.02, size=(n, k // gs)).astype(np.float16)
    zp = rng.integers(-2, 3, size=(n, k // gs)).astype(np.float16)
    bias = rng.standard_normal(n).astype(np.float16)
    x = (rng.standard_normal((m, k)) * 0.5).astype(np.float16)
    w = (codes - np.repeat(zp.astype(np.float32), gs, 1)) * np.repeat(scale.astype(np.float32), gs, 1)
    full = x.astype(np.float32) @ w.T + bias.astype(np.float32)
    arrays, n_out = [x], n
    if epilogue == "swiglu":
        o = swiglu_row_order(n)
        codes, scale, zp, bias = codes[o], scale[o], zp[o], bias[o]
        g, u = full[:, :n // 2], full[:, n // 2:]
        ref, n_out = g / (1 + np.exp(-g)) * u, n // 2
    else:
        ref = full
    arrays += [pack_mma_words(codes, qmin, bits), scale, zp, bias]
    if epilogue == "residual":
        res = rng.standard_normal((m, n)).astype(np.float16)
        arrays.append(res)
        ref = full + res.astype(np.float32)
    tiles = {"rows16": (4, 8, 2, stage), "rows32": (4, 8, 2, stage)}
    assert batch_tile(m, k, n, bits, tiles) == (4, 8, 2, stage)
    f = packed_mma_batch_primfunc(m=m, k=k, n=n, qmin=qmin, group_size=gs, scale_rows=n, has_zero_point=True,
                                  has_bias=True, bits=bits, name="main", tiles=tiles, epilogue=Epilogue(epilogue))
    out = np.zeros((m, n_out), np.float32 if epilogue == "float32" else np.float16)
    y = _run(f, arrays, out).astype(np.float32)
    assert np.abs(y - ref).max() <= 5e-3 * np.abs(ref).max()
