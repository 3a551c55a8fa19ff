"""Modules that the passes insert into graphs."""
from .l4q_linear import L4QLinear
from .quant_linear import QuantConv2d, QuantLinear

__all__ = ["L4QLinear", "QuantLinear", "QuantConv2d"]
