"""Whisper (openai/whisper): a log-mel audio encoder and a text decoder that reads it.

Encoder: two 1-D convolutions with GELU (the second, of stride 2, turns 3000 mel frames into
1500 positions), fixed sinusoidal positions, pre-norm transformer layers, a final LayerNorm.
Decoder: token plus learned positions, pre-norm layers of causal self-attention,
cross-attention over the encoder's output and a GELU MLP, a final LayerNorm, and logits from
the token embedding table itself (tied, as Whisper was trained; CTranslate2 stores the head
as an alias of the table).

A decode step recomputes nothing it can keep: cross-attention's keys and values depend only
on the audio, so `cross_kv` makes them once per 30-s window and every step, and every
temperature fallback, reuses them; self-attention's go into a static cache (gpt-fast's
`KVCache`: fixed buffers written at the step's position) made per decode by `new_state`, so
one loaded model can serve several requests at once. q, k and v are one projection
(`qkv_proj`), cross-attention's k and v another (`kv_proj`), as CTranslate2 stores them: one
matmul where there were three. Whisper's key projection has no bias; the fused bias holds
zeros in its place, as the converter writes it.

Submodules carry the Hugging Face checkpoint's names (`model.encoder.layers.0.fc1`, ...);
`ctranslate2_weights` maps CTranslate2's `model.bin` variables onto them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ladle.engine.kernels import native
from ladle.engine.layers.embedding import Embedding
from ladle.engine.layers.linear import Linear, LinearWeight
from ladle.engine.layers.norm import LayerNorm
from ladle.engine.loading.ctranslate2 import CT2Model
from ladle.engine.models.base import CheckpointModule, Weight
from ladle.errors import ModelLoadError

_LAYER_NORM_EPS = 1e-5  # torch's default, which openai's and transformers' Whisper use


@dataclass(frozen=True, slots=True)
class WhisperConfig:
    """Whisper's dimensions (openai's `ModelDimensions`), with transformers' field names."""

    num_mel_bins: int  # 80, or 128 for large-v3
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    decoder_layers: int
    decoder_attention_heads: int
    vocab_size: int  # >= 51865 for multilingual models (openai's rule)
    max_source_positions: int = 1500  # encoder positions: one per 20 ms of a 30-s window
    max_target_positions: int = 448  # decoder positions

    def __post_init__(self) -> None:
        for heads in (self.encoder_attention_heads, self.decoder_attention_heads):
            if heads < 1 or self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} does not split into {heads} heads")
        if min(self.encoder_layers, self.decoder_layers) < 1:
            raise ValueError("Whisper needs at least one encoder and one decoder layer")

    @classmethod
    def from_ctranslate2(cls, ct2: CT2Model) -> WhisperConfig:
        """The dimensions a `WhisperSpec` file implies (its `config.json` has none)."""
        conv1 = ct2.variable("encoder/conv1/weight")  # [d_model, n_mels, 3]
        try:
            return cls(
                num_mel_bins=conv1.shape[1],
                d_model=conv1.shape[0],
                encoder_layers=ct2.layer_count("encoder"),
                encoder_attention_heads=int(ct2.variable("encoder/num_heads")),
                decoder_layers=ct2.layer_count("decoder"),
                decoder_attention_heads=int(ct2.variable("decoder/num_heads")),
                vocab_size=ct2.variable("decoder/embeddings/weight").shape[0],
                max_source_positions=ct2.variable("encoder/position_encodings/encodings").shape[0],
                max_target_positions=ct2.variable("decoder/position_encodings/encodings").shape[0],
            )
        except (ValueError, IndexError) as e:
            raise ModelLoadError(ct2.path, f"not a Whisper model's layout ({e})") from e

    @property
    def is_multilingual(self) -> bool:
        return self.vocab_size >= 51865


class WhisperConv1d(nn.Module):
    """A kernel-3 convolution over time, padded to keep (stride 1) or halve (stride 2) it."""

    has_bias = True

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.shape = (out_channels, in_channels, 3)
        self.stride = stride
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def load_weight(
        self, weight: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None
    ) -> None:
        if tuple(weight.shape) != self.shape or bias is None or bias.shape != (self.shape[0],):
            raise ValueError(f"weight {tuple(weight.shape)} and bias do not fit {self.shape}")
        self.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.weight is not None, "WhisperConv1d used before load_weight"
        return F.conv1d(x, self.weight, self.bias, stride=self.stride, padding=1)


class StepLinear(Linear):
    """A decoder projection, which a decode step runs on one row: memory-bound, so its
    weight stays in the file's float16 when the native kernels load, and they widen it in
    registers, exactly. On 2 cores, 1536x384 at one row: 161 µs against 325 in float32 on
    torch's kernel; the head (51864 x 384 on tiny) is read whole every step. Without the
    kernels, torch's float16 matmul would round the activations too, so the weight widens.

    The encoder's projections and cross-attention's keys and values run on 1500 rows, where
    torch's float32 matmul is the faster (45 ms against 68 for 1500x384x1536 on one core):
    those are plain `Linear`s and stay off the native kernels (`use_native_kernels`).
    """

    def load_weight(
        self, weight: LinearWeight, dtype: torch.dtype, bias: torch.Tensor | None = None
    ) -> None:
        stored = weight.dtype if isinstance(weight, torch.Tensor) else dtype
        if stored.itemsize < dtype.itemsize and native.load():
            self.storage_dtype, self.use_kernels = stored, True
        super().load_weight(weight, dtype, bias)


