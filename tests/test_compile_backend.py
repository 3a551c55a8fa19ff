"""fxc.compile_backend: passes inside torch.compile, lowered by Inductor or TVM, parity with the eager quantized model."""
import pytest
import torch
from torch import nn
from toymodels import DecoderBlock

import fxcompress as fxc
from fxcompress.compile_backend import compile_backend


def _gm(r):
    return getattr(r, "gm", r)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) * 2.0


RTN4 = fxc.RTNConfig(bits=4, symmetric=False, granularity="per_group", group_size=32)


def _eager_quantized(model, x, cfg=RTN4):
    return _gm(fxc.quantize_rtn(fxc.capture(model, (x,)), cfg))


@pytest.mark.parametrize("model_cls,shape,n_linear", [(MLP, (3, 64), 2), (DecoderBlock, (1, 8, 64), 7)])
def test_inductor_parity_and_linears_quantized(model_cls, shape, n_linear):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = model_cls().eval()
    x = torch.randn(*shape)
    backend = compile_backend(passes=[(fxc.quantize_rtn, RTN4)], lower="inductor")
    cm = torch.compile(model, backend=backend)
    with torch.no_grad():
        y = cm(x)
        ref = _eager_quantized(model, x)(x)
        fp = model(x)
    assert len(backend.graphs) == 1
    g = backend.graphs[0].gm
    assert sum(isinstance(m, fxc.nn.QuantLinear) for m in g.modules()) == n_linear
    assert not any(n.op == "call_function" and n.target is torch._C._nn.linear for n in g.graph.nodes)
    rows = backend.report().rows("quantized")
    assert len(rows) == n_linear and all(r.bits == 4 for r in rows)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert (y - fp).abs().max() > 1e-4  # really quantized, not the float model
    for p in model.parameters():  # the user's model is untouched
        assert p.dtype == torch.float32 and p.requires_grad


def test_tvm_llvm_parity():
    pytest.importorskip("tvm")
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = MLP().eval()
    x = torch.randn(3, 64)
    backend = compile_backend(passes=[(fxc.quantize_rtn, RTN4)], lower="tvm", target="llvm")
    cm = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        y = cm(x)
        ref = _eager_quantized(model, x)(x)
    assert sum(isinstance(m, fxc.nn.QuantLinear) for m in backend.graphs[0].gm.modules()) == 2
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_pass_that_changes_nothing_raises():
    torch._dynamo.reset()
    model = MLP().eval()
    backend = compile_backend(passes=[(fxc.quantize_rtn, fxc.RTNConfig(bits=4, targets=("nothing*",)))])
    with pytest.raises(Exception, match="rtn changed nothing"):
        torch.compile(model, backend=backend)(torch.randn(3, 64))


def test_bad_arguments():
    with pytest.raises(ValueError, match="lower must be one of"):
        compile_backend(passes=[(fxc.quantize_rtn, RTN4)], lower="xla")
    with pytest.raises(ValueError, match="passes is empty"):
        compile_backend(passes=[])
    with pytest.raises(ValueError, match=r"passes\[0\] must be a \(pass_fn, config\) tuple"):
        compile_backend(passes=[fxc.quantize_rtn])
