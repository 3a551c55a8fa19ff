"""Integer-weight layers as ``torch.library`` ops (namespace ``fxcompress``), so that ``torch.export`` keeps
them as single nodes whose packed codes, scales and zero points are buffers of the program.

* ``fxcompress::quant_linear(x, packed, scale, zero_point, bias, bits, symmetric, granularity, group_size,
  out_features, in_features) -> Tensor``: ``x @ dequant(W)^T + bias``;
* ``fxcompress::quant_conv2d(x, packed, scale, zero_point, bias, bits, symmetric, granularity, weight_shape,
  stride, padding, dilation, groups) -> Tensor``.

The weight format is that of :class:`fxcompress.quant.QuantWeight` (``group_size`` 0 = not per_group).
Each op has a reference kernel for every device (unpack, dequantize, ``F.linear`` / ``F.conv2d``), a fake
kernel for export and compile, and a gradient for ``x`` (the weights are constants). Registered once, when
this module is imported (``fxcompress.nn`` imports it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..quant import QuantSpec, dequantize, unpack


def spec_of(bits: int, symmetric: bool, granularity: str, group_size: int) -> QuantSpec:
    return QuantSpec(int(bits), bool(symmetric), str(granularity), int(group_size) if group_size else None)


def dequantize_packed(packed, scale, zero_point, spec: QuantSpec, shape, dtype) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= int(d)
    codes = unpack(packed, spec.bits, n, spec.qmin).reshape(tuple(int(d) for d in shape))
    return dequantize(codes, scale, zero_point, spec, dtype=dtype)


@torch.library.custom_op("fxcompress::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bias: Optional[torch.Tensor], bits: int, symmetric: bool, granularity: str, group_size: int,
                 out_features: int, in_features: int) -> torch.Tensor:
    w = dequantize_packed(packed, scale, zero_point, spec_of(bits, symmetric, granularity, group_size),
                          (out_features, in_features), x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@quant_linear.register_fake
def _(x, packed, scale, zero_point, bias, bits, symmetric, granularity, group_size, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _linear_setup(ctx, inputs, output):
    x, packed, scale, zero_point, _b, bits, symmetric, granularity, group_size, out_f, in_f = inputs
    ctx.save_for_backward(packed, scale, zero_point)
    ctx.meta = (bits, symmetric, granularity, group_size, out_f, in_f)


def _linear_backward(ctx, grad):
    packed, scale, zero_point = ctx.saved_tensors
    bits, symmetric, granularity, group_size, out_f, in_f = ctx.meta
    w = dequantize_packed(packed, scale, zero_point, spec_of(bits, symmetric, granularity, group_size),
                          (out_f, in_f), grad.dtype)
    return (grad @ w,) + (None,) * 10


quant_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("fxcompress::quant_conv2d", mutates_args=())
def quant_conv2d(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bias: Optional[torch.Tensor], bits: int, symmetric: bool, granularity: str,
                 weight_shape: list[int], stride: list[int], padding: list[int], dilation: list[int],
                 groups: int) -> torch.Tensor:
    w = dequantize_packed(packed, scale, zero_point, spec_of(bits, symmetric, granularity, 0), weight_shape,
                          x.dtype)
    return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)


@quant_conv2d.register_fake
def _(x, packed, scale, zero_point, bias, bits, symmetric, granularity, weight_shape, stride, padding, dilation,
      groups):
    n, _, h, w = x.shape
    kh, kw = weight_shape[2], weight_shape[3]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, weight_shape[0], ho, wo))


def _conv_setup(ctx, inputs, output):
    x, packed, scale, zero_point, _b, bits, symmetric, granularity, wshape, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(packed, scale, zero_point)
    ctx.meta = (tuple(x.shape), bits, symmetric, granularity, wshape, stride, padding, dilation, groups)


def _conv_backward(ctx, grad):
    packed, scale, zero_point = ctx.saved_tensors
    xshape, bits, symmetric, granularity, wshape, stride, padding, dilation, groups = ctx.meta
    w = dequantize_packed(packed, scale, zero_point, spec_of(bits, symmetric, granularity, 0), wshape, grad.dtype)
    gx = torch.nn.grad.conv2d_input(xshape, w, grad, stride, padding, dilation, groups)
    return (gx,) + (None,) * 12


quant_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)

QUANT_LINEAR = torch.ops.fxcompress.quant_linear.default
QUANT_CONV2D = torch.ops.fxcompress.quant_conv2d.default


# ----------------------------------------------------------------------------------------------------------
# L4Q (prepared, trainable) layers in an ExportedProgram: one op node over W0, LoRA and quantizer parameters


@torch.library.custom_op("fxcompress::l4q_linear", mutates_args=())
def l4q_linear_op(x: torch.Tensor, weight: torch.Tensor, lora_a: Optional[torch.Tensor],
                  lora_b: Optional[torch.Tensor], scale: torch.Tensor, offset: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], lora_scale: float, qmin: int, qmax: int, group_size: int,
                  grad_scale: float) -> torch.Tensor:
    from ..quant.l4q_fn import l4q_linear

    with torch.no_grad():
        return l4q_linear(x, weight, lora_a, lora_b, scale, offset, bias, lora_scale, qmin, qmax,
                          group_size or None, grad_scale)


@l4q_linear_op.register_fake
def _(x, weight, lora_a, lora_b, scale, offset, bias, lora_scale, qmin, qmax, group_size, grad_scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _l4q_setup(ctx, inputs, output):
    ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in inputs[:7]])
    ctx.present = tuple(t is not None for t in inputs[:7])
    ctx.meta = inputs[7:]


def _l4q_backward(ctx, grad):
    """Gradients through the l4q helper's own autograd.Function (its memory-lean backward), recomputed here."""
    from ..quant.l4q_fn import l4q_linear

    saved = [t if p else None for t, p in zip(ctx.saved_tensors, ctx.present)]
    want = (0, 2, 3, 4, 5)  # x, lora_a, lora_b, scale, offset (W0 and bias are frozen)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if i in want and t is not None else t for i, t in enumerate(saved)]
        lora_scale, qmin, qmax, group_size, grad_scale = ctx.meta
        y = l4q_linear(*leaves, lora_scale, qmin, qmax, group_size or None, grad_scale)
        wrt = [leaves[i] for i in want if leaves[i] is not None]
        grads = iter(torch.autograd.grad(y, wrt, grad, allow_unused=True))
    out = [next(grads) if i in want and leaves[i] is not None else None for i in range(7)]
    return tuple(out) + (None,) * 5


l4q_linear_op.register_autograd(_l4q_backward, setup_context=_l4q_setup)
L4Q_LINEAR = torch.ops.fxcompress.l4q_linear.default
