"""What every architecture provides to the engine: build from a config, load, run a step.

Loading is shared: each checkpoint tensor goes to the submodule of the same name, and
checkpoint modules that the architecture fuses (q/k/v into `qkv_proj`, gate/up into
`gate_up_proj`, nano-vllm's `packed_modules_mapping`) are gathered, stacked along the output
rows and handed over as one weight. GGML parts of one type are stacked as raw blocks, so a
fused 4-bit projection stays 4-bit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from torch import nn

from ladle.engine.kv_cache import AttentionCache, KVCache
from ladle.engine.layers.attention import attention_cache
from ladle.engine.layers.embedding import tie_lm_head
from ladle.engine.layers.linear import Linear
from ladle.engine.loading.config import ModelConfig
from ladle.engine.paged_cache import PagedKVCache
from ladle.engine.quant.ggml import GGMLStack, GGMLTensor
from ladle.errors import ModelLoadError

Weight = torch.Tensor | GGMLTensor
Rope = tuple[torch.Tensor, ...]  # the cos/sin tables of a forward's positions, per RoPE kind
Step = Callable[[torch.Tensor, Rope, torch.Tensor | None], torch.Tensor]
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


class CheckpointModule(nn.Module):
    """A model whose submodules are named as its Hugging Face checkpoint names them.

    Every module that holds weights has `load_weight(weight, dtype[, bias])`; GGUF names are
    translated before they arrive (`ladle.engine.loading.weights.gguf_weights`).
    """

    # checkpoint module -> (fused module, index of its rows in the fused weight)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {}

    def has_tied_head(self) -> bool:
        """Whether `lm_head` shares `model.embed_tokens`' table (and is absent from the file)."""
        return False

    def use_native_kernels(self) -> None:
        """Run every layer that has a native kernel (`kernels/native.py`) through it.

        Each such module holds a `use_kernels` flag and still checks its input's dtype: the
        kernels take float32 activations, and a bfloat16 model keeps torch's paths.
        """
        for module in self.modules():
            if hasattr(module, "use_kernels"):
                module.use_kernels = True

    def load_weights(self, weights: Iterable[tuple[str, Weight]], dtype: torch.dtype) -> None:
        """Fill every weight from `(hf_name, tensor)` pairs, in any order, in `dtype`.

        Raises `ModelLoadError` naming the tensor that is unexpected, misshapen or missing.
        """
        modules = {n: m for n, m in self.named_modules() if hasattr(m, "load_weight")}
        num_parts = Counter(fused for fused, _ in self.packed_modules_mapping.values())
        is_tied = self.has_tied_head()
        pending: dict[str, dict[str, dict[int, Weight]]] = {}
        loaded: set[str] = set()
        embed_source: Weight | None = None  # kept for a tied head, which may repack it
        for name, weight in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (is_tied and name == "lm_head.weight"):
                continue  # a tied head is the embedding, as transformers ties it
            module_name, part = self._target(name)
            module = modules.get(module_name)
            param = name.rpartition(".")[2]
            needed = _params(module)
            if module is None or param not in needed or module_name in loaded:
                raise ModelLoadError(name, f"unexpected tensor for {type(self).__name__}")
            parts = pending.setdefault(module_name, {}).setdefault(param, {})
            if part in parts:
                raise ModelLoadError(name, "appears twice in the checkpoint")
            parts[part] = weight
            count = num_parts.get(module_name.rpartition(".")[2], 1)
            got = pending[module_name]
            if all(len(got.get(p, ())) == count for p in needed):
                fused = {p: _fuse(got[p], f"{module_name}.{p}", dtype) for p in needed}
                full_weight = fused.pop("weight")
                if is_tied and module_name == "model.embed_tokens":
                    embed_source = full_weight  # loaded at the end, with the head it shares
                else:
                    try:
                        module.load_weight(full_weight, dtype, **fused)
                    except (ValueError, ModelLoadError) as e:  # a shape that does not fit
                        reason = e.reason if isinstance(e, ModelLoadError) else str(e)
                        raise ModelLoadError(f"{module_name}.weight", reason) from e
                del pending[module_name]
                loaded.add(module_name)
        missing = [
            name
            for m in modules
            if m not in loaded and not (is_tied and m == "lm_head")
            for name in self._sources(m, pending.get(m, {}).get("weight", {}))
        ]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelLoadError(missing[0], f"missing from the checkpoint{more}")
        if is_tied:
            assert embed_source is not None
            embed = self.get_submodule("model.embed_tokens")
            tie_lm_head(self.get_submodule("lm_head"), embed, embed_source, dtype)  # type: ignore[arg-type]

    def _target(self, name: str) -> tuple[str, int]:
        """The module a checkpoint tensor loads into, and its part index there."""
        module_name = name.rpartition(".")[0]
        prefix, _, leaf = module_name.rpartition(".")
        if leaf not in self.packed_modules_mapping:
            return module_name, 0
        fused, part = self.packed_modules_mapping[leaf]
        return (f"{prefix}.{fused}" if prefix else fused), part

    def _sources(self, module_name: str, present: dict[int, Weight]) -> list[str]:
        """Checkpoint weights of `module_name` not yet seen (for "missing" messages)."""
        prefix, _, leaf = module_name.rpartition(".")
        parts = {i: k for k, (fused, i) in self.packed_modules_mapping.items() if fused == leaf}
        leaves = [k for i, k in sorted(parts.items()) if i not in present] if parts else [leaf]
        return [".".join(filter(None, (prefix, name, "weight"))) for name in leaves]


