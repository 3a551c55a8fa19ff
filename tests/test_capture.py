import pytest
import torch
import torch.fx as fx

import fxcompress as fxc
from toymodels import DataDependent, DecoderBlock, ResidualCNN, ShapeDependent, same_state, state_copy


def test_residual_cnn_symbolic_trace():
    m = ResidualCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    sd = state_copy(m)
    gm = fxc.capture(m, (x,))
    assert isinstance(gm, fx.GraphModule) and gm.meta["fxcompress_capture"] == "symbolic_trace"
    assert torch.allclose(gm(x), m(x))
    assert any(n.op == "call_function" and "add" in str(n.target) for n in gm.graph.nodes)
    assert gm is not m and same_state(m, sd)
    # the graph holds copies, not the user's parameters
    next(gm.parameters()).data.add_(1.0)
    assert same_state(m, sd)


def test_transformer_block():
    m = DecoderBlock().eval()
    x = torch.randn(2, 5, 64)
    gm = fxc.capture(m, (x,))
    mods = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in mods
    assert torch.allclose(gm(x), m(x), atol=1e-6)


def test_shape_dependent_falls_back_to_export():
    m = ShapeDependent()
    x = torch.randn(3, 4)
    gm = fxc.capture(m, (x,))
    assert gm.meta["fxcompress_capture"] == "torch.export"
    assert torch.allclose(gm(x), m(x))


def test_data_dependent_control_flow_errors_clearly():
    with pytest.raises(fxc.CaptureError) as ei:
        fxc.capture(DataDependent(), (torch.randn(2, 4),))
    msg = str(ei.value)
    assert "DataDependent" in msg and "symbolic_trace failed" in msg and "torch.export failed" in msg


def test_failing_submodule_is_named():
    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DataDependent()

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(fxc.CaptureError, match=r"inner \(DataDependent\)"):
        fxc.capture(Outer(), (torch.randn(2, 4),), method="symbolic_trace")


def test_non_module_input():
    with pytest.raises(fxc.CaptureError, match="model must be a torch.nn.Module"):
        fxc.capture(lambda x: x, (torch.randn(1),))
    with pytest.raises(ValueError, match="example_inputs"):
        fxc.capture(ResidualCNN(), "not a tensor")


def test_capture_does_not_move_bn_statistics():
    m = ResidualCNN().train()
    sd = state_copy(m)
    fxc.capture(m, (torch.randn(4, 3, 8, 8),))
    assert same_state(m, sd) and m.training
