"""The linear layer every architecture uses, in the fastest form its weight allows.

A `Linear` is built empty and filled by `load_weight`, which first quantizes the weight when
the layer has an ISQ spec (`quant/isq.py`); the weight's format picks the kernel, and the
forward is one kernel call:
- Q4_0 / Q4_1 / Q4_K (GGML, group 32) and HQQ4 (group 64): ladle's int4 kernel (int16
  activations, VNNI) when the native kernels load, else torch's CPU int4 kernel; the weight
  is never re-quantized (`quant/int4.py`).
- Q8_0: ladle's int8 kernel on the file's values when the native kernels load, else torch's
  `_weight_int8pack_mm` (`quant/int8.py`; per-row scales, so re-rounded).
- F16 / BF16 GGML weights: kept in that dtype, the activations cast to it.
- Q5_K, Q6_K, HQQ8, other GGML types and safetensors tensors: decoded once to the compute
  dtype (or the layer's `storage_dtype`). No torch CPU kernel takes 5- or 6-bit values or
  HQQ8's float zero points per group of 64; fp32 beats bf16 at one row.
Measured (`benchmarks/bench_isq_kernels.py`, 2 shared AVX-512 cores, best of 30, µs for
576x576 / 1536x576 / 576x1536, 1 row | 16 rows):
    fp32 F.linear          27 / 69 / 57     | 116 / 269 / 312
    bf16 F.linear          -  / 87 / 87     | 113 / 212 / 172
    fp16 F.linear          29 / 57 / 52     | 411 / 1010 / 882
    bf16 upcast to fp32    328 / 742 / 852  | 592 / 1164 / 1160   (per call: never)
    int8 fbgemm dynamic    19 / 23 / 23     | 59 / 68 / 73
    int8 _weight_int8pack  19 / 34 / 32     | 92 / 204 / 195
    int4 group 32 / 64     21 / 35 / 37     | 96 / 186 / 193
fbgemm is the fastest 8-bit kernel but quantizes activations to uint8, which costs accuracy
(`quant/int8.py`); `_weight_int8pack_mm` keeps bf16 activations and still beats fp32. 4-bit
goes to the int4 kernel, BF16 stays bf16; F16 stays fp16 for its memory although fp16
prefill is slow on this CPU (use BF16 for speed).

While `calibration` is set, every forward adds its inputs' squared values per input channel
(the importance matrix of `quant/calibration.py`); otherwise it costs one `is None` check.

A compiled step (`step_compiler.py`) bakes in which kernel each layer calls, without guards
on the layers: every change of a layer's weight or calibration bumps `weights_generation()`,
and the compiled step (and a decoder layer's gathered `kernel_weights`) is retired when it
moves. With `use_kernels` (set at load once the native kernels load), an fp16 weight meets
fp32 activations in `half_linear`, which widens the weight in registers and rounds nothing to
fp16. SmolLM2's head, against fp16
`F.linear`: 1 row 1.5-2.3 ms vs 1.8-2.3; 16 rows 7.5 vs 24.8; 512 rows 240 vs 772.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from ladle.engine.kernels import native
from ladle.engine.quant.calibration import ActivationStats
from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.hqq import HQQWeight
from ladle.engine.quant.int4 import (
    Int4Weight,
    NativeInt4Weight,
    can_pack_int4,
    fits_int4_kernel,
    pack_affine4,
    pack_int4,
)
from ladle.engine.quant.int8 import (
    Int8Weight,
    NativeInt8Weight,
    can_pack_native8,
    pack_int8,
    pack_native8,
)
from ladle.engine.quant.isq import LayerIsq
from ladle.errors import ModelLoadError

LinearWeight = torch.Tensor | GGMLTensor | HQQWeight
_generation = 0


def weights_generation() -> int:
    """A number that changes whenever any `Linear` changes its weight or calibration."""
    return _generation


def _bump_generation() -> None:
    global _generation
    _generation += 1


_KEPT_DTYPES = {
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


class Linear(nn.Module):
    """`y = x W^T + b` with W dense, int4- or int8-packed; the forward is one kernel call."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.storage_dtype = storage_dtype  # a dense weight kept in this dtype, not the compute one
        self.weight: torch.Tensor | None = None
        self.int4: Int4Weight | NativeInt4Weight | None = None
        self.int8: Int8Weight | NativeInt8Weight | None = None
        self.bias: torch.Tensor | None = None
        self.has_bias = bias
        self._calibration: ActivationStats | None = None
        self.use_kernels = False
        self.isq: LayerIsq | None = None  # set before loading: quantize the weight as it comes

    def load_weight(
        self,
        weight: LinearWeight,
        dtype: torch.dtype,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Take ownership of `weight` ([out_features, in_features]) in its fastest form."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            name = weight.name if isinstance(weight, GGMLTensor) else "weight"
            raise ModelLoadError(
                name,
                f"shape {tuple(weight.shape)} does not match the layer's "
                f"{(self.out_features, self.in_features)}",
            )
        if self.isq is not None:
            weight = self.isq.quantize(weight, getattr(weight, "name", "weight"))
        _bump_generation()
        self.weight, self.int4, self.int8 = None, None, None
        if isinstance(weight, GGMLTensor) and can_pack_int4(weight):
            self.int4 = pack_int4(weight)
        elif isinstance(weight, HQQWeight) and weight.bits == 4 and self._fits_int4():
            scale_k = weight.scale
            zero_k = (8.0 - weight.zero) * weight.scale  # (q - z) s == (q - 8) s + (8 - z) s
            self.int4 = pack_affine4(weight.q, scale_k, zero_k, weight.group_size)
        elif self._dense_only():
            self._load_dense(weight, dtype)
        elif isinstance(weight, GGMLTensor) and can_pack_native8(weight) and native.load():
            self.int8 = pack_native8(weight)
        elif isinstance(weight, GGMLTensor) and weight.ggml_type == GGMLQuantizationType.Q8_0:
            self.int8 = pack_int8(weight.dequantize())
        elif isinstance(weight, GGMLTensor) and weight.ggml_type in _KEPT_DTYPES:
            kept = weight.dequantize(_KEPT_DTYPES[weight.ggml_type])
            self.weight = nn.Parameter(kept.contiguous(), requires_grad=False)
        else:
            self._load_dense(weight, dtype)
        if bias is not None:
            self.bias = nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)

    @property
    def calibration(self) -> ActivationStats | None:
        return self._calibration

    @calibration.setter
    def calibration(self, stats: ActivationStats | None) -> None:
        _bump_generation()
        self._calibration = stats

    def _fits_int4(self) -> bool:
        return fits_int4_kernel(self.out_features) and not self._dense_only()

    def _dense_only(self) -> bool:
        """A layer given a storage dtype (the output head) keeps that precision."""
        return self.storage_dtype is not None

    def _load_dense(self, weight: LinearWeight, dtype: torch.dtype) -> None:
        target = self.storage_dtype or dtype
        dense = weight if isinstance(weight, torch.Tensor) else weight.dequantize(target)
        self.weight = nn.Parameter(dense.to(target).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calibration is not None:
            self._calibration.observe(x)
        if self.int4 is not None:
            y = self.int4.matmul(x)
        elif self.int8 is not None:
            y = self.int8.matmul(x)
        else:
            w = self.weight
            assert w is not None, "Linear used before load_weight"
            if w.dtype == x.dtype:
                return F.linear(x, w, self.bias)
            if self.use_kernels and w.dtype == torch.float16 and x.dtype == torch.float32:
                rows = x.reshape(-1, x.shape[-1]).contiguous()  # an encoder's [B, T, K] too
                y = torch.ops.ladle_kernels.half_linear(rows, w).view(*x.shape[:-1], -1)
            else:
                y = F.linear(x.to(w.dtype), w).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def kernel_weights(self) -> list[torch.Tensor] | None:
        """The weight as the native fused layer ops take it (`kernels/decoder_layer.cpp`):
        [q, scales] for a native int4 or int8 form, [w] for float16 or float32; None for what
        they cannot run (torch's int4 and int8 forms, bfloat16) or while calibrating (the
        activations must pass through `forward` to be observed)."""
        if self._calibration is not None:
            return None
        if isinstance(self.int4, NativeInt4Weight):
            return [self.int4.q, self.int4.scales]
        if isinstance(self.int8, NativeInt8Weight):
            return [self.int8.q, self.int8.scales]
        w = self.weight
        if self.int4 is None and self.int8 is None and w is not None:
            return [w] if w.dtype in (torch.float16, torch.float32) else None
        return None

    def take_weights(self, other: Linear) -> None:
        """Adopt `other`'s weight in whatever form it holds (a re-quantized copy of this one)."""
        _bump_generation()
        self.weight, self.int4, self.int8 = other.weight, other.int4, other.int8
        self.bias, self.isq = other.bias, other.isq

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        """The resident weight as fp32 `[out, in]`, whatever its form (for re-quantizing).

        Packed forms are read back through their own kernel on an identity matrix, so what
        comes out is what the forward multiplies by (activations of 0 and 1 are exact in the
        kernels' int8, int16 and bf16); a slice of rows at a time keeps the temporary small.
        """
        if self.weight is not None:
            return self.weight.detach().float()
        packed = self.int4 if self.int4 is not None else self.int8
        assert packed is not None, "Linear used before load_weight"
        rows = []
        step = 512
        for start in range(0, self.in_features, step):
            eye = torch.eye(self.in_features)[start : start + step]
            rows.append(packed.matmul(eye).float())  # [step, out] = rows of W^T
        return torch.cat(rows, dim=0).T.contiguous()

    def extra_repr(self) -> str:
        if self.int4 is not None:
            kind = f"int4 group {self.int4.group_size}"
        elif self.int8 is not None:
            kind = "int8"
        else:
            kind = f"dense {self.weight.dtype if self.weight is not None else ''}".strip()
        return f"in={self.in_features}, out={self.out_features}, {kind}, bias={self.has_bias}"