class CausalLM(CheckpointModule):
    """A decoder-only language model over a flat batch of tokens and their KV cache.

    Subclasses are named `<Arch>ForCausalLM`, take their `ModelConfig` in `__init__`, and name
    submodules as the checkpoint does (`model.embed_tokens`, `lm_head`, ...). Their `model`
    has `rope(positions, seq_len)` and `forward(input_ids, rope)`.

    A forward is split in two: the host side (RoPE tables, which cache attention uses, its
    bookkeeping) and `logits`, a pure function of tensors that `torch.compile` can take whole.
    `StepCompiler` installs the compiled version as `step`.
    """

    config: ModelConfig
    model: nn.Module  # embeddings, decoder layers and `norm`; returns hidden states
    lm_head: Linear
    step: Step | None = None
    use_kernels = False  # the native kernels are on: caches made here use them too

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64, absolute positions of input_ids
        cache: AttentionCache,  # a `KVCache` for one sequence, a `KVBatch` in the engine
        logits_indices: torch.Tensor | None = None,  # rows of T to compute logits for
    ) -> torch.Tensor:  # [len(logits_indices) or T, vocab_size] float32
        num_tokens = input_ids.shape[0]
        rope = self.model.rope(positions, cache.max_length(num_tokens))
        with attention_cache(cache):
            logits = (self.step or self.logits)(input_ids, rope, logits_indices)
        cache.advance(num_tokens)
        return logits

    def runs_on_kernels(self) -> bool:
        """Whether the decoder runs in one native call a step (`models/kernel_stack.py`:
        every layer's weights, norms and attention have a native form)."""
        stack = getattr(self.model, "stack", None)
        return (
            self.use_kernels
            and stack is not None
            and stack.decoder(self.model.layers, self.model.eps) is not None
        )

    def logits(
        self, input_ids: torch.Tensor, rope: Rope, logits_indices: torch.Tensor | None
    ) -> torch.Tensor:
        """The forward's tensor work; attention reads the cache set by `attention_cache`."""
        hidden = self.model(input_ids, rope)
        if logits_indices is not None:
            hidden = hidden[logits_indices]  # the head is the costliest matmul: skip unused rows
        logits = self.lm_head(self.model.norm(hidden)).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Final-normed hidden states `[T, hidden_size]` of one whole sequence (embeddings)."""
        num_tokens = input_ids.shape[0]
        rope = self.model.rope(torch.arange(num_tokens), num_tokens)
        with attention_cache(self.new_cache(dtype, capacity=num_tokens)):
            return self.model.norm(self.model(input_ids, rope))

    def new_cache(self, dtype: torch.dtype, capacity: int = 256) -> KVCache:
        """A cache for running one sequence on its own (the engine uses its paged pool), its
        keys and values stored in `dtype` (the compute dtype, or a KV cache dtype)."""
        c = self.config
        assert c.num_key_value_heads is not None and c.head_dim is not None
        return KVCache(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            dtype,
            capacity,
            use_kernels=self.use_kernels,
        )

    def new_paged_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> PagedKVCache:
        """The engine's pool: `num_blocks` blocks per layer, keys and values stored in `dtype`."""
        c = self.config
        assert c.num_key_value_heads is not None and c.head_dim is not None
        return PagedKVCache(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks, block_size, dtype
        )

    def has_tied_head(self) -> bool:
        return self.config.tie_word_embeddings


def _params(module: nn.Module | None) -> tuple[str, ...]:
    return ("weight", "bias") if getattr(module, "has_bias", False) else ("weight",)


def _fuse(parts: dict[int, Weight], name: str, dtype: torch.dtype) -> Weight | GGMLStack:
    """Stack parts along rows: as raw GGML blocks when they share a type, each in its own
    blocks when they do not (`GGMLStack`), else dense."""
    ordered = [parts[i] for i in sorted(parts)]
    if len(ordered) == 1:
        return ordered[0]
    if all(isinstance(p, GGMLTensor) for p in ordered):
        ggml = [p for p in ordered if isinstance(p, GGMLTensor)]
        if len({p.ggml_type for p in ggml}) == 1:
            return GGMLTensor.concat_rows(ggml, name)
        return GGMLStack(name, ggml)
    dense = [p.dequantize(dtype) if isinstance(p, GGMLTensor) else p.to(dtype) for p in ordered]
    return torch.cat(dense, dim=0)
