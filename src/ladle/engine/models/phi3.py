"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama decoder, checkpoints already fused, LongRoPE.

Phi-3 stores `qkv_proj` and `gate_up_proj` fused, exactly as ladle runs them, so nothing is
repacked; partial rotary dimensions and LongRoPE's short/long factors live in the rotary layer.
"""

from __future__ import annotations

from typing import ClassVar

from ladle.engine.loading.config import ModelConfig
from ladle.engine.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {}

    @staticmethod
    def attention_biases(config: ModelConfig) -> tuple[bool, bool]:
        return False, False
