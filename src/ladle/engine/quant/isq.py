"""In-situ quantization (ISQ): the types a user may ask for, and quantizing weights as they load.

Type names are mistral.rs's (`Q4_0, Q4_1, Q4K, Q5K, Q6K, Q8_0, HQQ4, HQQ8, F16, BF16`),
case-insensitive, plus bit widths: `4` is Q4K and `8` is Q8_0 (`5`, `6`: Q5K, Q6K). On CPU all
three 4-bit GGML types run on the same int4 kernel at the same speed, and Q4K fits each group
of 32 with a scale and an offset chosen by weighted search (and 6-bit super-block constants),
so it is the most accurate of them for the same cost. Q8_0 is the only 8-bit GGML type.

Only the linear layers of the decoder (or encoder) are quantized: embeddings and the output
head keep their precision, as mistral.rs and llama.cpp's defaults do.

A layer whose input width is not a multiple of a K-quant's 256 falls back to a 32-block type:
Q4K -> Q4_1, Q5K -> Q8_0, Q6K -> Q8_0. llama.cpp (`tensor_type_fallback` in
`src/llama-quant.cpp`) picks Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 when even 32
does not divide the width. ladle keeps Q4K's fallback at 4 bits: Q4_1 runs on the same int4
kernel as Q4_K, where Q5_0 would run as int8 (twice Q4_1's bytes to read a token), so a Q4K
model stays a 4-bit model whatever its widths. ladle has no Q5_0 / Q5_1 quantizer,
so Q5K falls back to Q8_0. A width no block type divides stays as loaded (`ladle quantize`
writes a float one as F16). The cost shows on SmolLM2 (576 wide): only its ffn_down (1536
wide) gets Q4_K; every other layer is Q4_1, which from its Q4_1 source is the source itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.ggml_quantize import quantize
from ladle.engine.quant.hqq import GROUP_SIZE as HQQ_GROUP_SIZE
from ladle.engine.quant.hqq import HQQWeight, hqq_quantize

Q = GGMLQuantizationType
GGML_ISQ = {
    "Q4_0": Q.Q4_0,
    "Q4_1": Q.Q4_1,
    "Q4K": Q.Q4_K,
    "Q5K": Q.Q5_K,
    "Q6K": Q.Q6_K,
    "Q8_0": Q.Q8_0,
    "F16": Q.F16,
    "BF16": Q.BF16,
}
HQQ_ISQ = {"HQQ4": 4, "HQQ8": 8}
ISQ_TYPES = (*GGML_ISQ, *HQQ_ISQ)
_BITS = {"4": "Q4K", "5": "Q5K", "6": "Q6K", "8": "Q8_0"}
_ALIASES = {name.upper().replace("_", ""): name for name in ISQ_TYPES}  # "Q4_K", "q80" ...
_FALLBACK = {Q.Q4_K: Q.Q4_1, Q.Q5_K: Q.Q8_0, Q.Q6_K: Q.Q8_0}

Weight = torch.Tensor | GGMLTensor
Imatrix = Mapping[str, torch.Tensor]  # module name -> mean squared activation [in_features]


def isq_type_pattern() -> str:
    """A regular expression of every spelling `parse_isq_type` takes (for API documents)."""

    def caseless(alias: str) -> str:
        return "_*".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in alias)

    names = [*_BITS, *(f"_*{caseless(a)}_*" for a in _ALIASES)]
    return rf"^\s*(?:{'|'.join(names)})\s*$"


def parse_isq_type(name: str | int) -> str:
    """The canonical ISQ type for a user's spelling; ValueError listing the valid ones."""
    text = str(name).strip()
    canonical = _BITS.get(text) or _ALIASES.get(text.upper().replace("_", ""))
    if canonical is None:
        raise ValueError(
            f"unknown ISQ type {name!r} (valid: {', '.join(ISQ_TYPES)}, "
            f"or bits {', '.join(_BITS)}; case-insensitive)"
        )
    return canonical


@dataclass(frozen=True)
class IsqSpec:
    """What to quantize linear layers to, and the importance matrix weighting the error."""

    isq_type: str  # canonical, from `parse_isq_type`
    imatrix: Imatrix | None = field(default=None, compare=False)

    def for_layer(self, names: Iterable[str]) -> LayerIsq:
        """The spec of one layer, known by `names` (its own, then the checkpoint modules
        fused into it: q/k/v share their input, so any one's importance vector serves)."""
        vector = None
        if self.imatrix is not None:
            vector = next((self.imatrix[n] for n in names if n in self.imatrix), None)
        return LayerIsq(self.isq_type, vector)


@dataclass(frozen=True)
class LayerIsq:
    """ISQ for one linear layer: its target type and its importance vector, if any."""

    isq_type: str
    imatrix: torch.Tensor | None = field(default=None, compare=False)

    def quantize(self, weight: Weight | HQQWeight, name: str) -> Weight | HQQWeight:
        """`weight` ([out, in]) in this type; left as it is when its width fits no block."""
        if self.isq_type in HQQ_ISQ:
            dense = _dense(weight)
            if dense.shape[-1] % HQQ_GROUP_SIZE:
                return weight
            return hqq_quantize(dense, HQQ_ISQ[self.isq_type])
        target = self.ggml_type_for(int(weight.shape[-1]))
        if target is None:
            return weight
        if isinstance(weight, GGMLTensor) and weight.ggml_type == target and self.imatrix is None:
            return weight  # already that type: re-rounding could only lose
        imatrix = self.imatrix
        if imatrix is not None and imatrix.shape[-1] != weight.shape[-1]:
            raise ValueError(
                f"{name}: importance vector has {imatrix.shape[-1]} channels, "
                f"the weight {weight.shape[-1]}"
            )
        return quantize(_dense(weight), target, imatrix, name)

    def ggml_type_for(self, in_features: int) -> GGMLQuantizationType | None:
        """The GGML type, or its fallback, for rows of `in_features`; None if none fits."""
        target: GGMLQuantizationType | None = GGML_ISQ[self.isq_type]
        while target is not None and in_features % GGML_QUANT_SIZES[target][0]:
            target = _FALLBACK.get(target)
        return target


def _dense(weight: Weight | HQQWeight) -> torch.Tensor:
    return weight.float() if isinstance(weight, torch.Tensor) else weight.dequantize()
