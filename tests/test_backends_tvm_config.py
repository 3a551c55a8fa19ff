"""TVMBuildConfig (fxcompress/backends/tvm/config.py): validation naming the field, frozen, and the knobs reach
the kernel choice; the TVM build prints no "Scope Saving/Loaded" lines."""
import dataclasses

import pytest
import torch
from torch import nn

import fxcompress.backends.tvm as B
from fxcompress.backends.tvm import TVMBuildConfig, fxc_kind
from fxcompress.backends.tvm.kernels import Tile, tile_for


@pytest.mark.parametrize("kwargs,field", [
    (dict(gemv_kernel="cublas"), "gemv_kernel"), (dict(decode_mode="fast"), "decode_mode"),
    (dict(small_batch_max_m=-1), "small_batch_max_m"), (dict(small_batch_max_m=True), "small_batch_max_m"),
    (dict(mma_min_m=1.5), "mma_min_m"), (dict(gemv_cuda={"TX": 4}), "gemv_cuda"),
    (dict(tiles={"batch8": Tile()}), "tiles"), (dict(mma_tiles={"small": (8,)}), "mma_tiles"),
    (dict(gemv_cuda=[("TS", 4)]), "gemv_cuda"),
    (dict(ms_builder_timeout_s=0), "ms_builder_timeout_s"), (dict(ms_cost_model="mlp"), "ms_cost_model"),
    (dict(ms_compete="yes"), "ms_compete"), (dict(ms_compete_trials=-1), "ms_compete_trials"),
    (dict(te_linears={(1, 2, 3)}), "te_linears"),
    (dict(te_linears={("a", 2, 3, 4, 5)}), "te_linears"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TVMBuildConfig.{field}"):
        TVMBuildConfig(**kwargs)


def test_frozen_and_its_dicts_are_copies():
    given = {"TS": 4}
    cfg = TVMBuildConfig(gemv_cuda=given)
    given["TS"] = 64
    assert cfg.gemv_cuda["TS"] == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.decode_mode = "convert"
    with pytest.raises(TypeError):
        cfg.gemv_cuda["TS"] = 8
    assert dataclasses.replace(cfg, decode_mode="convert").gemv_cuda["TS"] == 4


def test_no_module_globals_left():
    """The knobs are arguments now: nothing for tests or tools to patch."""
    for name in ("GEMV_KERNEL", "DECODE_MODE", "GEMV_CUDA_CONFIG", "SMALL_BATCH_MAX_M", "TILES", "MMA_TILES",
                 "MMA_MIN_M"):
        assert not hasattr(B, name)
        assert not hasattr(B.kernels, name)


def test_config_reaches_the_kernel_choice():
    shape = dict(m=1, k=4096, n=4096, bits=4, gs=128, dtype="float16")
    assert fxc_kind(**shape) == "fxc_mma"
    assert fxc_kind(**shape, config=TVMBuildConfig(mma_min_m=2)) == "fxc_gemv"  # tensor cores only from 2 rows
    assert fxc_kind(**{**shape, "bits": 2}) == "fxc_gemv"
    # a CUDA-core tile override: 3 rows x 8 warps (24) does not divide N=4104 after shrinking -> no fxc kernel
    assert tile_for(5, 4096, 4096, {"batch": Tile(8, 4, 1)}) == Tile(8, 4, 1)
    assert tile_for(5, 4096, 4096) == Tile(4, 4, 2)


def test_build_rejects_a_non_config():
    pytest.importorskip("tvm")
    with pytest.raises(B.TVMBackendError, match="TVMBuildConfig"):
        B.build_tvm(nn.Sequential(nn.Linear(4, 4)), (torch.randn(1, 4),), target="llvm", config={"decode_mode": "x"})


def test_tvm_build_and_load_print_no_scope_lines(tmp_path, capfd):
    """TVM's VM executable logs one "Scope Saving:" / "Scope Loaded:" line per memory scope from C++; fxcompress
    drops them (other stderr output still gets through)."""
    pytest.importorskip("tvm")
    import fxcompress as fxc

    torch.manual_seed(0)
    x = torch.randn(2, 32)
    gm = fxc.quantize_rtn(fxc.capture(nn.Sequential(nn.Linear(32, 16), nn.ReLU()), (x,)), fxc.RTNConfig(bits=8))
    r = fxc.compile_tvm(gm, (x,), target="llvm")
    path = r.export_library(tmp_path / "m.so")
    r2 = fxc.runtime.load_runner(str(path), backend="tvm")
    torch.testing.assert_close(r2(x), gm(x), atol=1e-5, rtol=1e-5)
    err = capfd.readouterr().err
    assert "Scope Saving" not in err and "Scope Loaded" not in err


def test_te_linears_send_a_layer_to_the_te_kernel():
    """A signature in te_linears (what tune='meta_schedule' stores when a tuned kernel won) skips the hand kernel."""
    import numpy as np
    from tvm import relax

    from fxcompress.backends.tvm import emit_packed_linear, pack_words

    def kinds(cfg):
        bb, used = relax.BlockBuilder(), []
        x = relax.Var("x", relax.TensorType((4, 512), "float16"))
        with bb.function("main", [x]):
            with bb.dataflow():
                y = emit_packed_linear(bb, x, pack_words(np.zeros((64, 512), np.int64), 4, -8),
                                       np.ones((64, 4), np.float16), None, bits=4, qmin=-8, out_features=64,
                                       in_features=512, cuda=True, used=used, config=cfg)
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        return used

    assert kinds(TVMBuildConfig()) == ["fxc_mma"]
    assert kinds(TVMBuildConfig(te_linears={(4, 512, 64, 4, 128)})) == ["te"]
    assert kinds(TVMBuildConfig(te_linears={(4, 512, 64, 4, 64)})) == ["fxc_mma"]  # another layer
