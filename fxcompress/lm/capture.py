"""A causal LM -> one ATen-level fx graph at a fixed ``[batch, seq]`` shape, integer layers kept as modules.

``torch.export`` traces the model (a plain module, a Hugging Face ``*ForCausalLM``, or a GraphModule from
``quantize_rtn`` / ``convert_l4q``) with every ``QuantLinear`` swapped for an opaque custom op, so the packed
weights are not inlined into dequantize arithmetic.  Afterwards each such op node becomes a ``call_module``
node on the original ``QuantLinear`` again: the backends (``export_onnx``, ``lower_to_relax``) find the
integer layers where they look for them.  The graph has plain (flat) inputs ``input_ids`` and outputs
``logits``; the user's model is not modified.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from ..nn import QuantLinear
from ..passes.graph import unsuffixed_path
from .errors import LMError

__all__ = ["capture_lm", "is_hf_causal_lm", "with_quant_layers"]

_ACTIVE: dict[int, QuantLinear] = {}
_COUNTER = [0]


@torch.library.custom_op("fxc_lm::quant_linear", mutates_args=())
def _quant_linear_op(x: torch.Tensor, site: int, out_features: int) -> torch.Tensor:
    mod = _ACTIVE.get(site)
    if mod is None:
        raise RuntimeError(f"fxc_lm::quant_linear site {site} is not registered (used only while capturing)")
    return mod(x).clone()


@_quant_linear_op.register_fake
def _(x, site, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


class _Stub(nn.Module):
    def __init__(self, site: int, out_features: int):
        super().__init__()
        self.site, self.out_features = site, out_features

    def forward(self, x):
        return torch.ops.fxc_lm.quant_linear(x, self.site, self.out_features)


class _HFLogits(nn.Module):
    """``input_ids -> logits`` of a Hugging Face causal LM, without its own cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def is_hf_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "generation_config") and hasattr(model, "get_input_embeddings")


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def _logits_of(out):
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise LMError(f"the model's forward(input_ids) must return logits [batch, seq, vocab], got {type(out).__name__}")


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return _logits_of(self.model(input_ids))


def with_quant_layers(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """A copy of ``model`` with the ``QuantLinear`` layers of ``quantized`` (``quantize_rtn`` / ``convert_l4q`` of a
    graph captured from ``model``) put in place of the matching layers (same module path, or the same path below
    a wrapper prefix).  Use it for models that ``torch.export`` captured at one fixed shape (Hugging Face models):
    ``compile_lm(with_quant_layers(hf_model, converted_gm))``."""
    out = copy.deepcopy(model)
    names = {n for n, _ in out.named_modules()}
    done = 0
    for path, mod in quantized.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        parts = path.split(".")
        if ".".join(parts) not in names:  # a tied lm_head is quantized under a fresh path, "lm_head_q0"
            plain = unsuffixed_path(path).split(".")
            if any(".".join(plain[i:]) in names for i in range(len(plain))):
                parts = plain
        target = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in names), None)
        if target is None:
            raise LMError(f"quantized layer {path!r} has no matching module in {type(model).__name__}")
        _set_submodule(out, target, copy.deepcopy(mod))
        done += 1
    if not done:
        raise LMError("the quantized model holds no QuantLinear layers (run quantize_rtn / convert_l4q first)")
    return out.eval()


def capture_lm(model: nn.Module, batch: int, seq: int, dtype: torch.dtype | None = None) -> fx.GraphModule:
    """``model`` traced at ``input_ids`` of shape ``[batch, seq]`` -> GraphModule ``(input_ids) -> logits``."""
    if not isinstance(model, nn.Module):
        raise LMError(f"compile_lm needs a torch.nn.Module causal LM, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule) and model.meta.get("fxcompress_capture") == "torch.export":
        raise LMError("this GraphModule was captured by torch.export at one fixed input shape and cannot be traced "
                      "again at the prefill / decode shapes; compile the original model with its quantized layers "
                      "instead: compile_lm(fxcompress.lm.with_quant_layers(model, graph_module), ...)")
    work = copy.deepcopy(model).eval()
    if dtype is not None:
        work = work.to(dtype)
    wrapped = _HFLogits(work) if is_hf_causal_lm(work) else _LogitsOnly(work)
    quant: dict[str, QuantLinear] = {}
    site_of: dict[int, str] = {}
    for name, mod in list(wrapped.named_modules()):
        if isinstance(mod, QuantLinear):
            site = _COUNTER[0]
            _COUNTER[0] += 1
            quant[name], site_of[site] = mod, name
            _set_submodule(wrapped, name, _Stub(site, mod.out_features))
    ids = torch.zeros(batch, seq, dtype=torch.long)
    for s, name in site_of.items():
        _ACTIVE[s] = quant[name]
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapped, (ids,), strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the model named
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LMError(f"torch.export could not trace {type(model).__name__}(input_ids) at shape [{batch}, {seq}]: "
                      f"{type(e).__name__}: {msg}") from e
    finally:
        for s in site_of:
            _ACTIVE.pop(s, None)
    gm = ep.module()
    graph = gm.graph
    graph._codegen = fx.graph.CodeGen()  # flat (input_ids) -> logits instead of pytree in/out specs
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.fxc_lm.quant_linear.default:
            name = site_of[int(node.args[1])]
            gm.add_submodule(name, quant[name])
            with graph.inserting_before(node):
                new = graph.call_module(name, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in (torch.ops.aten._assert_tensor_metadata.default,
                                                             torch.ops.aten._assert_scalar.default) and not node.users:
            graph.erase_node(node)
    outs = [n for n in graph.nodes if n.op == "output"][0]
    res = outs.args[0]
    if isinstance(res, (tuple, list)):
        if len(res) != 1:
            raise LMError(f"the captured graph of {type(model).__name__} has {len(res)} outputs; expected logits only")
        outs.args = (res[0],)
    graph.lint()
    gm = fx.GraphModule(gm, graph, "CapturedLM")  # a plain GraphModule: no pytree input check hooks
    gm.meta["fxc_lm_source"] = type(model).__name__
    return gm
