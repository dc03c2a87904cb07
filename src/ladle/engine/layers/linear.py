"""The linear layer every architecture uses, in the fastest form its weight allows.

A `Linear` is built empty and filled by `load_weight`, which first quantizes the weight when
the layer has an ISQ spec (`quant/isq.py`); the weight's format picks the kernel, and the
forward is one kernel call:
- Q4_0 / Q4_1 / Q4_K (GGML, group 32) and HQQ4 (group 64): ladle's int4 kernel (int16
  activations, integer dot products) when the native kernels load, else torch's CPU int4
  kernel; the weight is never re-quantized (`quant/int4.py`).
- Q8_0, Q5_0, Q5_1, Q5_K, Q6_K: ladle's int8 kernel on the file's integers (groups of 32,
  Q6_K's of 16 and in six bits; `quant/int8.py`) when the native kernels load and the rows
  come in sixteens.
  Otherwise Q8_0 goes to torch's `_weight_int8pack_mm` (per-row scales, so re-rounded) and
  the others are decoded as below.
- F16 / BF16 GGML weights: kept in that dtype, the activations cast to it.
- HQQ8, other GGML types (Q2_K, Q3_K) and safetensors tensors: decoded once to the compute
  dtype (or the layer's `storage_dtype`). No torch CPU kernel takes 5- or 6-bit values or
  HQQ8's float zero points per group of 64; fp32 beats bf16 at one row.
- A fused projection whose parts have different GGML types (`GGMLStack`: Q4_K_M's q and k
  in Q4_K beside v in Q6_K): each part in its own form above, the native kernel running them
  one after the other into their columns; decoded whole when the kernels are off.
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
and the compiled step (and a decoder's gathered `kernel_weight`s) is retired when it moves.
With `use_kernels` (set at load once the native kernels load), a dense weight (float32,
float16 or bfloat16) meets float32 activations in the native dense kernel, which widens the
weight in registers and rounds nothing; the per-layer path and the whole-decoder call
(`native.Decoder`) then run the same kernel on every weight. SmolLM2's fp16 head, against
fp16 `F.linear` (AVX-512): 1 row 1.5-2.3 ms vs 1.8-2.3; 16 rows 7.5 vs 24.8; 512 rows 240 vs
772.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from ladle.engine.kernels import native
from ladle.engine.quant.calibration import ActivationStats
from ladle.engine.quant.ggml import GGMLStack, GGMLTensor
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
    pack_ggml8,
    pack_int8,
)
from ladle.engine.quant.isq import LayerIsq
from ladle.errors import ModelLoadError

LinearWeight = torch.Tensor | GGMLTensor | GGMLStack | HQQWeight
_generation = 0


def weights_generation() -> int:
    """A number that changes whenever any `Linear` changes its weight or calibration."""
    return _generation


def _bump_generation() -> None:
    global _generation
    _generation += 1


_NATIVE_DENSE = (torch.float32, torch.float16, torch.bfloat16)
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
        self._dense_kernel: native.KernelWeight | None = None  # self.weight's, made on first use
        # a GGMLStack's parts, each in its own form (not submodules: ISQ and calibration see
        # this layer as one), and their native weight, stacked on first use
        self._parts: tuple[Linear, ...] = ()
        self._stacked: native.KernelWeight | None = None

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
        self.weight, self.int4, self.int8, self._dense_kernel = None, None, None, None
        self._parts, self._stacked = (), None
        if isinstance(weight, GGMLStack):
            self._load_stack(weight, dtype)
        elif isinstance(weight, GGMLTensor) and can_pack_int4(weight):
            self.int4 = pack_int4(weight)
        elif isinstance(weight, HQQWeight) and weight.bits == 4 and self._fits_int4():
            scale_k = weight.scale
            zero_k = (8.0 - weight.zero) * weight.scale  # (q - z) s == (q - 8) s + (8 - z) s
            self.int4 = pack_affine4(weight.q, scale_k, zero_k, weight.group_size)
        elif self._dense_only():
            self._load_dense(weight, dtype)
        elif isinstance(weight, GGMLTensor) and can_pack_native8(weight) and native.load():
            self.int8 = pack_ggml8(weight)
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

    def _load_stack(self, stack: GGMLStack, dtype: torch.dtype) -> None:
        """Each part in its own native form, or the whole decoded when the kernels are off."""
        if self._dense_only() or not native.load():
            return self._load_dense(stack, dtype)
        parts = []
        for part in stack.parts:
            linear = Linear(self.in_features, part.shape[0])
            linear.load_weight(part, dtype)
            parts.append(linear)
        self._parts = tuple(parts)

    def _load_dense(self, weight: LinearWeight, dtype: torch.dtype) -> None:
        target = self.storage_dtype or dtype
        dense = weight if isinstance(weight, torch.Tensor) else weight.dequantize(target)
        self.weight = nn.Parameter(dense.to(target).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calibration is not None:
            self._calibration.observe(x)
        if self._parts:
            stacked = self._stacked_kernel() if x.dtype == torch.float32 else None
            if stacked is not None:
                y = native.linear(x, stacked)
            else:
                y = torch.cat([part(x) for part in self._parts], dim=-1)
        elif self.int4 is not None:
            y = self.int4.matmul(x)
        elif self.int8 is not None:
            y = self.int8.matmul(x)
        else:
            w = self.weight
            assert w is not None, "Linear used before load_weight"
            kernel = self._dense() if x.dtype == torch.float32 else None
            if kernel is not None:
                y = native.linear(x, kernel)
            elif w.dtype == x.dtype:
                return F.linear(x, w, self.bias)
            else:
                y = F.linear(x.to(w.dtype), w).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _dense(self) -> native.KernelWeight | None:
        """The dense weight for the native kernel, when the kernels are on and take its dtype."""
        w = self.weight
        if not self.use_kernels or w is None or w.dtype not in _NATIVE_DENSE:
            return None
        if self._dense_kernel is None or self._dense_kernel.data[0] is not w:
            self._dense_kernel = native.KernelWeight.of(w)
        return self._dense_kernel

    def kernel_weight(self) -> native.KernelWeight | None:
        """The weight as the native whole-decoder call takes it (`native.Decoder`); None for
        what the kernels cannot run (torch's int4 and int8 forms, kernels off) or while
        calibrating (the activations must pass through `forward` to be observed)."""
        if self._calibration is not None:
            return None
        if self._parts:
            return self._stacked_kernel()
        if isinstance(self.int4, NativeInt4Weight):
            return self.int4.kernel
        if isinstance(self.int8, NativeInt8Weight):
            return self.int8.kernel
        if self.int4 is None and self.int8 is None:
            return self._dense()
        return None

    def _stacked_kernel(self) -> native.KernelWeight | None:
        """The parts' native forms one after the other, None when one has none."""
        if self._stacked is None:
            for part in self._parts:
                part.use_kernels = self.use_kernels  # a dense part's kernel needs the flag
            weights = [part.kernel_weight() for part in self._parts]
            found = [w for w in weights if w is not None]
            if len(found) < len(weights):
                return None
            self._stacked = native.KernelWeight.stacked(found)
        return self._stacked

    def take_weights(self, other: Linear) -> None:
        """Adopt `other`'s weight in whatever form it holds (a re-quantized copy of this one)."""
        _bump_generation()
        self.weight, self.int4, self.int8 = other.weight, other.int4, other.int8
        self.bias, self.isq, self._dense_kernel = other.bias, other.isq, None
        self._parts, self._stacked = other._parts, None

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        """The resident weight as fp32 `[out, in]`, whatever its form (for re-quantizing).

        Packed forms are read back through their own kernel on an identity matrix, so what
        comes out is what the forward multiplies by (activations of 0 and 1 are exact in the
        kernels' int8, int16 and bf16); a slice of rows at a time keeps the temporary small.
        """
        if self.weight is not None:
            return self.weight.detach().float()
        if self._parts:
            return torch.cat([part.dequantized() for part in self._parts], dim=0)
        packed = self.int4 if self.int4 is not None else self.int8
        assert packed is not None, "Linear used before load_weight"
        rows = []
        step = 512
        for start in range(0, self.in_features, step):
            eye = torch.eye(self.in_features)[start : start + step]
            rows.append(packed.matmul(eye).float())  # [step, out] = rows of W^T
        return torch.cat(rows, dim=0).T.contiguous()

    def extra_repr(self) -> str:
        if self._parts:
            kind = "stacked [" + "; ".join(p.extra_repr() for p in self._parts) + "]"
        elif self.int4 is not None:
            kind = f"int4 group {self.int4.group_size}"
        elif self.int8 is not None:
            kind = "int8"
        else:
            kind = f"dense {self.weight.dtype if self.weight is not None else ''}".strip()
        return f"in={self.in_features}, out={self.out_features}, {kind}, bias={self.has_bias}"
