"""Llama (and Mistral): pre-norm decoder, GQA attention with RoPE, SwiGLU MLP.

The Qwen 2/3 and Phi-3 files reuse these blocks: they differ only in which projections carry
a bias, whether q/k are normalized per head, and how their checkpoints pack the projections.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ladle.engine.kernels import native
from ladle.engine.layers.activation import gated_activation
from ladle.engine.layers.attention import Attention
from ladle.engine.layers.embedding import Embedding, LMHead
from ladle.engine.layers.linear import Linear
from ladle.engine.layers.norm import RMSNorm
from ladle.engine.layers.rotary import RotaryEmbedding, apply_rotary
from ladle.engine.loading.config import ModelConfig
from ladle.engine.models.base import CausalLM, Rope
from ladle.engine.models.kernel_stack import KernelStack, norm_weight


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
        self.use_kernels = False  # the rotation through the native kernel

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        v = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is None or self.k_norm is None:
            # q and k heads side by side: one rotation for both
            qk = qkv[:, :qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, -1)
            qk = apply_rotary(qk, cos, sin, self.use_kernels)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q = self.q_norm(qkv[:, : self.q_size].view(num_tokens, self.num_heads, -1))
            k = self.k_norm(qkv[:, self.q_size : qk_size].view(num_tokens, self.num_kv_heads, -1))
            kernel = self.use_kernels
            q, k = apply_rotary(q, cos, sin, kernel), apply_rotary(k, cos, sin, kernel)
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
        self.use_kernels = False  # may run in the native decoder (`kernel_stack.py`)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def kernel_layer(self) -> native.LayerWeights | None:
        """This layer for the native decoder (`KernelLayer`)."""
        return kernel_layer(self, self.post_attention_layernorm, None, None)


def kernel_layer(
    layer: nn.Module,
    post_attention_norm: RMSNorm,
    pre_feedforward_norm: RMSNorm | None,
    post_feedforward_norm: RMSNorm | None,
    local_rope: bool = False,
) -> native.LayerWeights | None:
    """A Llama-family layer (`self_attn`, `mlp`, `input_layernorm`) for the native decoder, or
    None when a weight has no native form or a norm or bias is not float32."""
    attn: LlamaAttention = layer.self_attn
    mlp: LlamaMLP = layer.mlp
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    weights = [linear.kernel_weight() for linear in linears]
    norms = [
        layer.input_layernorm,
        post_attention_norm,
        pre_feedforward_norm,
        post_feedforward_norm,
        attn.q_norm,
        attn.k_norm,
    ]
    norm_weights = [norm_weight(n) for n in norms]
    biases = [attn.qkv_proj.bias, attn.o_proj.bias]
    if any(w is None for w in weights) or any(
        n is not None and w is None for n, w in zip(norms, norm_weights, strict=True)
    ):
        return None
    if any(b is not None and b.dtype != torch.float32 for b in biases):
        return None
    qkv, o, gate_up, down = weights
    assert qkv is not None and o is not None and gate_up is not None and down is not None
    input_norm, post_norm, pre_ff, post_ff, q_norm, k_norm = norm_weights
    assert input_norm is not None and post_norm is not None
    return native.LayerWeights(
        input_norm,
        qkv,
        biases[0],
        q_norm,
        k_norm,
        o,
        biases[1],
        post_norm,
        pre_ff,
        post_ff,
        gate_up,
        down,
        attn.attn.scale,
        attn.attn.logit_softcap,
        attn.attn.sliding_window,
        local_rope,
        mlp.act_fn.kind,
    )


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, biases: tuple[bool, bool], qk_norm: bool) -> None:
        super().__init__()
        assert config.head_dim is not None and config.num_key_value_heads is not None
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
        self.eps = config.rms_norm_eps
        self.stack = KernelStack(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )

    def rope(self, positions: torch.Tensor, seq_len: int) -> Rope:
        return self.rotary_emb(positions, seq_len, self.embed_tokens.dtype)

    def forward(self, input_ids: torch.Tensor, rope: Rope) -> torch.Tensor:
        # [T, hidden_size], before the final norm
        x = self.embed_tokens(input_ids)
        out = self.stack.run(self.layers, self.eps, x, rope)
        if out is not None:
            return out
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
