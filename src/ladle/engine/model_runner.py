"""One step of the model over a scheduled batch: tokens in, one logits row per finished prefix.

The scheduled sequences' new tokens are laid end to end in one flat batch, so every linear
layer reads its weights once for all of them; attention then runs per sequence over its
blocks of the paged cache (`KVBatch`). Only sequences whose last token is in the batch get
a logits row: a prompt chunk in the middle of a prefill needs none.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from ladle.engine.kv_cache import KernelStep
from ladle.engine.models.base import CausalLM
from ladle.engine.paged_cache import KVBatch, PagedKVCache, SequenceSlots
from ladle.engine.scheduler import ScheduledSequence
from ladle.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache) -> None:
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence]) -> dict[Sequence, torch.Tensor]:
        """Compute the batch's tokens into the cache; logits `[vocab]` of completing ones."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sequences: list[SequenceSlots] = []
        last_rows: list[int] = []
        completing: list[Sequence] = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_tokens
            rows = slice(len(ids), len(ids) + item.num_tokens)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table, size = seq.block_table, self.block_size
            # as Python ints, one tensor for the whole batch: a decode step's one slot per
            # sequence cost 16 µs a sequence as tensor arithmetic
            slots.extend(table[p // size] * size + p % size for p in range(start, end))
            sequences.append(SequenceSlots(rows, start, table, seq.contiguous, size))
            if item.completes:
                last_rows.append(rows.stop - 1)
                completing.append(seq)
        write = _as_run(slots)
        kv = KVBatch(self.cache, write, sequences, self._kernel_step(batch, write))
        last = torch.tensor(last_rows, dtype=torch.long)
        logits = self.model(torch.tensor(ids), torch.tensor(positions), kv, last)
        return dict(zip(completing, logits, strict=True))

    def _kernel_step(
        self, batch: list[ScheduledSequence], write: slice | torch.Tensor
    ) -> KernelStep | None:
        """The step as the paged attention kernels read it, when they are on."""
        cache = self.cache
        if not cache.use_kernels:
            return None
        width = max(len(item.seq.block_table) for item in batch)
        rows = [t + [0] * (width - len(t)) for t in (item.seq.block_table for item in batch)]
        query_lens = [item.num_tokens for item in batch]
        lengths = [item.seq.num_computed_tokens + item.num_tokens for item in batch]
        return KernelStep(
            cache.k,
            cache.v,
            torch.tensor(rows, dtype=torch.int32),
            torch.tensor(lengths, dtype=torch.int64),
            torch.tensor(query_lens, dtype=torch.int64),
            torch.arange(write.start, write.stop) if isinstance(write, slice) else write,
            self.block_size,
            all(n == 1 for n in query_lens),
        )


def _as_run(slots: list[int]) -> slice | torch.Tensor:
    """All new tokens' slots, as a slice when they form one run (a slice write is cheaper)."""
    if all(b - a == 1 for a, b in pairwise(slots)):
        return slice(slots[0], slots[0] + len(slots))
    return torch.tensor(slots)
