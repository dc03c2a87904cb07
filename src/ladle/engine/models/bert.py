"""BERT (and RoBERTa / XLM-R): a bidirectional post-norm encoder, run on padded batches.

An encoder sees its whole input at once, so there is no KV cache and no step loop: one
forward over `[batch, tokens]` with a mask that hides padding keys. q/k/v are fused into one
projection (`qkv_proj`), one matmul instead of three. Submodules keep the checkpoint's names
(`encoder.layer.0.attention.self.query`, ...); RoBERTa differs only in its position ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ladle.engine.layers.embedding import Embedding
from ladle.engine.layers.linear import Linear
from ladle.engine.layers.norm import LayerNorm
from ladle.engine.loading.encoder_config import EncoderConfig
from ladle.engine.models.base import CheckpointModule, Weight

# Parts of checkpoints saved from a task model or an older transformers, which embedding
# does not use: the pooler head, masked-LM heads, the position-id buffer.
_UNUSED = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids")
_PREFIXES = ("bert.", "roberta.", "model.")


class BertEmbeddings(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        token_type = self.token_type_embeddings(torch.zeros(1, dtype=torch.long))  # one segment
        return self.LayerNorm(x + token_type)


class BertSelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_proj = Linear(config.hidden_size, 3 * config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, num_tokens, hidden = x.shape
        qkv = self.qkv_proj(x).view(batch, num_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, T, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, num_tokens, hidden)


class BertSelfOutput(nn.Module):
    """Projection, residual, then LayerNorm (BERT normalizes after each block)."""

    def __init__(self, in_features: int, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = Linear(in_features, config.hidden_size, bias=True)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config.hidden_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.approximate = "none" if config.hidden_act == "gelu" else "tanh"  # gelu is erf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x), approximate=self.approximate)


class BertLayer(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(CheckpointModule):
    """The encoder's last hidden states for a right-padded batch of token ids."""

    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {
        "query": ("qkv_proj", 0),
        "key": ("qkv_proj", 1),
        "value": ("qkv_proj", 2),
    }

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] int64, right-padded
        attention_mask: torch.Tensor,  # [B, T] bool, False on padding
    ) -> torch.Tensor:  # [B, T, hidden_size]
        offset = self.config.position_offset
        positions = torch.arange(offset, offset + input_ids.shape[1]).unsqueeze(0)
        x = self.embeddings(input_ids, positions)
        # [B, 1, 1, T]: padding keys are never seen; no mask at all is SDPA's fastest path
        mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def load_weights(self, weights: Iterable[tuple[str, Weight]], dtype: torch.dtype) -> None:
        super().load_weights(_encoder_names(weights), dtype)


def _encoder_names(weights: Iterable[tuple[str, Weight]]) -> Iterator[tuple[str, Weight]]:
    """Checkpoint names without a task model's prefix, unused tensors dropped."""
    for name, weight in weights:
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        if not name.startswith(_UNUSED):
            yield name, weight
