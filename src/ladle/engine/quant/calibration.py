"""Activation statistics for an importance matrix, collected by `Linear` while calibrating.

An importance matrix holds, per linear layer and input channel, the mean squared activation
`E[x_i^2]`: the weight with which a quantization error on input channel i reaches the output
(`sum_i w_i (x_i - q_i)^2`, as llama.cpp's imatrix). `ActivationStats` keeps the running sum
and the number of rows seen, which is what gets saved (`imatrix.py`).
"""

from __future__ import annotations

import torch


class ActivationStats:
    """Running `sum x_i^2` over every input row a layer sees, and the row count."""

    def __init__(self, in_features: int) -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64)
        self.rows = 0

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum_sq += (flat * flat).sum(dim=0).double()
        self.rows += flat.shape[0]

    def mean(self) -> torch.Tensor:
        """`E[x_i^2]` as float32 [in_features]; zeros before any row."""
        return (self.sum_sq / max(self.rows, 1)).float()
