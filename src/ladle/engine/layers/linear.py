"""The linear layer every architecture uses, dense or int4-packed, chosen by its weight.

A `Linear` is built empty and filled by `load_weight`: a GGML Q4_0 / Q4_1 / Q4_K weight is
repacked for torch's int4 kernel and stays 4-bit in memory; anything else (safetensors, F16,
Q8_0, K-quants without an int4 mapping, 4-bit weights whose out_features torch's packer
rejects) is decoded once to a dense tensor of the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.int4 import Int4Weight, can_pack_int4, pack_int4
from ladle.errors import ModelLoadError


class Linear(nn.Module):
    """`y = x W^T + b` with W dense or int4-packed; the forward is one kernel call either way."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.storage_dtype = storage_dtype  # a dense weight kept in this dtype, not the compute one
        self.weight: torch.Tensor | None = None
        self.int4: Int4Weight | None = None
        self.bias: torch.Tensor | None = None
        self.has_bias = bias

    def load_weight(
        self,
        weight: torch.Tensor | GGMLTensor,
        dtype: torch.dtype,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Take ownership of `weight` ([out_features, in_features]) in its fastest form."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            name = weight.name if isinstance(weight, GGMLTensor) else "weight"
            raise ModelLoadError(
                name,
                f"shape {tuple(weight.shape)} does not match the layer's "
                f"{(self.out_features, self.in_features)}",
            )
        if isinstance(weight, GGMLTensor) and can_pack_int4(weight):
            self.int4 = pack_int4(weight)
            self.weight = None
        else:
            dense = weight.dequantize(dtype) if isinstance(weight, GGMLTensor) else weight
            stored = dense.to(self.storage_dtype or dtype).contiguous()
            self.weight = nn.Parameter(stored, requires_grad=False)
            self.int4 = None
        if bias is not None:
            self.bias = nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4 is not None:
            y = self.int4.matmul(x)
            return y if self.bias is None else y + self.bias
        w = self.weight
        assert w is not None, "Linear used before load_weight"
        if w.dtype == x.dtype:
            return F.linear(x, w, self.bias)
        y = F.linear(x.to(w.dtype), w).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kind = "int4" if self.int4 is not None else f"dense {self.storage_dtype or ''}".strip()
        return f"in={self.in_features}, out={self.out_features}, {kind}, bias={self.has_bias}"
