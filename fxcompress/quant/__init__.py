"""The math of quantization: formats, quantizers, LSQ autograd, bit packing. No graph code."""
from .affine import dequantize, fake_quantize, minmax_params, params_shape, quantize, to_groups
from .lsq import LSQFakeQuant, lsq_fake_quant, lsq_grad_scale
from .packing import pack, packed_nbytes, unpack
from .qtensor import QuantWeight
from .spec import GRANULARITIES, SUPPORTED_BITS, QuantSpec

__all__ = [
    "QuantSpec", "SUPPORTED_BITS", "GRANULARITIES", "QuantWeight", "quantize", "dequantize", "fake_quantize",
    "minmax_params", "params_shape", "to_groups", "pack", "unpack", "packed_nbytes", "LSQFakeQuant",
    "lsq_fake_quant", "lsq_grad_scale",
]
