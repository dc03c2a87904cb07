"""Llama (and Mistral): pre-norm decoder, GQA attention with RoPE, SwiGLU MLP.

The Qwen 2/3 and Phi-3 files reuse these blocks: they differ only in which projections carry
a bias, whether q/k are normalized per head, and how their checkpoints pack the projections.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ladle.engine.layers.activation import gated_activation
from ladle.engine.layers.attention import Attention
from ladle.engine.layers.embedding import Embedding, LMHead
from ladle.engine.layers.linear import Linear
from ladle.engine.layers.norm import RMSNorm
from ladle.engine.layers.rotary import RotaryEmbedding, apply_rotary
from ladle.engine.loading.config import ModelConfig
from ladle.engine.models.base import CausalLM, Rope


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, biases: tuple[bool, bool], qk_norm: bool
    ) -> None:
        super().__init__()
        assert config.num_key_value_heads is not None and config.head_dim is not None
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        qkv_bias, o_bias = biases
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, o_bias)
        # Qwen 3 normalizes each head of q and k before the rotation.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        is_sliding = config.layer_types is not None and (
            config.layer_types[layer_idx] == "sliding_attention"
        )
        self.attn = Attention(
            layer_idx,
            self.head_dim**-0.5,
            sliding_window=config.sliding_window if is_sliding else None,
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        v = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is None or self.k_norm is None:
            # q and k heads side by side: one rotation for both
            qk = qkv[:, :qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, -1)
            qk = apply_rotary(qk, cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q = self.q_norm(qkv[:, : self.q_size].view(num_tokens, self.num_heads, -1))
            k = self.k_norm(qkv[:, self.q_size : qk_size].view(num_tokens, self.num_kv_heads, -1))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.act_fn = gated_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, biases: tuple[bool, bool], qk_norm: bool
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, biases, qk_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, biases: tuple[bool, bool], qk_norm: bool) -> None:
        super().__init__()
        assert config.head_dim is not None
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, biases, qk_norm) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling,
            config.partial_rotary_factor,
            config.max_position_embeddings,
        )

    def rope(self, positions: torch.Tensor, seq_len: int) -> Rope:
        return self.rotary_emb(positions, seq_len, self.embed_tokens.dtype)

    def forward(self, input_ids: torch.Tensor, rope: Rope) -> torch.Tensor:
        # [T, hidden_size], before the final norm
        x = self.embed_tokens(input_ids)
        cos, sin = rope
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


class LlamaForCausalLM(CausalLM):
    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qk_norm = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.attention_biases(config), self.qk_norm)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)

    @staticmethod
    def attention_biases(config: ModelConfig) -> tuple[bool, bool]:
        """Whether (qkv_proj, o_proj) carry a bias."""
        return config.attention_bias, config.attention_bias
