"""Passes on torch.export ExportedPrograms: EP in, EP out, saved/loaded, lowered to ORT (both exporters) and TVM."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from toymodels import DecoderBlock

import fxcompress as fxc
from fxcompress.models import pretrained_digits_resnet


def _lowerings_match(ep, x, tmp_path, atol=1e-4, dynamo=False):
    """save/load with torch.export, then ORT (export_onnx, and with ``dynamo`` torch.onnx's dynamo exporter
    with the fxcompress translations) and TVM llvm, against the program's own output."""
    import onnxruntime as ort

    from fxcompress.backends.onnx_custom_ops import translation_table

    torch.export.save(ep, tmp_path / "p.pt2")
    ep2 = torch.export.load(tmp_path / "p.pt2")
    ref = ep.module()(x).detach()
    assert torch.equal(ep2.module()(x), ref)
    runner = fxc.runtime.load_runner(str(fxc.export_onnx(ep2, (x,), tmp_path / "m.onnx", accuracy_level=0)),
                                     backend="ort", device="cpu", matmulnbits_accuracy_level=0)  # fp32 compute
    np.testing.assert_allclose(np.asarray(runner(x)), ref.numpy(), atol=atol)
    if dynamo:
        prog = torch.onnx.export(ep2, dynamo=True, custom_translation_table=translation_table())
        prog.save(str(tmp_path / "d.onnx"))
        s = ort.InferenceSession(str(tmp_path / "d.onnx"))
        np.testing.assert_allclose(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0], ref.numpy(), atol=atol)
    tr = fxc.compile_tvm(ep2, (x,), target="llvm")
    np.testing.assert_allclose(np.asarray(tr(x)), ref.numpy(), atol=atol)
    return ep2


def _ops(ep):
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "fxcompress" in str(n.target)}


def test_rtn_and_udfc_on_cnn_program(tmp_path):
    m = pretrained_digits_resnet().eval()
    x = torch.randn(2, 1, 8, 8)
    ep = torch.export.export(m, (x,))
    q = fxc.quantize_rtn(ep, fxc.RTNConfig(bits=8))
    assert isinstance(q, torch.export.ExportedProgram)
    assert _ops(q) == {"fxcompress.quant_conv2d.default", "fxcompress.quant_linear.default"}
    assert torch.allclose(q.module()(x), m(x), atol=0.2)
    assert len(fxc.report(q)) == 11
    _lowerings_match(q, x, tmp_path, dynamo=True)
    u = fxc.udfc(ep, config=fxc.UDFCConfig(prune_ratio=0.3, weight_bits=6))
    assert isinstance(u, torch.export.ExportedProgram) and "fxcompress.quant_conv2d.default" in _ops(u)
    ref = fxc.udfc(m, (x,), fxc.UDFCConfig(prune_ratio=0.3, weight_bits=6)).eval()
    assert torch.allclose(u.module()(x), ref(x), atol=1e-4)  # the same compression as on the traced graph
    _lowerings_match(u, x, tmp_path)
    p = fxc.prepare_l4q(ep, config=fxc.L4QConfig(bits=4, group_size=32, lora_rank=4, exclude=()))
    assert _ops(p) == {"fxcompress.l4q_linear.default"} and fxc.report(p).rows("prepared")[0].layer == "fc"
    c = fxc.convert_l4q(p)
    assert torch.allclose(c.module()(x), p.module()(x), atol=1e-4)  # converted == fake-quant forward
    _lowerings_match(c, x, tmp_path)


def test_udfc_on_decoder_block_program():
    m = DecoderBlock().eval()
    x = torch.randn(1, 6, 64)
    cfg = fxc.UDFCConfig(weight_bits=8, skip=())
    u = fxc.udfc(torch.export.export(m, (x,)), config=cfg)  # no BatchNorm: quantized, not pruned
    assert _ops(u) == {"fxcompress.quant_linear.default"}
    assert torch.allclose(u.module()(x), fxc.udfc(m, (x,), cfg)(x), atol=1e-5)


