"""Per-sequence key/value cache: one contiguous buffer per layer, grown by doubling.

Each sequence owns a `KVCache`. Attention layers call `update` with the new tokens' keys and
values and get back every cached position; the model calls `advance` once per forward, so all
layers of one step write at the same offset.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one sequence, `[num_kv_heads, capacity, head_dim]` per layer."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        capacity: int = 256,
        device: torch.device | str = "cpu",
        v_head_dim: int | None = None,
    ) -> None:
        self.num_layers = num_layers
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

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` (`[num_kv_heads, T, head_dim]`) after the cached tokens.

        Returns views of all `length + T` keys and values of this layer.
        """
        end = self.length + k.shape[1]
        self._reserve(end)
        self.k[layer_idx][:, self.length : end] = k
        self.v[layer_idx][:, self.length : end] = v
        return self.k[layer_idx][:, :end], self.v[layer_idx][:, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
        assert self.length <= self.capacity

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (rewinding is just moving the end)."""
        assert 0 <= length <= self.length
        self.length = length

    def fork(self) -> KVCache:
        """An independent copy, used to branch `n` choices off one shared prefill."""
        twin = KVCache.__new__(KVCache)
        twin.num_layers, twin.num_kv_heads = self.num_layers, self.num_kv_heads
        twin.head_dim, twin.v_head_dim = self.head_dim, self.v_head_dim
        twin.dtype, twin.device = self.dtype, self.device
        twin.capacity, twin.length = self.capacity, self.length
        twin.k = [t.clone() for t in self.k]
        twin.v = [t.clone() for t in self.v]
        return twin
