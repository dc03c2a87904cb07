"""Prefill attention (`native.paged_prefill_attention`) against a float64 reference.

It is also checked row for row against decoding.

The kernel sums in float32, in an order of its own, what the reference sums in float64:
outputs are weighted means of unit-normal values, and the softmax weights of a few hundred
positions carry float32 rounding of about 1e-7 each, so the two agree within 1e-5. Float16
pools are compared with the same float16 values widened to float64: the kernel widens them
exactly, so the tolerance stays 1e-5.

The point of the kernel is that a row's bits depend on nothing but the row: the same position
computed in a whole prompt, a chunk of it, the tail after a cached prefix, a batch of several
sequences, on one thread or two, and decoded alone by `native.paged_decode_attention` (or by
`native.decode_attention`, the single-sequence cache's kernel) must give `torch.equal` outputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from ladle.engine.kernels import native

if not native.load():
    pytest.skip(
        "native kernels unavailable (no g++, a failed build, or LADLE_NATIVE_KERNELS=0)",
        allow_module_level=True,
    )

CACHED_DTYPES = [torch.float32, torch.float16]
BLOCK_SIZE = 16


class Pools:
    """Random pools of `num_blocks` blocks, and sequences placed in scattered blocks."""

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        num_blocks: int = 96,
        v_head_dim: int | None = None,
    ) -> None:
        self.k = torch.randn(num_kv_heads, num_blocks * BLOCK_SIZE, head_dim).to(dtype)
        self.v = torch.randn(num_kv_heads, num_blocks * BLOCK_SIZE, v_head_dim or head_dim)
        self.v = self.v.to(dtype)
        self.free = torch.randperm(num_blocks).tolist()  # not ascending: every table scattered

    def table(self, length: int) -> list[int]:
        needed = -(-length // BLOCK_SIZE)
        blocks, self.free = self.free[:needed], self.free[needed:]
        return blocks

    def slots(self, table: list[int], length: int) -> list[int]:
        return [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(length)]


def prefill(
    q: torch.Tensor,
    pools: Pools,
    tables: list[list[int]],
    lengths: list[int],
    query_lens: list[int],
    scale: float = 0.125,
) -> torch.Tensor:
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return native.paged_prefill_attention(
        q,
        pools.k,
        pools.v,
        padded,
        torch.tensor(lengths),
        torch.tensor(query_lens),
        BLOCK_SIZE,
        scale,
    )


def reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal softmax attention in float64: q [T, H, D] are the last T positions of keys and
    values [KVH, L, D] -> [T, H * Dv]."""
    num_tokens, num_heads, _ = q.shape
    group, length = num_heads // keys.shape[0], keys.shape[1]
    keys = keys.double().repeat_interleave(group, 0)
    values = values.double().repeat_interleave(group, 0)
    scores = q.double().transpose(0, 1) @ keys.transpose(1, 2) * scale  # [H, T, L]
    positions = torch.arange(length - num_tokens, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None] > positions, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values  # [H, T, Dv]
    return out.transpose(0, 1).reshape(num_tokens, -1).float()


