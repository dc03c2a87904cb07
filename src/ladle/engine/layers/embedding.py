"""Token embeddings, and the output head that may share their table.

The head reads its whole `[vocab, hidden]` table every decode step, which makes it the costliest
matmul of a small model (SmolLM2: 49152x576, 10 ms of a 20 ms step in fp32). When the file
stores it quantized (8 bits or fewer per weight), it is kept in float16, which holds those
values to 2^-12: measured 1.8 ms in fp16 against 3.5 ms in bf16 and 9.9 ms in fp32 on a
2-core AVX-512 CPU. Its input is normalized, so fp16's range is no concern. A tied embedding
looks its rows up in the head's table, so the table sits in memory once.

A Q8_0, Q5_0, Q5_1, Q5_K or Q6_K table with the native kernels is better still: the head keeps
the file's integers in the int8 kernel's form (`quant/int8.py`; SmolLM2's Q8_0 table 30 MB
against 56 in fp16, multiplied in 0.5 ms rather than 1.5-2.3 at one row; a Q6_K table keeps
its six bits, 0.875 bytes a weight with its scales), and a tied embedding decodes its rows
from them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ladle.engine.kernels import native
from ladle.engine.layers.linear import Linear
from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.int4 import can_pack_int4
from ladle.engine.quant.int8 import NativeInt8Weight, can_pack_native8
from ladle.errors import ModelLoadError

HEAD_DTYPE = torch.float16


class Embedding(nn.Module):
    """Lookup table `[num_embeddings, embedding_dim]`; rows come out in the compute dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight: torch.Tensor | None = None
        self.table: NativeInt8Weight | None = None  # the tied head's int8 form, when no weight
        self.dtype = torch.float32

    def check_shape(self, weight: torch.Tensor | GGMLTensor) -> None:
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            name = weight.name if isinstance(weight, GGMLTensor) else "weight"
            raise ModelLoadError(
                name,
                f"shape {tuple(weight.shape)} does not match "
                f"{(self.num_embeddings, self.embedding_dim)}",
            )

    def load_weight(self, weight: torch.Tensor | GGMLTensor, dtype: torch.dtype) -> None:
        self.check_shape(weight)
        if isinstance(weight, GGMLTensor):
            # a quantized table is kept in fp16, the precision the head reads it in (see above)
            dense = weight.dequantize(HEAD_DTYPE if weight.is_quantized else dtype)
        else:
            dense = weight.to(dtype)
        self.weight = nn.Parameter(dense.contiguous(), requires_grad=False)
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table.rows(input_ids).to(self.dtype)
        assert self.weight is not None, "Embedding used before load_weight"
        return F.embedding(input_ids, self.weight).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LMHead(Linear):
    """The output projection; a quantized source is stored in float16 (see above)."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size)

    def load_weight(
        self,
        weight: torch.Tensor | GGMLTensor,
        dtype: torch.dtype,
        bias: torch.Tensor | None = None,
    ) -> None:
        if isinstance(weight, GGMLTensor) and weight.is_quantized and not _keeps_int8(weight):
            self.storage_dtype = HEAD_DTYPE
        super().load_weight(weight, dtype, bias)


def _keeps_int8(weight: GGMLTensor) -> bool:
    """Whether a table keeps its integers in the native int8 form (kernels built on first use)."""
    return can_pack_native8(weight) and native.load()


def tie_lm_head(
    lm_head: Linear,
    embedding: Embedding,
    source: torch.Tensor | GGMLTensor,
    dtype: torch.dtype,
) -> None:
    """Load the embedding from `source` and give `lm_head` its table.

    A 4-bit table is packed again for the int4 kernel, which beats reading dense rows; a
    Q8_0 / Q5_0 / Q5_1 / Q5_K / Q6_K one keeps its integers on the native int8 kernel, and the
    embedding reads its rows from them (never decoding the table: 56 MB of float16 on
    SmolLM2); any other table is stored once, in the head's dtype, and the embedding looks
    rows up in it.
    """
    if isinstance(source, GGMLTensor) and _keeps_int8(source):
        embedding.check_shape(source)
        lm_head.load_weight(source, dtype)
        assert isinstance(lm_head.int8, NativeInt8Weight)
        embedding.table, embedding.weight, embedding.dtype = lm_head.int8, None, dtype
        return
    embedding.load_weight(source, dtype)
    if isinstance(source, GGMLTensor) and can_pack_int4(source):
        lm_head.load_weight(source, dtype)
        return
    assert embedding.weight is not None
    if isinstance(source, GGMLTensor) and source.is_quantized:
        lm_head.storage_dtype = HEAD_DTYPE
    lm_head.load_weight(embedding.weight, dtype)
    embedding.weight = lm_head.weight
