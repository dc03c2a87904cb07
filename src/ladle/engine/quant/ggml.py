"""GGML-typed tensors as they sit in a GGUF file, kept as raw blocks until a layer decides.

A `GGMLTensor` is a weight whose rows are still GGML blocks. Linear layers look at its type:
the int4 kernels take Q4_0 / Q4_1 / Q4_K blocks without re-quantizing (see `int4.py`); every
other type is dequantized once, with the `gguf` package's reference decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ladle.errors import UnsupportedTensorTypeError

# Types every GGUF model ladle loads may carry (issue: "every common tensor type").
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in (
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    )
)  # fmt: skip


@dataclass(slots=True)
class GGMLTensor:
    """A 2-D (or 1-D) weight stored as GGML blocks, one row of blocks per output row.

    `data` is a `uint8` array `[rows, bytes_per_row]`; `shape` is the logical torch shape
    (`[out_features, in_features]` for a linear weight).
    """

    name: str
    ggml_type: GGMLQuantizationType
    data: np.ndarray
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedTensorTypeError(
                self.name, f"tensor type {self.ggml_type.name} is not supported"
            )

    @property
    def is_quantized(self) -> bool:
        return self.ggml_type not in (
            GGMLQuantizationType.F32,
            GGMLQuantizationType.F16,
            GGMLQuantizationType.BF16,
        )

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode every block to a dense tensor of the logical shape."""
        if self.ggml_type == GGMLQuantizationType.BF16:
            raw = np.ascontiguousarray(self.data).view(np.int16)
            dense = torch.from_numpy(raw.copy()).view(torch.bfloat16)
            return dense.reshape(self.shape).to(dtype)
        values = dequantize(np.ascontiguousarray(self.data), self.ggml_type)
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape).to(dtype)

    def permute_rows(self, index: torch.Tensor | np.ndarray) -> GGMLTensor:
        """Reorder output rows; blocks never straddle rows, so this is exact on raw bytes."""
        rows = self.data.reshape(self.shape[0], -1)[np.asarray(index)]
        return GGMLTensor(self.name, self.ggml_type, rows, self.shape)

    @staticmethod
    def concat_rows(parts: list[GGMLTensor], name: str) -> GGMLTensor:
        """Stack weights of one type along the output dimension (fused q/k/v, gate/up)."""
        first = parts[0]
        assert all(p.ggml_type == first.ggml_type and p.shape[1:] == first.shape[1:] for p in parts)
        data = np.concatenate([p.data.reshape(p.shape[0], -1) for p in parts], axis=0)
        shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
        return GGMLTensor(name, first.ggml_type, data, shape)
