"""RMSNorm, in the two flavours checkpoints use: `w * x̂` (Llama) and `(1 + w) * x̂` (Gemma);
and LayerNorm with a bias, as BERT-family encoders use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ladle.engine.kernels import native


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, normalized in float32.

    With `unit_offset=False` (Llama, Qwen, Phi-3) the normalized input is cast back to the
    compute dtype, then scaled by `w`; with `unit_offset=True` (Gemma) it is scaled by `1 + w`
    in float32 and then cast, matching each family's transformers rounding in bfloat16.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight: torch.Tensor | None = None
        self.use_kernels = False  # the native kernel for float32 rows, eagerly

    def load_weight(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        if tuple(weight.shape) != (self.dim,):
            raise ValueError(f"shape {tuple(weight.shape)} != {(self.dim,)}")
        # Gemma's scale 1 + w is formed once, in float32, as transformers forms it per call.
        w = weight.float() + 1.0 if self.unit_offset else weight.to(dtype)
        self.weight = nn.Parameter(w.contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and x.dtype == torch.float32 and not torch.compiler.is_compiling():
            assert self.weight is not None, "RMSNorm used before load_weight"
            return native.rms_norm(x, self.weight.float(), self.eps)  # float32 already: no copy
        if x.dtype == torch.float32 or self.unit_offset:
            y = F.rms_norm(x.float(), (self.dim,), self.weight, self.eps)
            return y.to(x.dtype)
        return F.rms_norm(x.float(), (self.dim,), None, self.eps).to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, unit_offset={self.unit_offset}"


class LayerNorm(nn.Module):
    """Mean-and-variance norm over the last dimension with a weight and a bias (BERT)."""

    has_bias = True

    def __init__(self, dim: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def load_weight(
        self, weight: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None
    ) -> None:
        if tuple(weight.shape) != (self.dim,) or bias is None or tuple(bias.shape) != (self.dim,):
            raise ValueError(f"weight and bias must both have shape {(self.dim,)}")
        self.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
