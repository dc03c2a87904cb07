"""Read a GGUF file: its metadata as plain Python values and its tensors as `GGMLTensor`s.

Tensors stay memory-mapped views into the file until a layer decodes or repacks them, so
loading a model never holds two full copies of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from ladle.engine.quant.ggml import GGMLTensor
from ladle.errors import ModelLoadError


@dataclass
class GGUFFile:
    """A parsed GGUF file. `metadata` maps keys such as `llama.block_count` to values."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGMLTensor] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata under the architecture's prefix: `get("block_count")` -> `llama.block_count`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file; any problem is a `ModelLoadError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(path, "no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(path, "not a GGUF file (bad magic bytes)")
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ModelLoadError(path, f"corrupt or truncated GGUF file ({e})") from e
    metadata = {name: _field_value(f) for name, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        ggml_type = GGMLQuantizationType(int(t.tensor_type))
        data = np.asarray(t.data)
        if data.dtype != np.uint8:
            data = data.view(np.uint8)
        tensors[t.name] = GGMLTensor(t.name, ggml_type, data.reshape(shape[0], -1), shape)
    return GGUFFile(path, metadata, tensors)


def _field_value(f: Any) -> Any:
    types = f.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        item_type = types[1] if len(types) > 1 else None
        if item_type == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        values = [f.parts[i] for i in f.data]
        return np.concatenate(values).tolist() if values else []
    if types[0] == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    value = f.parts[f.data[0]]
    return value.tolist()[0]
