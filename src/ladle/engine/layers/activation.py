"""Gated activations over a fused `[gate | up]` projection: `act(gate) * up`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ladle.engine.kernels import native


class SiluAndMul(nn.Module):
    """SwiGLU (Llama, Qwen, Phi-3): `silu(x[:, :n]) * x[:, n:]` for `x = [gate | up]`."""

    use_kernels = False  # the native kernel for float32 rows, eagerly
    kind = "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and x.dtype == torch.float32 and not torch.compiler.is_compiling():
            return native.gated_activation(x, self.kind)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """GeGLU with tanh-approximated GELU (Gemma's `gelu_pytorch_tanh`)."""

    use_kernels = False  # the native kernel for float32 rows, eagerly
    kind = "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and x.dtype == torch.float32 and not torch.compiler.is_compiling():
            return native.gated_activation(x, self.kind)
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


def gated_activation(hidden_act: str) -> nn.Module:
    """The gated activation for a config's `hidden_act` (validated by `ModelConfig`)."""
    return GeluAndMul() if hidden_act == "gelu_pytorch_tanh" else SiluAndMul()
