"""Qwen 3 (dense): the Llama decoder with an RMSNorm on each q and k head before RoPE."""

from __future__ import annotations

from ladle.engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
