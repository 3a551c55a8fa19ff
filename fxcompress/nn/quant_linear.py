"""Integer-weight layers: packed codes + scales as buffers; forward calls the ``fxcompress::quant_linear`` /
``fxcompress::quant_conv2d`` ops (:mod:`fxcompress.nn.ops`).

Backends read ``quant_weight`` and lower it to integer kernels; in PyTorch the ops' reference kernels
unpack and dequantize, so outputs equal the fake-quantized model's to float tolerance, and
``torch.export`` keeps each layer as one op node over its packed buffers.
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant import QuantSpec, QuantWeight
from . import ops


class _QuantWeightMixin:
    def _set_quant_weight(self, qw: QuantWeight) -> None:
        self.spec = qw.spec
        self.weight_shape = tuple(qw.shape)
        self.register_buffer("qweight", qw.packed)
        self.register_buffer("scale", qw.scale)
        self.register_buffer("zero_point", qw.zero_point)

    @property
    def quant_weight(self) -> QuantWeight:
        return QuantWeight(self.qweight, self.scale, self.zero_point, self.spec, self.weight_shape)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return self.quant_weight.dequantize(dtype)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


class QuantLinear(_QuantWeightMixin, nn.Module):
    """``y = x @ dequant(W)^T + bias`` with W stored as packed ``spec.bits``-bit codes."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if len(qw.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {qw.shape}")
        self.out_features, self.in_features = qw.shape
        self._set_quant_weight(qw)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantLinear":
        return cls(QuantWeight.from_float(linear.weight, spec), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return ops.quant_linear(x, self.qweight, self.scale, self.zero_point, self.bias, s.bits, s.symmetric,
                                s.granularity, s.group_size or 0, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"granularity={s.granularity}, group_size={s.group_size}, symmetric={s.symmetric}, "
                f"bias={self.bias is not None}")


class QuantConv2d(_QuantWeightMixin, nn.Module):
    """A Conv2d whose weight is stored as packed integer codes (per-tensor or per-channel scales)."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None, stride=1, padding=0, dilation=1, groups=1):
        super().__init__()
        if len(qw.shape) != 4:
            raise ValueError(f"QuantConv2d needs a 4-D weight, got shape {qw.shape}")
        self.out_channels = qw.shape[0]
        self.in_channels = qw.shape[1] * groups
        self.kernel_size = tuple(qw.shape[2:])
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._set_quant_weight(qw)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, spec: QuantSpec) -> "QuantConv2d":
        if isinstance(conv.padding, str):
            raise ValueError(f"QuantConv2d does not support string padding {conv.padding!r}")
        return cls(QuantWeight.from_float(conv.weight, spec), conv.bias, conv.stride, conv.padding,
                   conv.dilation, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return ops.quant_conv2d(x, self.qweight, self.scale, self.zero_point, self.bias, s.bits, s.symmetric,
                                s.granularity, list(self.weight_shape), _pair(self.stride), _pair(self.padding),
                                _pair(self.dilation), self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bits={self.spec.bits}, "
                f"granularity={self.spec.granularity}")
