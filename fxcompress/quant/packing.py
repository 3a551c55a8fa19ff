"""Dense bit packing of integer codes into uint8 storage (2/3/4/8 bits; 3-bit is not padded).

Codes are written as a little-endian bit stream: code ``i`` occupies bits
``[i*bits, (i+1)*bits)`` of the buffer, bit 0 of a byte being its least significant bit.
For 2, 4 and 8 bits this is the usual layout (low nibble first for int4).  Signed codes are
stored as offset-binary (code - qmin) so every stored value is unsigned.
"""
from __future__ import annotations

import torch

from .spec import SUPPORTED_BITS


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int, qmin: int = 0) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, values in ``[qmin, qmin + 2^bits)``) into a 1-D uint8 tensor."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    u = codes.reshape(-1).to(torch.int32) - qmin
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing (qmin={qmin}): "
                         f"[{int(u.min()) + qmin}, {int(u.max()) + qmin}]")
    if bits == 8:
        return u.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32, device=u.device)
    stream = ((u.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = 1 << torch.arange(8, dtype=torch.int32, device=u.device)
    return (stream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int, qmin: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack`: a 1-D int32 tensor of ``numel`` codes."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed storage must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    need = packed_nbytes(numel, bits)
    if packed.numel() != need:
        raise ValueError(f"packed storage has {packed.numel()} bytes, {numel} {bits}-bit codes need {need}")
    if bits == 8:
        return packed.to(torch.int32) + qmin
    b = packed.to(torch.int32)
    stream = ((b.unsqueeze(1) >> torch.arange(8, dtype=torch.int32, device=b.device)) & 1).reshape(-1)[: numel * bits]
    vals = (stream.reshape(numel, bits) << torch.arange(bits, dtype=torch.int32, device=b.device)).sum(dim=1)
    return vals.to(torch.int32) + qmin
