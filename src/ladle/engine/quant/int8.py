"""8-bit weights on torch's `_weight_int8pack_mm`: int8 rows, one scale each, bf16 activations.

GGML's Q8_0 has one scale per 32 weights; torch's int8 CPU kernels take one per output row,
so the Q8_0 values are re-rounded to a per-row int8 grid (measured on random 1536x576 weights:
the output differs from the exact Q8_0 matmul by 0.8% relative; a bf16 matmul of the same
values by 0.3%). fbgemm's dynamic int8 linear is faster still (`layers/linear.py`), but it
also rounds the activations to uint8 with one scale per call: on the tiny Llama GGUF of
`tests/engine/models/test_llama.py` (Q8_0 v_proj) that moved logits by 0.057 against
transformers, past the test's 0.05 bound, which this kernel stays within; so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Int8Weight:
    q: torch.Tensor  # int8 [out_features, in_features]
    scales: torch.Tensor  # bf16 [out_features]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x2, self.q, self.scales)
        return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])


def pack_int8(weight: torch.Tensor) -> Int8Weight:
    """Round `[out, in]` to int8 with one symmetric scale per row (the scale rounded to bf16)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).to(torch.bfloat16)
    q = (w / scales.float()[:, None]).round().clamp(-128, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales)
