"""Affine (uniform) quantize / dequantize with per-tensor, per-channel or per-group scales.

Every granularity is handled through one grouped view of the weight, ``(rows, groups,
group_len)``, so that scales and zero points are always stored as 2-D ``(rows, groups)``
tensors: per_tensor -> (1, 1), per_channel -> (out, 1), per_group -> (out, in/group_size).
"""
from __future__ import annotations

import torch

from .spec import QuantSpec

_EPS = 1e-8


def to_groups(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``w`` as ``(rows, groups, group_len)`` for ``spec``'s granularity."""
    spec.check_shape(w.shape)
    if spec.granularity == "per_tensor":
        return w.reshape(1, 1, -1)
    if spec.granularity == "per_channel":
        return w.reshape(w.shape[0], 1, -1)
    return w.reshape(w.shape[0], w.shape[1] // spec.group_size, spec.group_size)


def params_shape(shape, spec: QuantSpec) -> tuple[int, int]:
    """Shape of the scale / zero-point tensors for a weight of ``shape``."""
    spec.check_shape(shape)
    if spec.granularity == "per_tensor":
        return (1, 1)
    if spec.granularity == "per_channel":
        return (shape[0], 1)
    return (shape[0], shape[1] // spec.group_size)


def minmax_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale and integer zero point from each group's range.

    Symmetric: ``scale = max|w| / qmax``, zero point 0.  Asymmetric: ``scale = (max-min) /
    (qmax-qmin)`` and ``zero_point = round(qmin - min/scale)`` clamped into the code range.
    """
    g = to_groups(w.detach(), spec).float()
    if spec.symmetric:
        scale = g.abs().amax(dim=-1) / spec.qmax
        zp = torch.zeros_like(scale)
    else:
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        scale = scale.clamp_min(_EPS)
        zp = torch.round(spec.qmin - lo / scale).clamp(spec.qmin, spec.qmax)
    return scale.clamp_min(_EPS), zp


def quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (int32, same shape as ``w``): ``clamp(round(w/scale) + zp, qmin, qmax)``."""
    g = to_groups(w, spec)
    q = torch.round(g / scale.unsqueeze(-1)) + zero_point.unsqueeze(-1)
    return q.clamp(spec.qmin, spec.qmax).to(torch.int32).reshape(w.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(codes - zero_point) * scale`` in the original weight shape."""
    g = to_groups(codes, spec).to(dtype)
    w = (g - zero_point.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)
    return w.reshape(codes.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize (RTN), in ``w``'s dtype."""
    scale, zp = minmax_params(w, spec)
    return dequantize(quantize(w.float(), scale, zp, spec), scale, zp, spec, dtype=w.dtype)