@dataclass(slots=True)
class DecoderState:
    """What one decode of one window carries from step to step."""

    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each [B, heads, 1500, head_dim]
    keys: torch.Tensor  # [layers, B, heads, max_target_positions, head_dim]
    values: torch.Tensor
    length: int = 0  # positions decoded so far


class WhisperSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, linear: type[Linear]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.qkv_proj = linear(d_model, 3 * d_model, bias=True)
        self.out_proj = linear(d_model, d_model, bias=True)

    def forward(
        self, x: torch.Tensor, state: DecoderState | None = None, layer: int = 0
    ) -> torch.Tensor:
        """Bidirectional over `x` (encoder), or causal over the cached positions (decoder)."""
        batch, num_tokens, d_model = x.shape
        qkv = self.qkv_proj(x).view(batch, num_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, T, head_dim]
        mask = None
        if state is not None:
            start, end = state.length, state.length + num_tokens
            state.keys[layer, :, :, start:end] = k
            state.values[layer, :, :, start:end] = v
            k, v = state.keys[layer, :, :, :end], state.values[layer, :, :, :end]
            if num_tokens > 1:  # a prompt: each token sees the cache and the tokens before it
                mask = torch.ones(num_tokens, end, dtype=torch.bool).tril(start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, num_tokens, d_model))


class WhisperCrossAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_proj = StepLinear(d_model, d_model, bias=True)
        self.kv_proj = Linear(d_model, 2 * d_model, bias=True)  # once a window, on 1500 rows
        self.out_proj = StepLinear(d_model, d_model, bias=True)

    def keys_values(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_frames, _ = audio.shape
        kv = self.kv_proj(audio).view(batch, num_frames, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each [B, heads, frames, head_dim]
        return k.contiguous(), v.contiguous()

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, num_tokens, d_model = x.shape
        q = self.q_proj(x).view(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, *kv)
        return self.out_proj(out.transpose(1, 2).reshape(batch, num_tokens, d_model))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = WhisperSelfAttention(d, config.encoder_attention_heads, Linear)
        self.self_attn_layer_norm = LayerNorm(d, _LAYER_NORM_EPS)
        self.final_layer_norm = LayerNorm(d, _LAYER_NORM_EPS)
        self.fc1 = Linear(d, 4 * d, bias=True)
        self.fc2 = Linear(4 * d, d, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))  # GELU's erf form


class WhisperDecoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = WhisperSelfAttention(d, config.decoder_attention_heads, StepLinear)
        self.self_attn_layer_norm = LayerNorm(d, _LAYER_NORM_EPS)
        self.encoder_attn = WhisperCrossAttention(d, config.decoder_attention_heads)
        self.encoder_attn_layer_norm = LayerNorm(d, _LAYER_NORM_EPS)
        self.final_layer_norm = LayerNorm(d, _LAYER_NORM_EPS)
        self.fc1 = StepLinear(d, 4 * d, bias=True)
        self.fc2 = StepLinear(4 * d, d, bias=True)

    def forward(self, x: torch.Tensor, state: DecoderState, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), state, layer)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), state.cross_kv[layer])
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.conv1 = WhisperConv1d(config.num_mel_bins, config.d_model, stride=1)
        self.conv2 = WhisperConv1d(config.d_model, config.d_model, stride=2)
        self.embed_positions = Embedding(config.max_source_positions, config.d_model)
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(config) for _ in range(config.encoder_layers)
        )
        self.layer_norm = LayerNorm(config.d_model, _LAYER_NORM_EPS)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)  # [B, frames / 2, d]
        assert self.embed_positions.weight is not None, "WhisperEncoder used before loading"
        x = x + self.embed_positions.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperDecoder(nn.Module):
    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.d_model)
        self.embed_positions = Embedding(config.max_target_positions, config.d_model)
        self.layers = nn.ModuleList(
            WhisperDecoderLayer(config) for _ in range(config.decoder_layers)
        )
        self.layer_norm = LayerNorm(config.d_model, _LAYER_NORM_EPS)

    def forward(self, input_ids: torch.Tensor, state: DecoderState) -> torch.Tensor:
        start, end = state.length, state.length + input_ids.shape[1]
        assert self.embed_positions.weight is not None, "WhisperDecoder used before loading"
        x = self.embed_tokens(input_ids) + self.embed_positions.weight[start:end]
        for i, layer in enumerate(self.layers):
            x = layer(x, state, i)
        state.length = end
        return self.layer_norm(x)


class WhisperModel(nn.Module):
    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config)


