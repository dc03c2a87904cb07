"""What attention asks of a KV cache, and the simplest cache: one sequence, contiguous.

A forward runs over a flat batch of tokens from one or more sequences. Each attention layer
hands its new keys and values to the cache (`store`) and gets back one `Segment` per
sequence: which query rows are that sequence's, and all of its keys and values so far.
The engine's batches use the paged cache (`paged_cache.py`); a `KVCache` serves one sequence
on its own (scoring, embedding, tests), growing its buffers by doubling.

A cache may keep keys and values in a narrower dtype than the model computes in: the engine's
paged pools default to float16 (`DEFAULT_KV_CACHE_DTYPE`), as llama.cpp's, which halves their
memory and the bytes a decode step reads, for a rounding error far below the weights'
quantization. New keys and values are rounded as they are stored; attention widens what it
reads. The engine's one-off `KVCache`s (a prompt's logits, scoring a text) take the same
dtype, so that their logits are those the engine samples from; an embedding's keeps the
compute dtype.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from ladle.engine.kernels import native

# What `kv_cache_dtype` settings may name; float16 by default.
KV_CACHE_DTYPES = {
    "f16": torch.float16,
    "float16": torch.float16,
    "f32": torch.float32,
    "float32": torch.float32,
}
DEFAULT_KV_CACHE_DTYPE = torch.float16
# The cached dtypes the native attention kernels read (with float32 queries).
KERNEL_KV_DTYPES = (torch.float32, torch.float16)


def parse_kv_cache_dtype(value: str | torch.dtype) -> torch.dtype:
    """The dtype a KV cache setting names ("f16", "float16", "f32", "float32" or the dtype).

    Raises ValueError naming the accepted values otherwise.
    """
    if isinstance(value, torch.dtype):
        if value in KV_CACHE_DTYPES.values():
            return value
    elif value.lower() in KV_CACHE_DTYPES:
        return KV_CACHE_DTYPES[value.lower()]
    raise ValueError(f"unknown KV cache dtype {value!r} (one of {', '.join(KV_CACHE_DTYPES)})")


class Segment(NamedTuple):
    """One sequence's share of a batch in one layer."""

    rows: slice  # its query rows in the batch
    keys: torch.Tensor  # [num_kv_heads, start + num_rows, head_dim], in the cache's dtype
    values: torch.Tensor
    start: int  # tokens cached before these rows (the first row's position)


class KernelStep(NamedTuple):
    """A forward's whole cache as the native kernels address it: every layer's pools, each
    sequence's blocks of them, and where the new keys and values go (`native.Decoder` runs
    every layer of a Llama-family decoder over it)."""

    pools_k: list[torch.Tensor]  # per layer, [num_kv_heads, num_slots, head_dim]
    pools_v: list[torch.Tensor]
    block_tables: torch.Tensor  # int32 [B, max blocks]: slot = block * block_size + offset
    lengths: torch.Tensor  # int64 [B], each sequence's tokens with this forward's
    query_lens: torch.Tensor  # int64 [B], this forward's tokens of each, in batch order
    slots: torch.Tensor  # int64 [T], the new tokens' slots
    block_size: int
    is_decode: bool  # every sequence has one new token (the decode kernel writes it itself)


