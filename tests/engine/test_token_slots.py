"""`token_slots`: where a sequence's tokens live in the paged pool, run or gathered."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from ladle.engine.paged_cache import SequenceSlots, token_slots


@st.composite
def sequences(draw: st.DrawFn) -> tuple[list[int], int, int]:
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    num_blocks = draw(st.integers(1, 12))
    table = draw(st.permutations(range(40)))[:num_blocks]
    return table, block_size, draw(st.integers(1, num_blocks * block_size))


@given(sequences())
def test_token_slots_follow_the_block_table(case: tuple[list[int], int, int]) -> None:
    table, size, end = case
    expected = [table[p // size] * size + p % size for p in range(end)]
    gathered = token_slots(table, False, size, end)
    assert isinstance(gathered, torch.Tensor) and gathered.tolist() == expected


def test_a_run_of_blocks_gives_a_slice_and_read_slots_wait_for_their_first_use() -> None:
    assert token_slots([5, 6, 7], True, 4, 9) == slice(20, 29)
    slots = SequenceSlots(slice(0, 2), 3, [5, 2], False, 4)
    assert slots._read is None  # the native kernels never ask
    assert slots.read.tolist() == [20, 21, 22, 23, 8]
