"""The scheduler and block manager under thousands of random join / leave / cancel events.

No model runs here: a step is simulated (scheduled tokens become computed, a sequence that
reaches its last token "samples" one more), so the bookkeeping is checked alone. After every
event the block accounting must balance: each block's reference count equals the number of
live block tables holding it, free blocks are exactly those nobody holds, cached hashes point
at blocks that carry them, and a finished or waiting sequence holds nothing.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ladle.engine.block_manager import BlockManager
from ladle.engine.scheduler import Scheduler, SchedulerConfig
from ladle.engine.sequence import SequenceStatus


class FakeSequence:
    """The fields the scheduler and block manager use, without a model or tokenizer."""

    def __init__(self, prompt: list[int], max_tokens: int, parent: FakeSequence | None = None):
        self.token_ids = list(prompt)
        self.prompt_len = len(prompt)
        self.max_tokens = max_tokens
        self.output_ids: list[int] = []
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.contiguous = True
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_hashed_blocks = 0
        self.parent = parent

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_prefilled(self) -> bool:
        return bool(self.output_ids) or self.status is SequenceStatus.FINISHED


def check_invariants(blocks: BlockManager, sched: Scheduler, live: list[FakeSequence]) -> None:
    holders = Counter(b for seq in sched.running for b in seq.block_table)
    for block_id, block in enumerate(blocks.blocks):
        assert block.ref_count == holders[block_id], f"block {block_id} ref count"
        is_free = block.ref_count == 0
        assert (block_id in blocks.empty) == (is_free and block.hash is None)
        assert (block_id in blocks.cached) == (is_free and block.hash is not None)
    for h, block_id in blocks.hash_to_block.items():
        assert blocks.blocks[block_id].hash == h
    for seq in live:
        if seq in sched.running:
            assert len(seq.block_table) >= blocks.blocks_for(seq.num_computed_tokens)
            table = seq.block_table
            is_run = all(b == table[0] + i for i, b in enumerate(table))
            assert seq.contiguous == is_run
            assert seq.num_computed_tokens <= seq.num_tokens
        else:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert len(sched.running) <= sched.config.max_num_seqs


def simulate_step(blocks: BlockManager, sched: Scheduler, rng: random.Random) -> None:
    batch = sched.schedule()
    assert sum(item.num_tokens for item in batch) <= sched.config.max_num_batched_tokens
    assert len({id(item.seq) for item in batch}) == len(batch)
    for item in batch:
        seq = item.seq
        assert seq in sched.running
        assert len(seq.block_table) * blocks.block_size >= seq.num_computed_tokens + item.num_tokens
        completes = item.completes
        seq.num_computed_tokens += item.num_tokens
        blocks.commit(seq)
        if completes:
            seq.token_ids.append(rng.randrange(50))
            seq.output_ids.append(seq.token_ids[-1])
            if len(seq.output_ids) >= seq.max_tokens or rng.random() < 0.05:
                sched.finish(seq)


def run_events(seed: int, num_events: int, num_blocks: int, block_size: int) -> Scheduler:
    rng = random.Random(seed)
    blocks = BlockManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=40), blocks)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 40))] for _ in range(3)]
    live: list[FakeSequence] = []
    capacity = num_blocks * block_size
    for _ in range(num_events):
        event = rng.random()
        if event < 0.25:  # a request joins: often sharing a prefix, sometimes with n = 2
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 30))]
            prompt = prompt[: capacity // 2]
            max_tokens = rng.randrange(1, capacity - len(prompt) + 1)
            first = FakeSequence(prompt, min(max_tokens, 60))
            group = [first]
            if rng.random() < 0.2:
                group.append(FakeSequence(prompt, first.max_tokens, parent=first))
            for seq in group:
                sched.add(seq)  # type: ignore[arg-type]
                live.append(seq)
        elif event < 0.35 and live:  # a client cancels
            sched.finish(rng.choice(live))  # type: ignore[arg-type]
        else:
            simulate_step(blocks, sched, rng)
        live = [s for s in live if s.status is not SequenceStatus.FINISHED]
        check_invariants(blocks, sched, live)
    for seq in live:  # everyone leaves: every block is free again
        sched.finish(seq)  # type: ignore[arg-type]
    check_invariants(blocks, sched, [])
    assert blocks.num_free == num_blocks
    return sched


@pytest.mark.parametrize("seed", range(4))
def test_thousands_of_random_events_leak_no_block(seed: int) -> None:
    # a pool smaller than the load, so preemption happens too
    sched = run_events(seed, num_events=3000, num_blocks=24, block_size=4)
    assert sched.num_preemptions > 0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_blocks=st.integers(8, 64),
    block_size=st.sampled_from([1, 2, 4, 16]),
)
def test_random_pools_and_block_sizes_keep_accounts(
    seed: int, num_blocks: int, block_size: int
) -> None:
    run_events(seed, num_events=150, num_blocks=num_blocks, block_size=block_size)


def test_every_request_finishes_despite_preemption() -> None:
    """Preempted sequences come back and complete; nothing is lost."""
    rng = random.Random(7)
    blocks = BlockManager(num_blocks=10, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), blocks)
    seqs = [FakeSequence([rng.randrange(50) for _ in range(8)], max_tokens=20) for _ in range(6)]
    for seq in seqs:
        sched.add(seq)  # type: ignore[arg-type]
    for _ in range(2000):
        if not sched.has_work():
            break
        batch = sched.schedule()
        assert batch, "work is pending but nothing was scheduled"
        for item in batch:
            completes = item.completes
            item.seq.num_computed_tokens += item.num_tokens
            blocks.commit(item.seq)
            if completes:
                item.seq.token_ids.append(1)
                item.seq.output_ids.append(1)
                if len(item.seq.output_ids) >= item.seq.max_tokens:
                    sched.finish(item.seq)
    assert all(len(s.output_ids) == 20 for s in seqs)
    assert sched.num_preemptions > 0
    assert blocks.num_free == blocks.num_blocks


def test_a_shared_prefix_reuses_blocks() -> None:
    blocks = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(13))
    first = FakeSequence(prompt, 1)
    blocks.allocate(first)  # type: ignore[arg-type]
    first.num_computed_tokens = 13
    blocks.commit(first)  # type: ignore[arg-type]
    second = FakeSequence([*prompt[:12], 99, 98], 1)
    blocks.allocate(second)  # type: ignore[arg-type]
    assert second.num_cached_tokens == 12
    assert second.block_table[:3] == first.block_table[:3]
    assert [blocks.blocks[b].ref_count for b in second.block_table[:3]] == [2, 2, 2]
    blocks.free(first)  # type: ignore[arg-type]
    blocks.free(second)  # type: ignore[arg-type]
    # released but cached: a third request with the prefix still finds it
    third = FakeSequence(prompt, 1)
    blocks.allocate(third)  # type: ignore[arg-type]
    assert third.num_cached_tokens == 12
    # the last token is always computed, even when the whole prompt is cached
    assert third.num_computed_tokens < third.num_tokens


def test_a_colliding_hash_with_other_tokens_is_not_reused() -> None:
    blocks = BlockManager(num_blocks=8, block_size=2)
    first = FakeSequence([1, 2, 3], 1)
    blocks.allocate(first)  # type: ignore[arg-type]
    first.num_computed_tokens = 3
    blocks.commit(first)  # type: ignore[arg-type]
    block = blocks.blocks[first.block_table[0]]
    block.token_ids = (7, 7)  # as if another prompt had hashed the same
    second = FakeSequence([1, 2, 3], 1)
    blocks.allocate(second)  # type: ignore[arg-type]
    assert second.num_cached_tokens == 0


def run_to_end(blocks: BlockManager, seq: FakeSequence) -> None:
    """Allocate, compute and register every block of a prompt, then release it (cached)."""
    blocks.allocate(seq)  # type: ignore[arg-type]
    seq.num_computed_tokens = len(seq.token_ids)
    blocks.commit(seq)  # type: ignore[arg-type]
    blocks.free(seq)  # type: ignore[arg-type]


def test_a_chat_sharing_a_system_prompt_keeps_another_chats_history() -> None:
    """Two conversations behind one system prompt: while empty blocks remain, the second
    must not take the first one's cached history, or the first's next turn recomputes it."""
    blocks = BlockManager(num_blocks=32, block_size=4)
    system = list(range(8))
    chat_a = [*system, *range(100, 112)]
    run_to_end(blocks, FakeSequence(chat_a, 1))
    run_to_end(blocks, FakeSequence([*system, *range(200, 212)], 1))
    next_turn = FakeSequence([*chat_a, 7, *range(120, 125)], 1)
    blocks.allocate(next_turn)  # type: ignore[arg-type]
    assert next_turn.num_cached_tokens == len(chat_a)


def test_cached_blocks_are_evicted_least_recently_released_first() -> None:
    blocks = BlockManager(num_blocks=6, block_size=2)
    old, recent = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    run_to_end(blocks, FakeSequence(old, 1))  # 3 blocks: 2 cached, the partial tail empty
    run_to_end(blocks, FakeSequence(recent, 1))  # the same again
    newcomer = FakeSequence(list(range(11, 17)), 1)  # 3 blocks: 2 empty, 1 evicted
    blocks.allocate(newcomer)  # type: ignore[arg-type]
    blocks.free(newcomer)  # type: ignore[arg-type]
    cached = []
    for prompt in (recent, old):
        again = FakeSequence(prompt, 1)
        blocks.allocate(again)  # type: ignore[arg-type]
        cached.append(again.num_cached_tokens)
        blocks.free(again)  # type: ignore[arg-type]
    assert cached == [4, 2]  # the old prompt lost its tail block, released before its head
