"""KV blocks: which sequence holds which, which hold a known prefix, and which to use next.

The paged cache has `num_blocks` blocks of `block_size` token slots; a sequence's
`block_table` lists its blocks in order. Once a block is full and computed it gets a hash
chained over every token up to its end, so a later request whose tokens start the same way
takes the block instead of recomputing it (prefix caching; the tokens are compared too, so a
hash collision cannot mix two prompts). Blocks are reference-counted: a block nobody holds
but that has a hash stays cached, and the least recently released one is evicted first when
a block is needed.

Where attention runs in torch (models the native kernels do not run), a sequence whose blocks
form one ascending run reads its keys as a view of the pool, while scattered blocks must be
gathered first (as slow as the attention itself, measured; the kernels read through the block
tables either way), so placement keeps runs whole: a new sequence starts in the middle of the
largest stretch of empty blocks (or right after its cached prefix, when that block is empty),
and a growing one takes the block after its last when it is empty. Placement never evicts: a
cached block is reused only when no block is empty, the least recently released first.

Every mutation has a question before it (`can_allocate` / `allocate`, `can_append` /
`append`): nothing is ever half-allocated.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol


class BlockOwner(Protocol):
    """What the block manager reads and writes on a sequence."""

    token_ids: list[int]
    block_table: list[int]
    contiguous: bool  # whether block_table is one ascending run
    num_computed_tokens: int
    num_cached_tokens: int  # of the computed tokens, how many came from the prefix cache
    num_hashed_blocks: int  # leading blocks whose hash is registered


@dataclass(slots=True)
class Block:
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default=())


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained over the blocks before: equal hashes mean equal prefixes (tokens checked too)."""
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks = [Block() for _ in range(num_blocks)]
        self.empty: set[int] = set(range(num_blocks))  # free, no hash
        self.cached: OrderedDict[int, None] = OrderedDict()  # free with a hash, oldest first
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.empty) + len(self.cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- admission

    def cached_prefix(self, seq: BlockOwner) -> list[int]:
        """Blocks holding the longest cached prefix of the sequence's tokens.

        The last token is never taken from the cache: computing it gives the logits to
        sample from.
        """
        size, tokens = self.block_size, seq.token_ids
        found: list[int] = []
        parent: int | None = None
        for start in range(0, len(tokens) - 1 - size + 1, size):
            chunk = tuple(tokens[start : start + size])
            parent = block_hash(parent, chunk)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            found.append(block_id)
        return found

    def can_allocate(self, seq: BlockOwner) -> bool:
        prefix = self.cached_prefix(seq)
        reclaimed = sum(1 for b in prefix if self.blocks[b].ref_count == 0)
        needed = self.blocks_for(len(seq.token_ids)) - len(prefix)
        return needed <= self.num_free - reclaimed

    def allocate(self, seq: BlockOwner) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing its cached prefix."""
        assert not seq.block_table, "sequence already holds blocks"
        prefix = self.cached_prefix(seq)
        for block_id in prefix:
            self._hold(block_id)
        seq.block_table = list(prefix)
        seq.contiguous = all(b == prefix[0] + i for i, b in enumerate(prefix))
        seq.num_cached_tokens = seq.num_computed_tokens = len(prefix) * self.block_size
        seq.num_hashed_blocks = len(prefix)
        needed = self.blocks_for(len(seq.token_ids)) - len(prefix)
        follows = prefix[-1] + 1 if prefix else None  # the block that would continue the run
        start = follows if follows in self.empty else self._run_start(needed)
        self._extend(seq, needed, start)

    # ---------------------------------------------------------------- growth

    def can_append(self, seq: BlockOwner, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free

    def append(self, seq: BlockOwner, num_tokens: int) -> None:
        """Grow the sequence's table to hold `num_tokens` tokens."""
        self._extend(seq, self.blocks_for(num_tokens) - len(seq.block_table), None)

    def commit(self, seq: BlockOwner) -> None:
        """Register the hashes of the blocks the sequence has filled and computed."""
        size = self.block_size
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // size
        parent = self._hash_of(seq, seq.num_hashed_blocks - 1)
        for i in range(seq.num_hashed_blocks, full):
            chunk = tuple(seq.token_ids[i * size : (i + 1) * size])
            parent = block_hash(parent, chunk)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = parent, chunk
            self.hash_to_block.setdefault(parent, seq.block_table[i])
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free(self, seq: BlockOwner) -> None:
        """Release the sequence's blocks; hashed ones stay cached, the tail evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.hash is None:
                    self.empty.add(block_id)
                else:
                    self.cached[block_id] = None
        seq.block_table = []
        seq.contiguous = True
        seq.num_computed_tokens = seq.num_cached_tokens = seq.num_hashed_blocks = 0

    # ---------------------------------------------------------------- internals

    def _hash_of(self, seq: BlockOwner, index: int) -> int | None:
        return None if index < 0 else self.blocks[seq.block_table[index]].hash

    def _extend(self, seq: BlockOwner, count: int, start: int | None) -> None:
        """Add `count` blocks: the first at `start` if given, each next one after the last."""
        for i in range(count):
            table = seq.block_table
            wanted = start if i == 0 and start is not None else table[-1] + 1 if table else None
            block_id = self._take(wanted)
            seq.contiguous = seq.contiguous and (not table or block_id == table[-1] + 1)
            table.append(block_id)

    def _take(self, wanted: int | None) -> int:
        """A free block: `wanted` if empty, else an empty one, else the oldest cached one.

        A cached `wanted` block is not taken while others are empty: it holds some other
        request's prefix (another chat behind the same system prompt), which only the least
        recently released cached block should lose.
        """
        if wanted is not None and wanted in self.empty:
            block_id = wanted
        elif self.empty:
            block_id = min(self.empty)
        else:
            block_id = next(iter(self.cached))
        self._hold(block_id)
        block = self.blocks[block_id]
        if block.hash is not None:  # a cached block reused for new tokens: evicted
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        return block_id

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.empty.discard(block_id)
            self.cached.pop(block_id, None)
        block.ref_count += 1

    def _run_start(self, needed: int) -> int | None:
        """Where a new sequence of `needed` blocks should start: mid-way in the largest
        stretch of empty blocks, leaving room for its left neighbour to grow too."""
        best_start, best_len, run_start = None, 0, None
        for i in range(self.num_blocks + 1):
            is_empty = i < self.num_blocks and i in self.empty
            if is_empty and run_start is None:
                run_start = i
            elif not is_empty and run_start is not None:
                if i - run_start > best_len:
                    best_start, best_len = run_start, i - run_start
                run_start = None
        if best_start is None:
            return None
        if best_start == 0:  # nothing to the left to leave room for
            return 0
        return best_start + max(0, (best_len - needed) // 2)
