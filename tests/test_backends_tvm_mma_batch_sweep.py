"""tools/sweep_fxc_tiles.py without a GPU: every column's kernel is generated for the rows it applies to and
compiles to CUDA source with its mma / 16-byte loads, and the "default" column names what a default build emits
(the timings themselves need a GPU; the lead runs the sweep)."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import sweep_fxc_tiles as S  # noqa: E402


def test_columns_cover_the_batch_kernel_tiles_at_5_to_32_rows():
    cols = S.variants(S.KERNELS)
    batch = [c for c in cols if c[1] == "fxc_mma_batch"]
    assert [c[2] for c in batch] == S.BATCH_TILES and all(list(c[3]) == list(range(5, 33)) for c in batch)
    assert {8, 16, 32} <= set(S.BATCHES)
    assert {(4096, 4096), (8192, 8192), (4096, 11008), (8192, 28672)} == set(S.SHAPES)


@pytest.mark.parametrize("m", [4, 16, 32])
def test_each_column_kernel_compiles_for_cuda(m):
    import tvm

    k, n = 512, 256
    for label, kind, tile, applies in S.variants(S.KERNELS):
        if m not in applies:
            continue
        f, ran = S.kernel_func(kind, tile, m, k, n, -8)
        src = tvm.compile(tvm.IRModule({"main": f}), target="cuda").mod.imports[0].inspect_source()
        assert ("mma.sync" in src) == (kind != "fxc_gemv"), label
        assert "uint4" in src or kind == "fxc_gemv", label
        assert ran, label
    assert S.default_column(m, 8192, 8192) == (
        ("fxc_mma", "mma w8 pf8") if m == 4 else ("fxc_mma_batch", "batch r2 w8 pf4 s1"))
