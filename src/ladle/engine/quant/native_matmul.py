"""Calling a native quantized matmul (`ladle_kernels.int4_linear` / `int8_linear`) on any x."""

from __future__ import annotations

from collections.abc import Callable

import torch

QuantOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def native_matmul(
    op: QuantOp, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """`x @ w.T` through `op`, which takes contiguous float32 `[N, K]` rows.

    A decode step calls this about 120 times, so rows that are already in that form go
    straight to the kernel: the reshapes and casts cost a few microseconds each even as no-ops.
    """
    if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
        return op(x, q, scales)
    shape = x.shape
    y = op(x.reshape(-1, shape[-1]).float().contiguous(), q, scales)
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])
