"""QuantWeight: a packed integer weight with its scales, zero points and format."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import affine
from .packing import pack, unpack
from .spec import QuantSpec


@dataclass
class QuantWeight:
    """Packed integer codes + per-tensor/channel/group scales and zero points.

    The weight it stands for is ``(codes - zero_point) * scale`` (grouped as in
    :mod:`fxcompress.quant.affine`).  ``zero_point`` is stored as float: it is an integer
    for RTN / UDFC weights, and may be fractional for L4Q weights, whose learned LSQ+
    offset ``b`` gives ``zero_point = -b / scale``.
    """

    packed: torch.Tensor  # 1-D uint8
    scale: torch.Tensor  # (rows, groups) float32
    zero_point: torch.Tensor  # (rows, groups) float32
    spec: QuantSpec
    shape: tuple

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   spec: QuantSpec) -> "QuantWeight":
        pshape = affine.params_shape(codes.shape, spec)
        if tuple(scale.shape) != pshape or tuple(zero_point.shape) != pshape:
            raise ValueError(f"scale/zero_point must have shape {pshape}, got {tuple(scale.shape)} / "
                             f"{tuple(zero_point.shape)}")
        return cls(pack(codes, spec.bits, spec.qmin), scale.detach().float().contiguous(),
                   zero_point.detach().float().contiguous(), spec, tuple(codes.shape))

    @classmethod
    def from_float(cls, w: torch.Tensor, spec: QuantSpec) -> "QuantWeight":
        """Round-to-nearest quantization of ``w`` with min/max (or abs-max) scales."""
        scale, zp = affine.minmax_params(w, spec)
        return cls.from_codes(affine.quantize(w.detach().float(), scale, zp, spec), scale, zp, spec)

    def codes(self) -> torch.Tensor:
        n = 1
        for d in self.shape:
            n *= d
        return unpack(self.packed, self.spec.bits, n, self.spec.qmin).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return affine.dequantize(self.codes(), self.scale, self.zero_point, self.spec, dtype=dtype)

    @property
    def zero_point_is_integer(self) -> bool:
        return bool(torch.equal(self.zero_point, torch.round(self.zero_point)))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 4 * (self.scale.numel() + self.zero_point.numel())

    def __repr__(self) -> str:
        return (f"QuantWeight(shape={self.shape}, bits={self.spec.bits}, granularity={self.spec.granularity}, "
                f"group_size={self.spec.group_size}, symmetric={self.spec.symmetric}, bytes={self.nbytes})")
