"""Read a GGUF file: its metadata as plain Python values and its tensors as `GGMLTensor`s.

The header is parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per
vocabulary string and takes seconds on a 49k-token vocabulary (measured 4-8 s vs 0.1 s for
SmolLM2). Tensors stay memory-mapped views into the file until a layer decodes or repacks
them, so loading a model never holds two full copies of the weights.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ladle.engine.quant.ggml import SUPPORTED_TYPES, GGMLTensor
from ladle.errors import ModelLoadError, UnsupportedTensorTypeError

_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass
class GGUFFile:
    """A parsed GGUF file. `metadata` maps keys such as `llama.block_count` to values."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGMLTensor] = field(repr=False)
    mapping: mmap.mmap | None = field(default=None, repr=False)  # what `tensors` view

    def release_pages(self) -> None:
        """Take the file's pages that loading has read out of this process's resident memory.

        Each tensor is read once, into a packed copy; the mapped pages would otherwise stay
        resident until the whole file is unmapped, so loading SmolLM2 peaked 90 MB (the file)
        above the loaded model. The pages stay in the OS page cache: a later read (a tensor
        kept as it is in the file) faults them back in.
        """
        if self.mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            self.mapping.madvise(mmap.MADV_DONTNEED)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata under the architecture's prefix: `get("block_count")` -> `llama.block_count`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file; any problem is a `ModelLoadError` naming the file.

    The file is untrusted: every size it declares is checked against the bytes it has left
    before anything is read or allocated for it.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(path, "no such file")
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(path, "not a GGUF file (bad magic bytes)")
            version, num_tensors, num_kv = struct.unpack("<IQQ", _read(f, 20))
            if version not in (2, 3):
                raise ModelLoadError(path, f"unsupported GGUF version {version}")
            metadata = {}
            for _ in range(num_kv):
                key = _string(f)
                metadata[key] = _value(f, GGUFValueType(_u32(f)))
            infos = [_tensor_info(f) for _ in range(num_tensors)]
            alignment = metadata.get("general.alignment", 32)
            if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
                raise ValueError(f"general.alignment {alignment!r} is not a power of two")
            data_start = -(-f.tell() // alignment) * alignment
    except (struct.error, ValueError, EOFError) as e:  # UnicodeDecodeError is a ValueError
        raise ModelLoadError(path, f"corrupt or truncated GGUF header ({e})") from e
    with path.open("rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mm = np.frombuffer(mapping, dtype=np.uint8)  # read-only, as the mapping is
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        if ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedTensorTypeError(
                path, f"tensor {name}: tensor type {ggml_type.name} is not supported"
            )
        if min(shape, default=0) == 0 or math.prod(shape) > _INT64_MAX:
            raise ModelLoadError(path, f"tensor {name}: no tensor has shape {shape[::-1]}")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        row_bytes = shape[0] // block * type_size
        rows = math.prod(shape[1:])
        start = data_start + offset
        if start + rows * row_bytes > len(mm):
            raise ModelLoadError(path, f"truncated file: tensor {name} runs past the end")
        data = mm[start : start + rows * row_bytes].reshape(rows, row_bytes)
        try:
            tensors[name] = GGMLTensor(name, ggml_type, data, tuple(reversed(shape)))
        except ModelLoadError as e:  # it names the tensor: name the file too
            raise type(e)(path, f"tensor {name}: {e.reason}") from e
    return GGUFFile(path, metadata, tensors, mapping)


_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays in arrays: at 12 bytes a level, a file could overflow the stack
_INT64_MAX = 2**63 - 1  # ggml counts elements in int64


def _read(f: BinaryIO, n: int) -> bytes:
    """`n` bytes, if the file has them: `f.read(n)` allocates `n` bytes before it reads."""
    left = os.fstat(f.fileno()).st_size - f.tell()
    if n > left:
        raise EOFError(f"{n} bytes declared where {left} remain")
    return f.read(n)


def _u32(f: BinaryIO) -> int:
    return int(struct.unpack("<I", _read(f, 4))[0])


def _u64(f: BinaryIO) -> int:
    return int(struct.unpack("<Q", _read(f, 8))[0])


def _string(f: BinaryIO) -> str:
    return _read(f, _u64(f)).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: GGUFValueType, depth: int = 0) -> Any:
    if vtype == GGUFValueType.STRING:
        return _string(f)
    if vtype == GGUFValueType.ARRAY:
        if depth == _MAX_NESTING:
            raise ValueError(f"arrays nested more than {_MAX_NESTING} deep")
        item_type, count = GGUFValueType(_u32(f)), _u64(f)
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type])
            return np.frombuffer(_read(f, count * dtype.itemsize), dtype=dtype).tolist()
        if item_type == GGUFValueType.STRING:
            return _strings(f, count)
        return [_value(f, item_type, depth + 1) for _ in range(count)]
    fmt = _SCALARS[vtype]
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _strings(f: BinaryIO, count: int) -> list[str]:
    """`count` strings in a row: a vocabulary (Qwen's 151,936 tokens) in a tight loop, 0.15 s
    where a call per string took 1 s."""
    unpack, read = struct.Struct("<Q").unpack, f.read
    left = os.fstat(f.fileno()).st_size - f.tell()
    strings = []
    for _ in range(count):
        (length,) = unpack(read(8))  # struct.error at the end of the file
        left -= 8 + length
        if left < 0:  # checked before `read` allocates `length` bytes
            raise EOFError(f"a string of {length} bytes runs past the end of the file")
        strings.append(read(length).decode("utf-8", errors="replace"))
    return strings


def _tensor_info(f: BinaryIO) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    name = _string(f)
    n_dims = _u32(f)
    if n_dims > _MAX_DIMS:
        raise ValueError(f"tensor {name} has {n_dims} dimensions, more than {_MAX_DIMS}")
    shape = tuple(_u64(f) for _ in range(n_dims))  # GGML order: innermost dimension first
    ggml_type = GGMLQuantizationType(_u32(f))
    return name, shape, ggml_type, _u64(f)
