"""The fxcompress:: torch.library ops against a plain dequantize + F.linear / F.conv2d reference."""
import pytest
import torch
import torch.nn.functional as F

from fxcompress.nn import QuantConv2d, QuantLinear
from fxcompress.quant import QuantSpec, QuantWeight

SPECS = [QuantSpec(2, False, "per_group", 16), QuantSpec(3, True, "per_channel", None),
         QuantSpec(4, False, "per_group", 32), QuantSpec(8, True, "per_tensor", None)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}")
def test_quant_linear_op_matches_reference(spec):
    torch.manual_seed(0)
    w, b, x = torch.randn(24, 64), torch.randn(24), torch.randn(3, 5, 64, requires_grad=True)
    qw = QuantWeight.from_float(w, spec)
    layer = QuantLinear(qw, b)
    ref_w = qw.dequantize()
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, ref_w, b))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 5, 24) @ ref_w)
    torch.library.opcheck(torch.ops.fxcompress.quant_linear.default,
                          (x.detach(), layer.qweight, layer.scale, layer.zero_point, layer.bias, spec.bits,
                           spec.symmetric, spec.granularity, spec.group_size or 0, 24, 64))


def test_quant_conv2d_op_matches_reference():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    spec = QuantSpec(4, True, "per_channel", None)
    q = QuantConv2d.from_conv(conv, spec)
    x = torch.randn(2, 4, 9, 9)
    ref = F.conv2d(x, q.dequantized_weight(), conv.bias, 2, 1)
    torch.testing.assert_close(q(x), ref)
    ep = torch.export.export(q, (x,))
    assert [str(n.target) for n in ep.graph.nodes if n.op == "call_function"] == ["fxcompress.quant_conv2d.default"]
    torch.testing.assert_close(ep.module()(x), ref)
