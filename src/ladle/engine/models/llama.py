"""Llama (and Mistral): pre-norm decoder, GQA attention with RoPE, SwiGLU MLP.

The Qwen 2/3 and Phi-3 files reuse these blocks: they differ only in which projections carry
a bias, whether q/k are normalized per head, and how their checkpoints pack the projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ladle.engine.kv_cache import KernelStep
from ladle.engine.layers.activation import SiluAndMul, gated_activation
from ladle.engine.layers.attention import Attention, current_cache
from ladle.engine.layers.embedding import Embedding, LMHead
from ladle.engine.layers.linear import Linear, weights_generation
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
        self.use_kernels = False  # the rotation through `ladle_kernels.rotary`

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
        self.use_kernels = False  # the layer in two native calls around attention
        self._kernel_weights: tuple[int, _KernelWeights | None] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and x.dtype == torch.float32 and not torch.compiler.is_compiling():
            weights = self.kernel_weights()
            if weights is not None:
                return self._forward_kernels(x, cos, sin, weights)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _forward_kernels(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: _KernelWeights
    ) -> torch.Tensor:
        """`forward` through `kernels/decoder_layer.cpp`: the same kernels, the same bits,
        about fifteen fewer Python calls (on a small model's decode step they cost more than
        the arithmetic). Compiled graphs trace `forward`'s own path instead."""
        attn = self.self_attn
        ops = torch.ops.ladle_kernels
        eps = self.input_layernorm.eps
        q, k, v = ops.attention_inputs(
            x, w.input_norm, eps, w.qkv, w.qkv_bias, cos, sin, attn.num_heads, attn.num_kv_heads
        )
        out = attn.attn(q, k, v)
        eps = self.post_attention_layernorm.eps
        return ops.mlp_residual(x, out, w.o, w.o_bias, w.post_norm, eps, w.gate_up, w.down)

    def kernel_weights(self) -> _KernelWeights | None:
        """The layer's weights for the native path, None when some layer cannot take it;
        gathered again whenever a `Linear` changes (re-quantized, calibrating)."""
        generation = weights_generation()
        if self._kernel_weights is None or self._kernel_weights[0] != generation:
            self._kernel_weights = (generation, _KernelWeights.of(self))
        return self._kernel_weights[1]


@dataclass(frozen=True, slots=True)
class _KernelWeights:
    """A decoder layer's tensors as `ladle_kernels.attention_inputs` and `mlp_residual`
    take them (see `Linear.kernel_weights`)."""

    input_norm: torch.Tensor
    qkv: list[torch.Tensor]
    qkv_bias: torch.Tensor | None
    o: list[torch.Tensor]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]

    def entries(self) -> list[torch.Tensor | None]:
        """The layer's twelve entries of `ladle_kernels.decoder_layers`' weights (its order:
        `kernels/decoder_layer.cpp`), a [w] form's second tensor None."""

        def pair(w: list[torch.Tensor]) -> list[torch.Tensor | None]:
            return [w[0], w[1] if len(w) == 2 else None]

        return [
            self.input_norm,
            *pair(self.qkv),
            self.qkv_bias,
            *pair(self.o),
            self.o_bias,
            self.post_norm,
            *pair(self.gate_up),
            *pair(self.down),
        ]

    @staticmethod
    def of(layer: LlamaDecoderLayer) -> _KernelWeights | None:
        attn, mlp = layer.self_attn, layer.mlp
        plain = attn.q_norm is None and isinstance(mlp.act_fn, SiluAndMul)
        norm, post_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        if not plain or norm is None or post_norm is None:
            return None
        if norm.dtype != torch.float32 or post_norm.dtype != torch.float32:
            return None
        qkv, o = attn.qkv_proj.kernel_weights(), attn.o_proj.kernel_weights()
        gate_up, down = mlp.gate_up_proj.kernel_weights(), mlp.down_proj.kernel_weights()
        if qkv is None or o is None or gate_up is None or down is None:
            return None
        return _KernelWeights(
            norm, qkv, attn.qkv_proj.bias, o, attn.o_proj.bias, post_norm, gate_up, down
        )


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
        self._kernel_stack: tuple[int, _KernelStack | None] | None = None

    def rope(self, positions: torch.Tensor, seq_len: int) -> Rope:
        return self.rotary_emb(positions, seq_len, self.embed_tokens.dtype)

    def forward(self, input_ids: torch.Tensor, rope: Rope) -> torch.Tensor:
        # [T, hidden_size], before the final norm
        x = self.embed_tokens(input_ids)
        cos, sin = rope
        if x.dtype == torch.float32 and not torch.compiler.is_compiling():
            stack = self.kernel_stack()
            step = current_cache().kernel_step(x.shape[0]) if stack is not None else None
            if stack is not None and step is not None:
                return stack.run(x, cos, sin, step)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x

    def kernel_stack(self) -> _KernelStack | None:
        """Every layer's weights for `ladle_kernels.decoder_layers`, None unless every layer
        runs on the layer ops (`LlamaDecoderLayer.kernel_weights`) with attention the kernels
        can do alone (no sliding window); gathered again whenever a `Linear` changes."""
        if not all(layer.use_kernels for layer in self.layers):
            return None
        generation = weights_generation()
        if self._kernel_stack is None or self._kernel_stack[0] != generation:
            self._kernel_stack = (generation, _KernelStack.of(self.layers))
        return self._kernel_stack[1]


@dataclass(frozen=True, slots=True)
class _KernelStack:
    """A decoder's layers as `ladle_kernels.decoder_layers` takes them: one call for every
    layer, attention included, over a cache the kernels address (`KernelStep`). The layers
    call the kernels that `LlamaDecoderLayer._forward_kernels` and the paged attention kernels
    call, in the same order, so the logits are those of the per-layer path to the bit; on
    SmolLM2 it takes a decode step from 7.7 to 5.3 ms (two cores), all of it Python saved."""

    weights: list[torch.Tensor | None]
    eps: float
    num_heads: int
    num_kv_heads: int
    scale: float

    @staticmethod
    def of(layers: nn.ModuleList) -> _KernelStack | None:
        weights: list[torch.Tensor | None] = []
        first: LlamaDecoderLayer = layers[0]
        attn = first.self_attn
        eps = first.input_layernorm.eps
        for layer in layers:
            layer_weights = layer.kernel_weights()
            norms = (layer.input_layernorm.eps, layer.post_attention_layernorm.eps)
            if (
                layer_weights is None
                or layer.self_attn.attn.sliding_window is not None
                or layer.self_attn.attn.scale != attn.attn.scale
                or norms != (eps, eps)
            ):
                return None
            weights.extend(layer_weights.entries())
        return _KernelStack(weights, eps, attn.num_heads, attn.num_kv_heads, attn.attn.scale)

    def run(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: KernelStep
    ) -> torch.Tensor:
        return torch.ops.ladle_kernels.decoder_layers(
            x,
            cos,
            sin,
            self.weights,
            self.eps,
            self.num_heads,
            self.num_kv_heads,
            self.scale,
            step.pools_k,
            step.pools_v,
            step.block_tables,
            step.lengths,
            step.query_lens,
            step.slots,
            step.block_size,
            step.is_decode,
        )


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
