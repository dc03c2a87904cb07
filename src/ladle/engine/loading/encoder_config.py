"""The shape of a BERT-family encoder, from a Hugging Face `config.json` or GGUF metadata.

Encoders get their own config rather than `ModelConfig`: they have learned absolute positions,
token types and LayerNorm, and none of a decoder's RoPE, KV heads or sliding windows.
RoBERTa and XLM-R are BERT with position ids counted from `pad_token_id + 1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from ladle.engine.loading.config import MAX_LAYERS, is_count, is_index, is_number
from ladle.engine.loading.gguf import GGUFFile
from ladle.errors import ModelLoadError, UnsupportedArchitectureError

# Hugging Face `model_type` -> whether position ids start after the padding index.
ENCODER_ARCHITECTURES = {"bert": False, "roberta": True, "xlm-roberta": True}
GGUF_ENCODER_ARCHITECTURES = {"bert": "bert"}
ENCODER_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)


@dataclass(slots=True)
class EncoderConfig:
    """Hyperparameters of one bidirectional encoder, with Hugging Face's names."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    path: str = ""  # the file or folder it came from, for error messages

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or self.architecture not in ENCODER_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                self.path or "config",
                f"encoder architecture '{self.architecture}' is not supported "
                f"(supported: {', '.join(ENCODER_ARCHITECTURES)})",
            )
        for name in (*_REQUIRED, "type_vocab_size"):
            value = getattr(self, name)
            if not is_count(value):
                self._fail(name, f"must be a positive integer, got {value!r}")
        if self.num_hidden_layers > MAX_LAYERS:
            self._fail("num_hidden_layers", f"{self.num_hidden_layers} is over {MAX_LAYERS}")
        if not is_number(self.layer_norm_eps):
            self._fail("layer_norm_eps", f"must be a number, got {self.layer_norm_eps!r}")
        if not is_index(self.pad_token_id):
            self._fail("pad_token_id", f"must be an integer from 0, got {self.pad_token_id!r}")
        if self.hidden_size % self.num_attention_heads:
            self._fail("num_attention_heads", "does not divide hidden_size")
        if self.hidden_act not in ENCODER_ACTIVATIONS:
            self._fail("hidden_act", f"'{self.hidden_act}' is not supported {ENCODER_ACTIVATIONS}")
        if self.max_seq_len < 1:
            self._fail("max_position_embeddings", "leaves no position after the padding offset")

    def _fail(self, field: str, reason: str) -> NoReturn:
        raise ModelLoadError(self.path or "config", f"{field}: {reason}")

    @property
    def position_offset(self) -> int:
        """The position id of the first token (RoBERTa skips the padding index and below)."""
        return self.pad_token_id + 1 if ENCODER_ARCHITECTURES[self.architecture] else 0

    @property
    def max_seq_len(self) -> int:
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, config: dict[str, Any], path: object = "") -> EncoderConfig:
        if not isinstance(config, dict):
            raise ModelLoadError(path, "config.json does not hold a JSON object")
        for name in (*_REQUIRED, "model_type"):
            if config.get(name) is None:
                raise ModelLoadError(path, f"{name}: missing from config.json")
        kind = config.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ModelLoadError(path, f"position_embedding_type: '{kind}' is not supported")
        return cls(
            architecture=config["model_type"],
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            max_position_embeddings=config["max_position_embeddings"],
            type_vocab_size=config.get("type_vocab_size", 2),
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            hidden_act=config.get("hidden_act", "gelu"),
            pad_token_id=config.get("pad_token_id") or 0,
            path=str(path),
        )

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> EncoderConfig:
        """Read llama.cpp's `bert.*` metadata."""
        values = {}
        for key in (
            "block_count",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.layer_norm_epsilon",
            "context_length",
        ):
            if gguf.get(key) is None:
                raise ModelLoadError(gguf.path, f"{gguf.architecture}.{key}: missing")
            values[key] = gguf.get(key)
        if "token_embd.weight" not in gguf.tensors:
            raise ModelLoadError(gguf.path, "token_embd.weight: missing")
        types = gguf.tensors.get("token_types.weight")
        return cls(
            architecture=GGUF_ENCODER_ARCHITECTURES[gguf.architecture],
            vocab_size=gguf.tensors["token_embd.weight"].shape[0],
            hidden_size=values["embedding_length"],
            intermediate_size=values["feed_forward_length"],
            num_hidden_layers=values["block_count"],
            num_attention_heads=values["attention.head_count"],
            max_position_embeddings=values["context_length"],
            type_vocab_size=types.shape[0] if types is not None else 2,
            layer_norm_eps=values["attention.layer_norm_epsilon"],
            pad_token_id=gguf.metadata.get("tokenizer.ggml.padding_token_id", 0),
            path=str(gguf.path),
        )
