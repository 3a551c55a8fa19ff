"""L4QLinear: a frozen linear layer with a LoRA adapter, fake-quantized as a whole by LSQ+."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..quant import QuantSpec, lsq_grad_scale, minmax_params
from ..quant.l4q_fn import acc_dtype, l4q_linear, l4q_linear_naive, merged_weight, quantized_weight


class L4QLinear(nn.Module):
    """``y = x · Q(W0 + (alpha/r)·B·A)ᵀ + bias`` with learned step size and offset (LSQ+).

    W0 and bias are frozen; ``lora_A`` (r x in), ``lora_B`` (out x r), ``scale`` and
    ``offset`` (out x groups) train.  At initialisation B = 0 and scale / offset come
    from each group's range exactly as round-to-nearest does (``offset = -scale·zp``), so
    the layer starts out equal to RTN quantization of W0.  ``rank=0`` gives the
    LSQ-only baseline (no adapter: only scale and offset learn).

    Dtypes: W0 and bias keep the model's dtype (e.g. bf16, the bulk of the memory); every
    trainable parameter (A, B, scale, offset) is a float32 master (float64 for float64 weights),
    so optimizer updates are not rounded away and all trainable parameters of the layer share
    one dtype, which FSDP2 requires of one sharding group (see ``fxcompress.distributed``).
    The quantizer arithmetic runs in that dtype anyway; only the GEMMs with x use x's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, rank: int,
                 alpha: float, grad_scale: str = "lsq", fused: bool = True):
        super().__init__()
        out_f, in_f = weight.shape
        spec.check_shape(weight.shape)
        if spec.granularity == "per_tensor":
            raise ValueError("L4QLinear supports per_channel or per_group quantization, not per_tensor")
        self.in_features, self.out_features = in_f, out_f
        self.spec, self.rank, self.alpha, self.fused = spec, int(rank), float(alpha), fused
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        train_dtype = acc_dtype(weight)
        if self.rank > 0:
            a = torch.empty(self.rank, in_f, dtype=train_dtype, device=weight.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A = nn.Parameter(a)
            self.lora_B = nn.Parameter(torch.zeros(out_f, self.rank, dtype=train_dtype, device=weight.device))
        else:
            self.lora_A = self.lora_B = None
        scale, zp = minmax_params(weight, spec)
        self.scale = nn.Parameter(scale.to(train_dtype))
        self.offset = None if spec.symmetric else nn.Parameter((-scale * zp).to(train_dtype))
        group_len = in_f if spec.granularity == "per_channel" else spec.group_size
        self.grad_scale = lsq_grad_scale(group_len, spec.qmax) if grad_scale == "lsq" else 1.0

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank if self.rank > 0 else 0.0

    @property
    def group_size(self) -> int | None:
        return self.spec.group_size if self.spec.granularity == "per_group" else None

    def _args(self):
        return (self.weight, self.lora_A, self.lora_B, self.scale, self.offset, self.bias, self.lora_scale,
                self.spec.qmin, self.spec.qmax, self.group_size, self.grad_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = l4q_linear if self.fused else l4q_linear_naive
        return fn(x, *self._args())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return merged_weight(self.weight, self.lora_A, self.lora_B, self.lora_scale)

    @torch.no_grad()
    def fake_quant_weight(self) -> torch.Tensor:
        return quantized_weight(self.merged_weight(), self.scale, self.offset, self.spec.qmin, self.spec.qmax,
                                self.group_size)

    def trainable_parameters(self):
        return [p for p in (self.lora_A, self.lora_B, self.scale, self.offset) if p is not None]

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={self.group_size}, symmetric={s.symmetric}, rank={self.rank}, alpha={self.alpha}")
