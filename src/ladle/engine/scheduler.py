"""Which sequences run in the next step, and how many of their tokens.

Continuous batching: every step, the running sequences go first, one token each for those
decoding and the next chunk for those still prefilling; new requests then join in arrival
order with what is left of the token budget, so a long prompt is prefilled a chunk at a time
between the decode steps of the others instead of freezing them. When the KV cache has no
block left for a running sequence, the most recently admitted one is preempted: its blocks
are released (their computed prefix stays cached by hash) and it waits at the head of the
queue, to be recomputed, mostly from that cache, when blocks free up. A preempted sequence
keeps its sampler, grammar and output, so its text continues exactly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ladle.engine.block_manager import BlockManager
from ladle.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512  # tokens per step: bounds a step's time and memory


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, from seq.num_computed_tokens on

    @property
    def completes(self) -> bool:
        """Whether this step reaches the sequence's last token (so it samples the next)."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` could ever run (alone, with every block)."""
        return self.blocks.blocks_for(num_tokens) <= self.blocks.num_blocks

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.config.max_num_batched_tokens
        batch: list[ScheduledSequence] = []
        # decoding sequences first: a prefilling one must not take their step
        by_need = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        for seq in by_need:
            if budget == 0:
                break
            if seq not in self.running:  # preempted for an earlier sequence this step
                continue
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + num_tokens):
                continue  # it preempted itself
            batch.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.parent is not None and not seq.parent.is_prefilled:
                skipped.append(self.waiting.popleft())  # its prompt's blocks are coming
                continue
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            batch.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
        self.waiting.extendleft(reversed(skipped))
        return batch

    def finish(self, seq: Sequence) -> None:
        """Free a sequence that finished, failed or was aborted (waiting or running)."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` of `seq`, preempting from the newest; False if `seq` went."""
        while not self.blocks.can_append(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.append(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
