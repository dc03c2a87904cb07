"""Write a GGUF file quantized to an ISQ type: what `ladle quantize` runs.

The source is a GGUF file: its metadata (architecture, hyperparameters, tokenizer, chat
template) is copied key by key with its GGUF value types, and each tensor is rewritten:
- linear weights: the ISQ type (a K-quant falling back to a 32-block type where the width is
  not a multiple of 256, as `quant/isq.py` does), weighted by the importance matrix if given;
- `token_embd` and `output`: kept at higher precision, as llama.cpp's defaults keep them:
  Q6_K (or Q8_0 when the width does not fit 256) below 6 bits, Q8_0 at 6 and 8 bits, the type
  itself at 16 bits; a tensor already of that type is copied byte for byte;
- vectors (norms, biases) and anything else: copied unchanged.
HQQ4 / HQQ8 cannot be written: their float zero points per group have no GGML block type.
Safetensors folders are not accepted yet: building llama.cpp's metadata and tokenizer from
a Hugging Face folder is llama.cpp's `convert_hf_to_gguf.py`, not reimplemented here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.weights import gguf_module_name
from ladle.engine.quant.ggml import GGMLTensor
from ladle.engine.quant.imatrix import read_imatrix
from ladle.engine.quant.isq import GGML_ISQ, HQQ_ISQ, LayerIsq, parse_isq_type
from ladle.errors import ModelLoadError

Q = GGMLQuantizationType
_KEPT_TENSORS = ("token_embd.weight", "output.weight")
_FILE_TYPES = {
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q4K": LlamaFileType.MOSTLY_Q4_K_M,
    "Q5K": LlamaFileType.MOSTLY_Q5_K_M,
    "Q6K": LlamaFileType.MOSTLY_Q6_K,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16,
}
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"}
_FUSED |= {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def write_quantized_gguf(
    source: Path,
    out: Path,
    isq_type: str,
    imatrix: Path | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] = lambda names: names,
) -> Counter[str]:
    """Quantize `source` (a GGUF file) into `out`; returns how many tensors of each type.

    `progress` wraps the iteration over tensor names (a progress bar, in the CLI).
    """
    isq_type = parse_isq_type(isq_type)
    if isq_type in HQQ_ISQ:
        raise ValueError(
            f"{isq_type} cannot be written to GGUF: HQQ's float zero points per group of 64 "
            f"have no GGML block type (writable: {', '.join(GGML_ISQ)})"
        )
    if not source.is_file():
        raise ModelLoadError(source, "only GGUF files can be quantized to GGUF for now")
    model = read_gguf(source)
    vectors = _imatrix(imatrix)
    writer = GGUFWriter(out, model.architecture)
    _copy_metadata(GGUFReader(source), writer, isq_type)
    counts: Counter[str] = Counter()
    for name in progress(list(model.tensors)):
        tensor = _convert(name, model.tensors[name], isq_type, vectors, model.architecture)
        # GGUFWriter takes a quantized tensor's shape in bytes per row
        row_bytes = tensor.data.nbytes // max(1, math.prod(tensor.shape[:-1]))
        byte_shape = [*tensor.shape[:-1], row_bytes]
        writer.add_tensor(name, tensor.data, raw_shape=byte_shape, raw_dtype=tensor.ggml_type)
        counts[tensor.ggml_type.name] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def _convert(
    name: str,
    tensor: GGMLTensor,
    isq_type: str,
    imatrix: dict[str, torch.Tensor],
    architecture: str,
) -> GGMLTensor:
    if len(tensor.shape) != 2 or not name.endswith(".weight"):
        return tensor
    if name in _KEPT_TENSORS:
        spec = LayerIsq(_head_type(isq_type))
    elif name.startswith("blk."):
        spec = LayerIsq(isq_type, _lookup(imatrix, name, architecture))
    else:
        return tensor
    quantized = spec.quantize(tensor, name)
    assert isinstance(quantized, GGMLTensor)  # a GGML source and a GGML type
    quantized.name = name
    return quantized


def _head_type(isq_type: str) -> str:
    if isq_type in ("F16", "BF16", "Q8_0"):
        return isq_type
    return "Q8_0" if isq_type == "Q6K" else "Q6K"


def _lookup(imatrix: dict[str, torch.Tensor], name: str, architecture: str) -> torch.Tensor | None:
    """The vector for GGUF tensor `name`: under that name (llama.cpp's files), else under its
    module's name or the fused module it runs in (a `.cimatrix`)."""
    if name in imatrix:
        return imatrix[name]
    module = gguf_module_name(name, architecture)
    if module is None:
        return None
    prefix, _, leaf = module.rpartition(".")
    fused = f"{prefix}.{_FUSED.get(leaf, leaf)}"
    return imatrix.get(module, imatrix.get(fused))


def _imatrix(path: Path | None) -> dict[str, torch.Tensor]:
    return {} if path is None else dict(read_imatrix(path).vectors)


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, isq_type: str) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # the header's own fields, and what GGUFWriter or we write
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub)
    writer.add_file_type(_FILE_TYPES[isq_type])
