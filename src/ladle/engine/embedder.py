"""Token id lists in, one pooled vector per list out: an encoder or a decoder, then pooling.

Inputs are sorted by length and cut into batches of at most `max_num_seqs` rows, so each
padded batch wastes little (sentence-transformers sorts the same way). An encoder runs each
batch in one forward with a padding mask. A decoder embedder (Qwen3-Embedding) runs each input
through the causal model's layers and final norm, one input per forward: the chat engine's
causal attention works on one sequence and its cache, and the head is never used.
"""

from __future__ import annotations

import torch

from ladle.engine.models.base import CausalLM
from ladle.engine.models.bert import BertModel
from ladle.engine.pooling import Pooling

MAX_BATCH_TOKENS = 16384  # padded tokens per encoder forward: bounds activation memory


class Embedder:
    """A loaded embedding model. `embed` runs on the thread that loaded it."""

    def __init__(
        self,
        model: BertModel | CausalLM,
        pooling: Pooling,
        dtype: torch.dtype,
        max_num_seqs: int,
    ) -> None:
        self.model = model
        self.pooling = pooling
        self.dtype = dtype
        self.max_num_seqs = max_num_seqs

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def embed(self, inputs: list[list[int]]) -> torch.Tensor:  # [len(inputs), dim] float32
        out = torch.empty(len(inputs), self.dim)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]), reverse=True)
        start = 0
        while start < len(order):
            longest = len(inputs[order[start]])
            rows = max(1, min(self.max_num_seqs, MAX_BATCH_TOKENS // longest))
            batch = order[start : start + rows]
            out[batch] = self._embed_batch([inputs[i] for i in batch])
            start += rows
        return out

    def _embed_batch(self, batch: list[list[int]]) -> torch.Tensor:
        lengths = torch.tensor([len(ids) for ids in batch])
        input_ids = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
        mask = torch.arange(input_ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return self.pooling(self._hidden(input_ids, mask, lengths), mask)

    def _hidden(
        self, input_ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:  # [B, T, dim]
        model = self.model
        if isinstance(model, BertModel):
            return model(input_ids, mask)
        hidden = torch.zeros(*input_ids.shape, self.dim, dtype=self.dtype)
        for row, length in enumerate(lengths.tolist()):
            hidden[row, :length] = model.hidden_states(input_ids[row, :length], self.dtype)
        return hidden
