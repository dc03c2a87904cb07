"""Token embeddings, and the output head that may share their table.

A GGUF embedding is usually Q8_0 or Q6_K: it is decoded once to the compute dtype, since a
lookup touches a few rows per step but a tied head reads all of them every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ladle.engine.layers.linear import Linear
from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.int4 import can_pack_int4


class Embedding(nn.Module):
    """Lookup table `[num_embeddings, embedding_dim]` of the compute dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight: torch.Tensor | None = None

    def load_weight(self, weight: torch.Tensor | GGMLTensor, dtype: torch.dtype) -> None:
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"shape {tuple(weight.shape)} != {(self.num_embeddings, self.embedding_dim)}"
            )
        dense = weight.dequantize(dtype) if isinstance(weight, GGMLTensor) else weight.to(dtype)
        self.weight = nn.Parameter(dense.contiguous(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert self.weight is not None, "Embedding used before load_weight"
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def tie_lm_head(
    lm_head: Linear,
    embedding: Embedding,
    source: torch.Tensor | GGMLTensor,
    dtype: torch.dtype,
) -> None:
    """Give `lm_head` the embedding's table (`source` is the weight the embedding loaded).

    A 4-bit table is packed again for the int4 kernel, which beats reading dense rows; any
    other table is shared with the embedding, so it sits in memory once.
    """
    if isinstance(source, GGMLTensor) and can_pack_int4(source):
        lm_head.load_weight(source, dtype)
    else:
        assert embedding.weight is not None
        lm_head.load_weight(embedding.weight, dtype)
