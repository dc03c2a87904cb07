"""Gemma, Gemma 2 and Gemma 3 (text): the Llama decoder with Gemma's numerics.

All three scale the embeddings by sqrt(hidden_size), normalize with `(1 + w)` RMSNorms, use a
tanh-GELU gated MLP and tie the output head to the embeddings. Gemma 2 adds a norm after
attention and around the MLP ("sandwich" norms), scales queries by `query_pre_attn_scalar`,
soft-caps attention and final logits, and alternates sliding-window and global layers.
Gemma 3 drops the attention soft-cap for per-head q/k norms, and rotates its sliding layers
with their own RoPE base (`rope_local_base_freq`), unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ladle.engine.kernels import native
from ladle.engine.layers.attention import Attention
from ladle.engine.layers.embedding import Embedding, LMHead
from ladle.engine.layers.norm import RMSNorm
from ladle.engine.layers.rotary import RotaryEmbedding
from ladle.engine.loading.config import ModelConfig
from ladle.engine.models.base import CausalLM, Rope
from ladle.engine.models.kernel_stack import KernelStack
from ladle.engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, kernel_layer

_LOCAL_ROPE_BASE = 10_000.0  # transformers' Gemma 3 default when a config omits it


@dataclass(frozen=True, slots=True)
class GemmaVariant:
    """What one Gemma generation adds to the first."""

    sandwich_norms: bool = False  # norms after attention and on both sides of the MLP
    attn_softcap: bool = False  # honour `attn_logit_softcapping` (transformers' Gemma 3 ignores it)
    qk_norm: bool = False
    local_rope: bool = False  # sliding layers rotate with `rope_local_base_freq`, unscaled


class GemmaAttention(LlamaAttention):
    """Llama's attention with Gemma's query scale, soft-cap and `(1 + w)` q/k norms."""

    def __init__(self, config: ModelConfig, layer_idx: int, variant: GemmaVariant) -> None:
        biases = (config.attention_bias, config.attention_bias)
        super().__init__(config, layer_idx, biases, variant.qk_norm)
        if variant.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)
        scalar = config.query_pre_attn_scalar
        self.attn = Attention(
            layer_idx,
            (self.head_dim if scalar is None else scalar) ** -0.5,
            sliding_window=self.attn.sliding_window,
            logit_softcap=config.attn_logit_softcapping if variant.attn_softcap else None,
        )


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, variant: GemmaVariant) -> None:
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(size, eps, unit_offset=True)
        self.self_attn = GemmaAttention(config, layer_idx, variant)
        # Gemma: the norm before the MLP; Gemma 2/3: the norm after attention.
        self.post_attention_layernorm = RMSNorm(size, eps, unit_offset=True)
        self.mlp = LlamaMLP(config)
        self.pre_feedforward_layernorm: RMSNorm | None = None
        self.post_feedforward_layernorm: RMSNorm | None = None
        if variant.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(size, eps, unit_offset=True)
            self.post_feedforward_layernorm = RMSNorm(size, eps, unit_offset=True)
        self.use_kernels = False  # may run in the native decoder (`kernel_stack.py`)
        # Gemma 3's sliding layers rotate with their own tables (`GemmaModel.rope`)
        self.local_rope = variant.local_rope and self.self_attn.attn.sliding_window is not None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin)
        if self.pre_feedforward_layernorm is None or self.post_feedforward_layernorm is None:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def kernel_layer(self) -> native.LayerWeights | None:
        """This layer for the native decoder (`KernelLayer`)."""
        return kernel_layer(
            self,
            self.post_attention_layernorm,
            self.pre_feedforward_layernorm,
            self.post_feedforward_layernorm,
            self.local_rope,
        )


class GemmaModel(nn.Module):
    def __init__(self, config: ModelConfig, variant: GemmaVariant) -> None:
        super().__init__()
        assert config.head_dim is not None and config.layer_types is not None
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.normalizer = config.hidden_size**0.5
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, variant) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling,
            config.partial_rotary_factor,
            config.max_position_embeddings,
        )
        self.rotary_emb_local: RotaryEmbedding | None = None
        if variant.local_rope:
            base = config.rope_local_base_freq or _LOCAL_ROPE_BASE
            self.rotary_emb_local = RotaryEmbedding(
                config.head_dim, base, None, config.partial_rotary_factor
            )
        self.is_sliding = [t == "sliding_attention" for t in config.layer_types]
        self.eps = config.rms_norm_eps
        assert config.num_key_value_heads is not None
        self.stack = KernelStack(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )

    def rope(self, positions: torch.Tensor, seq_len: int) -> Rope:
        """Global cos and sin, then the sliding layers' own (the same when they share)."""
        dtype = self.embed_tokens.dtype
        rope = self.rotary_emb(positions, seq_len, dtype)
        if self.rotary_emb_local is None:
            return rope + rope
        return rope + self.rotary_emb_local(positions, seq_len, dtype)

    def forward(self, input_ids: torch.Tensor, rope: Rope) -> torch.Tensor:
        # [T, hidden_size], before the final norm
        x = self.embed_tokens(input_ids)
        # The scale is rounded to the compute dtype first, as transformers does (55.5 in bf16).
        x = x * torch.tensor(self.normalizer, dtype=x.dtype)
        out = self.stack.run(self.layers, self.eps, x, rope)
        if out is not None:
            return out
        global_rope, local_rope = rope[:2], rope[2:]
        for layer, is_sliding in zip(self.layers, self.is_sliding, strict=True):
            x = layer(x, *(local_rope if is_sliding else global_rope))
        return x


class GemmaForCausalLM(CausalLM):
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    variant = GemmaVariant()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = GemmaModel(config, self.variant)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)


class Gemma2ForCausalLM(GemmaForCausalLM):
    variant = GemmaVariant(sandwich_norms=True, attn_softcap=True)


class Gemma3ForCausalLM(GemmaForCausalLM):
    variant = GemmaVariant(sandwich_norms=True, qk_norm=True, local_rope=True)