def test_l4q_on_decoder_block_program(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 6, 64)
    ep = torch.export.export(DecoderBlock().eval(), (x,))
    cfg = fxc.L4QConfig(bits=4, group_size=32, lora_rank=4, exclude=())
    p = fxc.prepare_l4q(ep, config=cfg)
    assert _ops(p) == {"fxcompress.l4q_linear.default"}
    qm = p.module()
    params = [t for t in qm.parameters() if t.requires_grad]
    assert len(params) == 7 * 4  # lora A, B, scale, offset per linear
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.randn(1, 6, 64)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(qm(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        fake = qm(x)
    from fxcompress.nn import QuantLinear

    c = fxc.convert_l4q(qm)  # the trained ep.module(): a GraphModule with QuantLinear modules
    assert sum(isinstance(mod, QuantLinear) for mod in c.modules()) == 7
    assert torch.allclose(c(x), fake, atol=1e-4)
    assert _ops(fxc.convert_l4q(p)) == {"fxcompress.quant_linear.default"}  # program in, program out
    c = fxc.convert_l4q(torch.export.export(qm, (x,)))
    assert torch.allclose(c.module()(x), fake, atol=1e-4)
    _lowerings_match(c, x, tmp_path)
    r = fxc.quantize_rtn(ep, fxc.RTNConfig(bits=3, symmetric=False, granularity="per_group", group_size=32))
    _lowerings_match(r, x, tmp_path, dynamo=True)


def test_dynamic_batch_is_kept():
    m = DecoderBlock().eval()
    ep = torch.export.export(m, (torch.randn(2, 5, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    q = fxc.quantize_rtn(ep, fxc.RTNConfig(bits=8))
    x = torch.randn(3, 5, 64)
    assert torch.allclose(q.module()(x), m(x), atol=0.2)


def test_pass_manager_takes_passes_directly():
    from functools import partial

    from torch.fx.passes.infra.pass_manager import PassManager

    gm = fxc.capture(DecoderBlock().eval(), (torch.randn(1, 3, 64),))
    out = PassManager(passes=[partial(fxc.rtn_pass, config=fxc.RTNConfig(bits=8))])(gm)
    assert out.modified and len(fxc.report(out.graph_module)) == 7


def test_nothing_changed_raises_with_reasons_and_what_to_do():
    m = pretrained_digits_resnet().eval()
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(fxc.NothingToCompressError, match=r"group_size=128 does not divide in_features=64.*"
                                                         r"Try group_size=64 or group_size=None"):
        fxc.prepare_l4q(m, (x,), fxc.L4QConfig(group_size=128, exclude=()))
    with pytest.warns(UserWarning, match="rtn changed nothing"):
        out = fxc.quantize_rtn(fxc.capture(m, (x,)), fxc.RTNConfig(bits=4, granularity="per_group", group_size=128,
                                                                  on_noop="warn"))
    assert fxc.report(out).rows("quantized") == []
    with pytest.raises(ValueError, match="on_noop"):
        fxc.RTNConfig(on_noop="ignore")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_named(bad):
    m = DecoderBlock().eval()
    x = torch.randn(1, 3, 64)
    gm = fxc.capture(m, (x,))
    with torch.no_grad():
        m.k_proj.weight[0, 0] = bad
        gm.get_submodule("k_proj").weight[0, 0] = bad
    with pytest.raises(fxc.NonFiniteWeightError, match="'k_proj.weight'"):
        fxc.capture(m, (x,))
    with pytest.raises(fxc.NonFiniteWeightError, match="rtn: 'k_proj.weight'"):
        fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4))
    with pytest.raises(fxc.NonFiniteWeightError, match="k_proj.weight"):
        fxc.udfc_pass(torch.export.export(m, (x,)), fxc.UDFCConfig())


def test_import_is_lazy():
    code = ("import sys, fxcompress, fxcompress.nn, fxcompress.passes; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'tvm', 'onnxscript')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_program_inputs_the_pass_cannot_reexport_are_named():
    class KwModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, *, x):
            return self.fc(x)

    ep = torch.export.export(KwModel(), (), {"x": torch.randn(2, 8)},
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    with pytest.raises(ValueError, match=r"input 0 dim 0 \(s\d+\) is dynamic"):
        fxc.quantize_rtn(ep, fxc.RTNConfig(bits=8))
    static = torch.export.export(KwModel(), (), {"x": torch.randn(2, 8)})
    static.example_inputs = None
    with pytest.raises(ValueError, match="carries no example inputs"):
        fxc.quantize_rtn(static, fxc.RTNConfig(bits=8))
