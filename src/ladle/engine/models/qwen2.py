"""Qwen 2 / 2.5: the Llama decoder with a bias on the q, k and v projections (not on o)."""

from __future__ import annotations

from ladle.engine.loading.config import ModelConfig
from ladle.engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_biases(config: ModelConfig) -> tuple[bool, bool]:
        return True, False  # fixed by the architecture, whatever the config says
