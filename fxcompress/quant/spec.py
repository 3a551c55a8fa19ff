"""QuantSpec: what an integer weight format is (bits, sign, granularity)."""
from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_BITS = (2, 3, 4, 8)
GRANULARITIES = ("per_tensor", "per_channel", "per_group")


@dataclass(frozen=True)
class QuantSpec:
    """A linear (uniform) integer format for a weight.

    ``symmetric=True`` stores signed codes in ``[-2^(b-1), 2^(b-1)-1]`` with a zero
    point of 0; ``symmetric=False`` stores unsigned codes in ``[0, 2^b-1]`` with a
    zero point.  Scales are per tensor, per output channel (dim 0), or per group of
    ``group_size`` consecutive input elements within each output channel.
    """

    bits: int = 4
    symmetric: bool = False
    granularity: str = "per_group"
    group_size: int | None = 128

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantSpec.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "per_group":
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0:
                raise ValueError(f"QuantSpec.group_size must be a positive int for per_group, got {gs!r}")
        elif self.group_size is not None:
            raise ValueError(
                f"QuantSpec.group_size must be None for granularity={self.granularity!r}, got {self.group_size!r}"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def check_shape(self, shape) -> None:
        """Raise ValueError if a weight of ``shape`` (out, in, ...) cannot use this spec."""
        if self.granularity == "per_group":
            if len(shape) != 2:
                raise ValueError(f"per_group quantization needs a 2-D weight, got shape {tuple(shape)}")
            if shape[1] % self.group_size != 0:
                raise ValueError(
                    f"group_size={self.group_size} does not divide in_features={shape[1]} (weight shape {tuple(shape)})"
                )

    def to_dict(self) -> dict:
        return {"bits": self.bits, "symmetric": self.symmetric, "granularity": self.granularity,
                "group_size": self.group_size}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(bits=int(d["bits"]), symmetric=bool(d["symmetric"]), granularity=str(d["granularity"]),
                   group_size=None if d.get("group_size") is None else int(d["group_size"]))
