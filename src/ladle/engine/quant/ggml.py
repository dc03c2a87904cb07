"""GGML-typed tensors as they sit in a GGUF file, kept as raw blocks until a layer decides.

A `GGMLTensor` is a weight whose rows are still GGML blocks. Linear layers look at its type:
the int4 kernels take Q4_0 / Q4_1 / Q4_K blocks without re-quantizing (see `int4.py`), the
int8 kernels Q8_0, Q5_0, Q5_1, Q5_K and Q6_K (`int8.py`, `ggml_blocks.py`); Q2_K and Q3_K
are dequantized once. F32 / F16 / BF16 are reinterpreted in torch; quantized blocks
go through the `gguf` package's numpy decoder, which is fast enough for a model load
(SmolLM2's 49152x576 Q8_0 embedding decodes in about 0.35 s on 2 cores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ladle.errors import ModelLoadError, UnsupportedTensorTypeError

# Types every GGUF model ladle loads may carry (issue: "every common tensor type").
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in (
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    )
)  # fmt: skip

# Unquantized types decode by reinterpreting their bytes, with no fp32 detour for 16-bit ones.
_DENSE_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


_DEQUANT_ROWS = 4096


@dataclass(slots=True)
class GGMLTensor:
    """A 2-D (or 1-D) weight stored as GGML blocks, one row of blocks per output row.

    `data` is a `uint8` array `[rows, bytes_per_row]`; `shape` is the logical torch shape
    (`[out_features, in_features]` for a linear weight). Blocks never straddle rows.
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
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        expected = math.prod(self.shape) // block_size * type_size
        if self.shape[-1] % block_size or self.data.nbytes != expected:
            raise ModelLoadError(
                self.name,
                f"{self.data.nbytes} bytes do not hold a {self.ggml_type.name} tensor "
                f"of shape {self.shape}",
            )

    @property
    def is_quantized(self) -> bool:
        return self.ggml_type not in _DENSE_DTYPES

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode every block to a new dense tensor of the logical shape."""
        storage = _DENSE_DTYPES.get(self.ggml_type)
        if storage is not None:
            raw = np.array(self.data).reshape(-1).view(np.uint8)  # a copy: file maps are read-only
            return torch.from_numpy(raw).view(storage).reshape(self.shape).to(dtype)
        row_bytes = self.data.nbytes // math.prod(self.shape[:-1])  # gguf works on whole rows
        rows = np.ascontiguousarray(self.data).reshape(-1).view(np.uint8).reshape(-1, row_bytes)
        out = torch.empty(rows.shape[0], self.shape[-1], dtype=dtype)
        # in slices, so the float32 temporary stays small beside a half-precision result
        for start in range(0, rows.shape[0], _DEQUANT_ROWS):
            values = dequantize(rows[start : start + _DEQUANT_ROWS], self.ggml_type)
            out[start : start + len(values)] = torch.from_numpy(values)
        return out.reshape(self.shape)

    def permute_rows(self, index: torch.Tensor | np.ndarray) -> GGMLTensor:
        """Reorder output rows; blocks never straddle rows, so this is exact on raw bytes."""
        rows = self.data.reshape(self.shape[0], -1)[np.asarray(index)]
        return GGMLTensor(self.name, self.ggml_type, rows, self.shape)

    @staticmethod
    def concat_rows(parts: list[GGMLTensor], name: str) -> GGMLTensor:
        """Stack weights of one type along the output dimension (fused q/k/v, gate/up).

        Mixed files (Q4_K_M stores attn_v as Q6_K beside Q4_K q/k) cannot be fused on raw
        bytes: the caller checks `ggml_type` first and stacks them (`GGMLStack`) instead.
        """
        first = parts[0]
        for p in parts[1:]:
            if p.ggml_type != first.ggml_type or p.shape[1:] != first.shape[1:]:
                raise ModelLoadError(
                    name,
                    f"cannot fuse {first.name} ({first.ggml_type.name} {first.shape}) "
                    f"with {p.name} ({p.ggml_type.name} {p.shape})",
                )
        data = np.concatenate([p.data.reshape(p.shape[0], -1) for p in parts], axis=0)
        shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
        return GGMLTensor(name, first.ggml_type, data, shape)


@dataclass(slots=True)
class GGMLStack:
    """Weights of different GGML types fused along the output rows, each kept in its blocks.

    Q4_K_M files store a layer's attn_v in Q6_K beside q and k in Q4_K (and Q5_0 beside
    Q4_0 in Q4_0 files): a fused projection of them runs each part on the kernel for its own
    type (`Linear`), where fusing on raw bytes is impossible and a dense copy costs 4 bytes
    a weight.
    """

    name: str
    parts: list[GGMLTensor]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts], dim=0)
