"""Token states to one vector per input: mean, CLS, last-token or max pooling, then maybe L2.

Which pooling a model wants is part of the model (sentence-transformers' `1_Pooling` config,
GGUF's `pooling_type`): encoders trained for sentence similarity mostly average their tokens;
decoder embedders such as Qwen3-Embedding read the last token, the only one that has seen the
whole input. Batches are right-padded, so the last real token of row i is at `lengths[i] - 1`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

POOLING_MODES = ("mean", "cls", "last", "max")


@dataclass(frozen=True, slots=True)
class Pooling:
    """How a model turns token states into its embedding."""

    mode: str  # one of POOLING_MODES
    normalize: bool  # L2-normalize the pooled vector

    def __post_init__(self) -> None:
        assert self.mode in POOLING_MODES  # readers validate the model's config first

    def __call__(
        self,
        hidden: torch.Tensor,  # [B, T, H]
        mask: torch.Tensor,  # [B, T] bool, True on real tokens (a prefix of each row)
    ) -> torch.Tensor:  # [B, H] float32
        hidden = hidden.float()
        if self.mode == "cls":
            pooled = hidden[:, 0]
        elif self.mode == "last":
            last = mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        elif self.mode == "max":
            pooled = hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        else:
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=-1) if self.normalize else pooled