class WhisperForConditionalGeneration(CheckpointModule):
    """Whisper's encoder and decoder, and the three calls a decode is made of:
    `encode` a window, `new_state` for it, then `decode` tokens into that state and take
    `logits` of the rows that need them."""

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.config = config
        self.model = WhisperModel(config)
        self.proj_out = StepLinear(config.d_model, config.vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, Weight]], dtype: torch.dtype) -> None:
        super().load_weights(weights, dtype)
        # one table for both (CTranslate2 stores it once): the embedding reads the head's
        self.model.decoder.embed_tokens.weight = self.proj_out.weight

    def use_native_kernels(self) -> None:
        """Nothing to switch: each `StepLinear` turned its kernel on as it loaded (and only
        those run faster on it)."""

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, the one the weights were loaded in."""
        return self.model.decoder.embed_tokens.dtype

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """Audio features `[B, 1500, d_model]` of log-mel windows `[B, n_mels, 3000]`."""
        return self.model.encoder(mel.to(self.dtype))

    def new_state(self, audio: torch.Tensor) -> DecoderState:
        """An empty decode of the windows whose features are `audio` `[B, 1500, d_model]`."""
        return self.state_for(self.cross_kv(audio))

    def cross_kv(self, audio: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys and values for `audio`."""
        layers = cast(list[WhisperDecoderLayer], list(self.model.decoder.layers))
        return [layer.encoder_attn.keys_values(audio) for layer in layers]

    def state_for(self, cross_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DecoderState:
        """An empty decode over cross-attention keys and values already made (a retry of the
        same window at another temperature reuses them)."""
        c = self.config
        batch = cross_kv[0][0].shape[0]
        head_dim = c.d_model // c.decoder_attention_heads
        shape = (
            c.decoder_layers,
            batch,
            c.decoder_attention_heads,
            c.max_target_positions,
            head_dim,
        )
        keys = torch.empty(shape, dtype=self.dtype)  # read only where written
        return DecoderState(cross_kv, keys, torch.empty_like(keys))

    def decode(self, input_ids: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """Hidden states `[B, T, d_model]` of the next `T` tokens `[B, T]`; advances `state`."""
        if state.length + input_ids.shape[1] > self.config.max_target_positions:
            raise ValueError(
                f"{state.length + input_ids.shape[1]} tokens exceed the decoder's "
                f"{self.config.max_target_positions} positions"
            )
        return self.model.decoder(input_ids, state)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of hidden states `[..., d_model]`."""
        return self.proj_out(hidden).float()


def ctranslate2_weights(
    ct2: CT2Model, model: WhisperForConditionalGeneration
) -> Iterator[tuple[str, torch.Tensor]]:
    """`(module.param, tensor)` for every weight `model` needs, read from a `WhisperSpec` file.

    Walks the model's modules rather than the file's variables, so a variable the file lacks
    raises `ModelLoadError` with its CTranslate2 name and the file's path.
    """
    for module_name, module in model.named_modules():
        if not hasattr(module, "load_weight"):
            continue
        ct2_module = _ct2_module_name(module_name)
        for param in ("weight", "bias") if getattr(module, "has_bias", False) else ("weight",):
            if ct2_module.endswith("layer_norm"):
                ct2_param = "gamma" if param == "weight" else "beta"
            elif ct2_module.endswith("position_encodings"):
                ct2_param = "encodings"
            else:
                ct2_param = param
            yield f"{module_name}.{param}", ct2.float_variable(f"{ct2_module}/{ct2_param}")


# ladle module (below `model.`) -> CTranslate2 scope; layers' parts below `layer_<i>/`
_CT2_MODULES = {
    "encoder.conv1": "encoder/conv1",
    "encoder.conv2": "encoder/conv2",
    "encoder.embed_positions": "encoder/position_encodings",
    "encoder.layer_norm": "encoder/layer_norm",
    "decoder.embed_tokens": "decoder/embeddings",
    "decoder.embed_positions": "decoder/position_encodings",
    "decoder.layer_norm": "decoder/layer_norm",
    "proj_out": "decoder/projection",  # an alias of decoder/embeddings in the file
}
_CT2_LAYER_PARTS = {
    "self_attn_layer_norm": "self_attention/layer_norm",
    "self_attn.qkv_proj": "self_attention/linear_0",
    "self_attn.out_proj": "self_attention/linear_1",
    "encoder_attn_layer_norm": "attention/layer_norm",
    "encoder_attn.q_proj": "attention/linear_0",
    "encoder_attn.kv_proj": "attention/linear_1",
    "encoder_attn.out_proj": "attention/linear_2",
    "final_layer_norm": "ffn/layer_norm",
    "fc1": "ffn/linear_0",
    "fc2": "ffn/linear_1",
}


def _ct2_module_name(module_name: str) -> str:
    """`model.decoder.layers.3.encoder_attn.q_proj` -> `decoder/layer_3/attention/linear_0`."""
    name = module_name.removeprefix("model.")
    if name in _CT2_MODULES:
        return _CT2_MODULES[name]
    side, _, index, part = name.split(".", 3)  # side, "layers", index, part
    return f"{side}/layer_{index}/{_CT2_LAYER_PARTS[part]}"