@pytest.mark.parametrize("dtype", CACHED_DTYPES)
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "sequences"),
    [
        # SmolLM2's heads: a prompt, a tail after a cached prefix, a decoded token, one call
        (9, 3, 64, [(0, 300), (480, 118), (7, 1)]),
        (14, 2, 64, [(0, 130)]),  # 7 query heads per kv head: two rows fill 14 lanes
        (4, 4, 40, [(100, 50)]),  # one head per kv head; rows ending in a partial vector
        (2, 1, 17, [(3, 40)]),  # a head dim that is no multiple of the vector width
        (18, 1, 32, [(200, 9)]),  # more query heads per kv head than a vector has lanes
    ],
)
def test_prefill_attention_matches_a_float64_reference(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sequences: list[tuple[int, int]],
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    pools = Pools(num_kv_heads, head_dim, dtype)
    lengths = [start + rows for start, rows in sequences]
    tables = [pools.table(length) for length in lengths]
    q = torch.randn(sum(rows for _, rows in sequences), num_heads, head_dim)
    scale = head_dim**-0.5
    out = prefill(q, pools, tables, lengths, [rows for _, rows in sequences], scale)
    assert out.shape == (q.shape[0], num_heads * head_dim) and out.dtype == torch.float32
    first = 0
    for table, length, (_, rows) in zip(tables, lengths, sequences, strict=True):
        slots = pools.slots(table, length)
        expected = reference(q[first : first + rows], pools.k[:, slots], pools.v[:, slots], scale)
        torch.testing.assert_close(out[first : first + rows], expected, rtol=0, atol=1e-5)
        first += rows


def test_values_may_have_their_own_head_dim() -> None:
    torch.manual_seed(0)
    pools = Pools(2, 32, torch.float16, v_head_dim=48)
    table = pools.table(70)
    q = torch.randn(30, 4, 32)
    out = prefill(q, pools, [table], [70], [30])
    slots = pools.slots(table, 70)
    expected = reference(q, pools.k[:, slots], pools.v[:, slots], 0.125)
    assert out.shape == (30, 4 * 48)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", CACHED_DTYPES)
def test_a_row_gives_the_same_bits_in_any_prefill_and_decoded_alone(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    length, num_heads = 300, 9
    pools = Pools(3, 64, dtype)
    table = pools.table(length)
    q = torch.randn(length, num_heads, 64) * 3  # peaked softmaxes, and some flat ones
    whole = prefill(q, pools, [table], [length], [length])
    tail = prefill(q[250:], pools, [table], [length], [50])  # after a cached prefix
    chunk = prefill(q[120:140], pools, [table], [140], [20])  # a chunk of a long prompt
    assert torch.equal(tail, whole[250:]) and torch.equal(chunk, whole[120:140])

    other = pools.table(200)  # one call for a batch: another sequence's rows come first
    batch = torch.cat([torch.randn(40, num_heads, 64), q[250:]])
    together = prefill(batch, pools, [other, table], [200, length], [40, 50])
    assert torch.equal(together[40:], whole[250:])

    slots = pools.slots(table, length)
    for p in (0, 1, 127, 128, 129, 200, 255, 256, 299):  # either side of span boundaries
        # decoding position p writes its own k, v again: the pools' values, so unchanged
        k, v = pools.k[:, slots[p]].float()[None], pools.v[:, slots[p]].float()[None]
        decoded = native.paged_decode_attention(
            q[p : p + 1],
            k,
            v,
            pools.k,
            pools.v,
            torch.tensor([table], dtype=torch.int32),
            torch.tensor([p + 1]),
            BLOCK_SIZE,
            0.125,
        )
        assert torch.equal(decoded.view(-1), whole[p]), p
        keys, values = pools.k[:, slots[: p + 1]], pools.v[:, slots[: p + 1]]
        contiguous = native.decode_attention(q[p], keys, values, 0.125)  # a `KVCache`'s kernel
        assert torch.equal(contiguous.view(-1), whole[p]), p


@pytest.mark.parametrize("dtype", CACHED_DTYPES)
def test_prefill_attention_does_not_depend_on_the_thread_count(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    pools = Pools(3, 64, dtype)
    tables = [pools.table(600), pools.table(130)]
    q = torch.randn(150, 9, 64)
    try:
        native.set_num_threads(1)
        serial = prefill(q, pools, tables, [600, 130], [120, 30])
        native.set_num_threads(2)
        parallel = prefill(q, pools, tables, [600, 130], [120, 30])
    finally:
        native.set_num_threads(torch.get_num_threads())
    assert torch.equal(serial, parallel)


def _call(
    q: torch.Tensor | None = None,
    pools: torch.dtype | tuple[torch.dtype, torch.dtype] = torch.float32,
    tables: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    query_lens: torch.Tensor | None = None,
) -> object:
    """A valid call (3 rows of 2 heads ending at position 5, a 2-block table, pools of 2 kv
    heads in 4 blocks of 4) but for one argument."""
    k_dtype, v_dtype = pools if isinstance(pools, tuple) else (pools, pools)
    pool_k, pool_v = torch.zeros(2, 16, 8, dtype=k_dtype), torch.zeros(2, 16, 8, dtype=v_dtype)
    return native.paged_prefill_attention(
        torch.randn(3, 2, 8) if q is None else q,
        pool_k,
        pool_v,
        torch.tensor([[2, 0]], dtype=torch.int32) if tables is None else tables,
        torch.tensor([6]) if lengths is None else lengths,
        torch.tensor([3]) if query_lens is None else query_lens,
        4,
        1.0,
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: _call(q=torch.randn(3, 2, 8).double()), "q must be float32 [N, H, D]"),
        (lambda: _call(q=torch.randn(3, 16)), "q must be float32 [N, H, D]"),
        (lambda: _call(q=torch.randn(3, 3, 8)), "q's 3 heads are not a multiple of the pools' 2"),
        (lambda: _call(q=torch.randn(3, 2, 4)), "q has head dim 4, pool_k 8"),
        (lambda: _call(pools=torch.bfloat16), "pool_k must be float32 or float16"),
        (lambda: _call(pools=(torch.float16, torch.float32)), "must have one dtype"),
        (lambda: _call(tables=torch.tensor([[2, 0]])), "block_tables must be int32"),
        (lambda: _call(tables=torch.tensor([[2, 9]], dtype=torch.int32)), "block_tables[0][1]"),
        (lambda: _call(lengths=torch.tensor([9])), "lengths[0] = 9 exceeds"),
        (lambda: _call(lengths=torch.tensor([6, 6])), "block_tables has 1 rows for 2 sequences"),
        (lambda: _call(query_lens=torch.tensor([3], dtype=torch.int32)), "query_lens must be"),
        (lambda: _call(query_lens=torch.tensor([7])), "query_lens[0] = 7 must be in 1 .."),
        (lambda: _call(query_lens=torch.tensor([2])), "query_lens sum to 2 rows, q has 3"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
