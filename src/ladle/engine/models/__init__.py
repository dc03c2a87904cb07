"""Architectures by Hugging Face `model_type`: `ARCHITECTURES[config.architecture](config)`."""

from __future__ import annotations

from ladle.engine.models.base import CausalLM
from ladle.engine.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, GemmaForCausalLM
from ladle.engine.models.llama import LlamaForCausalLM
from ladle.engine.models.phi3 import Phi3ForCausalLM
from ladle.engine.models.qwen2 import Qwen2ForCausalLM
from ladle.engine.models.qwen3 import Qwen3ForCausalLM

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,  # Llama with a sliding window, which the config carries
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "phi3": Phi3ForCausalLM,
    "gemma": GemmaForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "gemma3": Gemma3ForCausalLM,  # text-only: the decoder of a multimodal Gemma 3 config
    "gemma3_text": Gemma3ForCausalLM,
}

__all__ = ["ARCHITECTURES", "CausalLM"]
