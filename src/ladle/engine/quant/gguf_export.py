"""Write a GGUF file quantized to an ISQ type: what `ladle quantize` runs.

The source is a GGUF file or a Hugging Face safetensors folder. A GGUF's metadata
(architecture, hyperparameters, tokenizer, chat template) is copied key by key with its GGUF
value types; a folder's is built as llama.cpp's `convert_hf_to_gguf.py` builds it
(`hf_gguf.py`, `hf_vocab.py`). Each tensor then gets the type `llama-quantize` gives it:
- linear weights (and an untied `token_embd`): the ISQ type, a K-quant falling back to a
  32-block type where the width is not a multiple of 256 (`quant/isq.py` says which and why),
  weighted by the importance matrix if given;
- `output`, and `token_embd` when it is also the output head (no `output` tensor): Q6_K (Q8_0
  when the width does not fit 256), except Q8_0, F16 and BF16, which keep their own type;
- norms, biases, other vectors, BERT's position and token-type tables: F32 from a folder, as
  they are from a GGUF. A weight whose width fits no block type is written F16 from a folder.
A tensor already of its target type in the source GGUF is copied byte for byte.
HQQ4 / HQQ8 cannot be written: their float zero points per group have no GGML block type.
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
from ladle.engine.quant.hf_gguf import read_hf_folder
from ladle.engine.quant.hqq import HQQWeight
from ladle.engine.quant.imatrix import read_imatrix
from ladle.engine.quant.isq import GGML_ISQ, HQQ_ISQ, LayerIsq, parse_isq_type
from ladle.errors import ModelLoadError

Q = GGMLQuantizationType
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
_F32_TABLES = ("token_types.weight", "position_embd.weight")  # never quantized (llama.cpp)
_FLOAT_DTYPES = {Q.F32: torch.float32, Q.F16: torch.float16}

Source = GGMLTensor | torch.Tensor
Loader = Callable[[], Source]


def write_quantized_gguf(
    source: Path,
    out: Path,
    isq_type: str,
    imatrix: Path | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] = lambda names: names,
) -> Counter[str]:
    """Quantize `source` (a GGUF file or a safetensors folder) into `out`; returns how many
    tensors of each type it wrote.

    `progress` wraps the iteration over tensor names (a progress bar, in the CLI).
    """
    isq_type = parse_isq_type(isq_type)
    if isq_type in HQQ_ISQ:
        raise ValueError(
            f"{isq_type} cannot be written to GGUF: HQQ's float zero points per group of 64 "
            f"have no GGML block type (writable: {', '.join(GGML_ISQ)})"
        )
    vectors = _imatrix(imatrix)
    if source.is_dir():
        folder = read_hf_folder(source)
        architecture = folder.gguf_architecture
        writer = GGUFWriter(out, architecture)
        folder.write_metadata(writer)
        tensors: dict[str, Loader] = dict(folder.tensors())
    elif source.is_file():
        model = read_gguf(source)
        architecture = model.architecture
        writer = GGUFWriter(out, architecture)
        _copy_metadata(GGUFReader(source), writer)
        tensors = {name: _stored(tensor) for name, tensor in model.tensors.items()}
    else:
        raise ModelLoadError(source, "no such file or folder")
    writer.add_file_type(_FILE_TYPES[isq_type])
    tied = "output.weight" not in tensors
    counts: Counter[str] = Counter()
    for name in progress(list(tensors)):
        tensor = _convert(name, tensors[name](), isq_type, vectors, architecture, tied)
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
    tensor: Source,
    isq_type: str,
    imatrix: dict[str, torch.Tensor],
    architecture: str,
    tied: bool,
) -> GGMLTensor:
    if (
        len(tensor.shape) != 2
        or not name.endswith(".weight")
        or name.endswith("_norm.weight")
        or name in _F32_TABLES
    ):
        return tensor if isinstance(tensor, GGMLTensor) else _float(name, tensor, Q.F32)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        spec = LayerIsq(_head_type(isq_type))
    elif name.startswith("blk."):
        spec = LayerIsq(isq_type, _lookup(imatrix, name, architecture))
    elif name == "token_embd.weight":
        spec = LayerIsq(isq_type)
    else:
        return tensor if isinstance(tensor, GGMLTensor) else _float(name, tensor, Q.F16)
    quantized = spec.quantize(tensor, name)
    assert not isinstance(quantized, HQQWeight)  # a GGML type
    if isinstance(quantized, torch.Tensor):  # a width no block type divides
        return _float(name, quantized, Q.F16)
    quantized.name = name
    return quantized


def _stored(tensor: GGMLTensor) -> Loader:
    return lambda: tensor


def _float(name: str, tensor: torch.Tensor, ggml_type: GGMLQuantizationType) -> GGMLTensor:
    rows = tensor.to(_FLOAT_DTYPES[ggml_type]).contiguous().reshape(-1, tensor.shape[-1])
    return GGMLTensor(name, ggml_type, rows.view(torch.uint8).numpy(), tuple(tensor.shape))


def _head_type(isq_type: str) -> str:
    """llama.cpp's output type: Q6_K below 8 bits (its Q8_0 fallback is `LayerIsq`'s)."""
    return isq_type if isq_type in ("F16", "BF16", "Q8_0") else "Q6K"


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


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # the header's own fields, and what GGUFWriter or we write
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub)
