"""The engine's KV cache: one pool of fixed-size blocks per layer, shared by every sequence.

A layer's keys live in `[num_kv_heads, num_blocks * block_size, head_dim]`, so a token's slot
is `block * block_size + offset` and a sequence whose blocks form one ascending run reads its
keys as a slice of the pool (a view: no copy). A sequence whose blocks are scattered (a shared
prefix followed by its own blocks) gathers them, which costs about as much as the attention
itself on a CPU; the block manager places blocks to keep runs whole.

With native kernels on (`use_kernels`), attention skips both the gather and the per-sequence
calls: each layer makes one call for the whole step, reading every sequence's keys through
its block table. A step in which every sequence decodes one token writes the new keys and
values in the same call (`native.paged_decode_attention`); any other step stores them first,
then attends all rows at once, each row computing bit for bit what a decode of it alone
computes. A model whose layers all run on the kernels takes the step whole instead
(`KVBatch.kernel_step`): its every layer, attention included, in one call.

The pools' dtype is the engine's `kv_cache_dtype`, float16 by default whatever the model
computes in (`kv_cache.py`): new keys and values are rounded into it, and attention reads them
back in its own dtype (the kernel widens them in registers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ladle.engine.kv_cache import KernelStep, Segment, paged_attend


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        v_head_dim: int | None = None,
    ) -> None:
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.use_kernels = False  # attention through the native kernels (`KVBatch.attend`)
        slots, v_dim = num_blocks * block_size, v_head_dim or head_dim
        # torch.empty maps the pool lazily: memory is touched only as blocks are written.
        layers = range(num_layers)
        self.k = [torch.empty(num_kv_heads, slots, head_dim, dtype=dtype) for _ in layers]
        self.v = [torch.empty(num_kv_heads, slots, v_dim, dtype=dtype) for _ in layers]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy every layer's block `src` into block `dst`, for each `(src, dst)`."""
        size = self.block_size
        for pool in (*self.k, *self.v):
            for src, dst in pairs:
                pool[:, dst * size : (dst + 1) * size] = pool[:, src * size : (src + 1) * size]


def token_slots(
    block_table: list[int], contiguous: bool, block_size: int, end: int
) -> slice | torch.Tensor:
    """The slots of a sequence's first `end` tokens: a slice when its blocks are a run."""
    if contiguous:
        first = block_table[0] * block_size
        return slice(first, first + end)
    blocks = torch.tensor(block_table[: -(-end // block_size)])
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:end]


@dataclass(slots=True)
class SequenceSlots:
    """Where one sequence's tokens of a batch go, and where all of its keys are read from."""

    rows: slice  # its query rows in the batch
    start: int  # tokens cached before these rows
    block_table: list[int]
    contiguous: bool  # whether block_table is one ascending run
    block_size: int
    _read: slice | torch.Tensor | None = None

    @property
    def read(self) -> slice | torch.Tensor:
        """Slots of its `start + num_rows` keys, a run or gathered: built on first use, since
        only attention in torch reads them (the native kernels read the block tables)."""
        if self._read is None:
            end = self.start + self.rows.stop - self.rows.start
            self._read = token_slots(self.block_table, self.contiguous, self.block_size, end)
        return self._read


class KVBatch:
    """The `AttentionCache` of one engine step: a flat batch of tokens over the paged pool."""

    def __init__(
        self,
        cache: PagedKVCache,
        write: slice | torch.Tensor,
        sequences: list[SequenceSlots],
        kernel: KernelStep | None = None,
    ) -> None:
        self.cache = cache
        self.kernel = kernel  # only with kernels on
        self.write = write  # the slots of the new tokens, in batch order (a slice when a run)
        self.sequences = sequences
        self._max_length = max(s.start + s.rows.stop - s.rows.start for s in sequences)

    def store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> list[Segment]:
        pool_k, pool_v = self._write(layer_idx, k, v)
        return [
            Segment(s.rows, pool_k[:, s.read], pool_v[:, s.read], s.start) for s in self.sequences
        ]

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
        step = self.kernel
        if step is None or q.dtype != torch.float32:
            return None
        return paged_attend(
            step, layer_idx, q.contiguous(), k.contiguous(), v.contiguous(), scale, window, softcap
        )

    def _write(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pool_k, pool_v = self.cache.k[layer_idx], self.cache.v[layer_idx]
        # rounded to the pools' dtype here: a write through a slot tensor does not convert
        pool_k[:, self.write] = k.transpose(0, 1).to(pool_k.dtype)
        pool_v[:, self.write] = v.transpose(0, 1).to(pool_v.dtype)
        return pool_k, pool_v

    def kernel_step(self, num_tokens: int) -> KernelStep | None:
        return self.kernel

    def max_length(self, num_tokens: int) -> int:
        return self._max_length

    def advance(self, num_tokens: int) -> None:
        """The engine counts computed tokens per sequence itself."""