def paged_attend(
    step: KernelStep,
    layer_idx: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """A layer's rows `[T, H * D]` over the step's pools, after storing its keys and values."""
    pool_k, pool_v = step.pools_k[layer_idx], step.pools_v[layer_idx]
    if step.is_decode:  # the kernel writes k and v at each sequence's last position itself
        out = native.paged_decode_attention(
            q,
            k,
            v,
            pool_k,
            pool_v,
            step.block_tables,
            step.lengths,
            step.block_size,
            scale,
            window,
            softcap,
        )
        return out.view(q.shape[0], -1)
    kv = native.paged_kv(
        pool_k, pool_v, step.block_tables, step.lengths, step.query_lens, step.block_size
    )
    native.store_kv(kv, k, v, step.slots)
    return native.attention(q, kv, scale, False, window, softcap)


class AttentionCache(Protocol):
    def store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> list[Segment]:
        """Keep `k`, `v` (`[T, num_kv_heads, head_dim]`) and return every sequence's segment."""
        ...

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        window: int | None,
        softcap: float | None,
    ) -> torch.Tensor | None:
        """Store and attend through the cache's native kernels, `[T, H * D]`, or None when
        it has none for these tensors (attention then falls back to `store` and its own math).
        """
        ...

    def kernel_step(self, num_tokens: int) -> KernelStep | None:
        """The cache for a forward of `num_tokens` that the native kernels run whole, or None
        when it has no kernels; a forward that takes it stores every layer's keys and values
        through it (and skips `store` and `attend`)."""
        ...

    def max_length(self, num_tokens: int) -> int:
        """The longest sequence, cached tokens included, once this forward's tokens are in."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Called once per forward, after every layer stored its keys and values."""
        ...


class KVCache:
    """One sequence's keys and values, `[num_kv_heads, capacity, head_dim]` per layer.

    `dtype` is what they are stored in, whatever the model computes in.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        capacity: int = 256,
        device: torch.device | str = "cpu",
        v_head_dim: int | None = None,
        use_kernels: bool = False,
    ) -> None:
        self.num_layers = num_layers
        self.use_kernels = use_kernels  # attend through the native kernels (`attend`)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.capacity = capacity
        self.length = 0  # tokens whose K/V every layer holds
        self.k = [self._empty(capacity, head_dim) for _ in range(num_layers)]
        self.v = [self._empty(capacity, self.v_head_dim) for _ in range(num_layers)]

    def _empty(self, capacity: int, dim: int) -> torch.Tensor:
        return torch.empty(self.num_kv_heads, capacity, dim, dtype=self.dtype, device=self.device)

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for store, dim in ((self.k, self.head_dim), (self.v, self.v_head_dim)):
            for i, old in enumerate(store):
                grown = self._empty(capacity, dim)
                grown[:, : self.length] = old[:, : self.length]
                store[i] = grown
        self.capacity = capacity

    def store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> list[Segment]:
        num_tokens = k.shape[0]
        end = self.length + num_tokens
        self._reserve(end)
        self.k[layer_idx][:, self.length : end] = k.transpose(0, 1)
        self.v[layer_idx][:, self.length : end] = v.transpose(0, 1)
        keys, values = self.k[layer_idx][:, :end], self.v[layer_idx][:, :end]
        return [Segment(slice(0, num_tokens), keys, values, self.length)]

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        window: int | None,
        softcap: float | None,
    ) -> torch.Tensor | None:
        step = self.kernel_step(q.shape[0]) if q.dtype == torch.float32 else None
        if step is None:
            return None
        self.store(layer_idx, k, v)
        kv = native.paged_kv(
            self.k[layer_idx], self.v[layer_idx], None, step.lengths, step.query_lens, self.capacity
        )
        return native.attention(q.contiguous(), kv, scale, step.is_decode, window, softcap)

    def kernel_step(self, num_tokens: int) -> KernelStep | None:
        if not self.use_kernels or self.dtype not in KERNEL_KV_DTYPES:
            return None
        start, end = self.length, self.length + num_tokens
        self._reserve(end)
        # the buffers as a paged pool of one block: the rows compute what the engine's do
        return KernelStep(
            self.k,
            self.v,
            torch.zeros(1, 1, dtype=torch.int32),
            torch.tensor([end]),
            torch.tensor([num_tokens]),
            torch.arange(start, end),
            self.capacity,
            num_tokens == 1,
        )

    def max_length(self, num_tokens: int) -> int:
        return self.length + num_tokens

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
        assert self.length <= self.capacity
