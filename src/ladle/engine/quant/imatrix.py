"""Importance-matrix files: llama.cpp's (legacy `imatrix.dat` and GGUF) and ladle's `.cimatrix`.

Every format holds, per linear weight, the sum of squared input activations per input channel
and how many rows (or calls) it summed; what quantization uses is the mean `E[x_i^2]`.
- `.cimatrix` (ladle): a safetensors file with `<module>.in_sum2` (float64 [in_features]) and
  `<module>.counts` (float32 [1], rows seen) per linear layer, named by ladle's module names
  (`model.layers.0.self_attn.qkv_proj`, fused as the layers run), and metadata
  `{"format": "ladle.cimatrix"}`. The tensor names mirror llama.cpp's GGUF imatrix.
- llama.cpp GGUF imatrix: `<gguf tensor>.in_sum2` and `<gguf tensor>.counts`.
- llama.cpp legacy `imatrix.dat`: int32 entry count; per entry an int32-length name, int32
  ncall, int32 value count and float32 values (mean = values / ncall); a trailer follows.
llama.cpp names (`blk.0.attn_q.weight`) are returned as they are; the loader maps them to
module names for the model's architecture.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ladle.engine.quant.calibration import ActivationStats
from ladle.errors import ModelLoadError

CIMATRIX_FORMAT = "ladle.cimatrix"
_SUM, _COUNT = ".in_sum2", ".counts"


@dataclass(frozen=True)
class ImatrixFile:
    """Mean squared activation per input channel, by the names the file uses."""

    vectors: dict[str, torch.Tensor]
    gguf_names: bool  # llama.cpp tensor names (`blk.0.attn_q.weight`), not module names


def read_imatrix(path: str | Path) -> ImatrixFile:
    """Read any of the three formats, told apart by their first bytes."""
    path = Path(path).expanduser()
    try:
        head = path.read_bytes()[:8] if path.stat().st_size >= 8 else b""
    except OSError as e:
        raise ModelLoadError(path, f"cannot read importance matrix ({e.strerror})") from e
    if head[:4] == b"GGUF":
        return ImatrixFile(_read_gguf(path), gguf_names=True)
    if len(head) == 8 and _looks_like_safetensors(path, head):
        return ImatrixFile(_read_cimatrix(path), gguf_names=False)
    return ImatrixFile(_read_legacy(path), gguf_names=True)


def save_cimatrix(path: str | Path, stats: Mapping[str, ActivationStats]) -> None:
    """Write per-layer statistics as a `.cimatrix` file `with_imatrix` reads back."""
    tensors: dict[str, torch.Tensor] = {}
    for name, s in stats.items():
        tensors[name + _SUM] = s.sum_sq.contiguous()  # float64: read back, the same means
        tensors[name + _COUNT] = torch.tensor([float(s.rows)])
    save_file(tensors, str(path), metadata={"format": CIMATRIX_FORMAT})


def _means(
    sums: Mapping[str, torch.Tensor], counts: Mapping[str, float], path: Path
) -> dict[str, torch.Tensor]:
    missing = sorted(set(sums) ^ set(counts))
    if missing:
        raise ModelLoadError(path, f"{missing[0]}: in_sum2 and counts do not pair up")
    return {name: (sums[name] / max(counts[name], 1.0)).float() for name in sums}


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    (size,) = struct.unpack("<Q", head)
    if not 2 <= size <= 1 << 28:
        return False
    with path.open("rb") as f:
        f.seek(8)
        return f.read(1) == b"{"


def _read_cimatrix(path: Path) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    try:
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("format") != CIMATRIX_FORMAT:
                raise ModelLoadError(path, f"a safetensors file but not a {CIMATRIX_FORMAT}")
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name, kind = _split(key, path)
                if kind == _SUM:
                    sums[name] = f.get_tensor(key).double()
                else:
                    counts[name] = float(f.get_tensor(key).sum())
    except SafetensorError as e:
        raise ModelLoadError(path, f"corrupt importance matrix ({e})") from e
    return _means(sums, counts, path)


def _read_gguf(path: Path) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    for tensor in GGUFReader(path).tensors:
        name, kind = _split(tensor.name, path)
        values = np.asarray(tensor.data, dtype=np.float64)
        if kind == _SUM:
            if values.ndim > 1 and values.shape[0] > 1:
                raise ModelLoadError(path, f"{name}: expert (3-D) importance is not supported")
            sums[name] = torch.from_numpy(values.reshape(-1).copy())
        else:
            counts[name] = float(values.reshape(-1)[0])
    return _means(sums, counts, path)


def _read_legacy(path: Path) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    try:
        (entries,), offset = struct.unpack_from("<i", data, 0), 4
        out: dict[str, torch.Tensor] = {}
        for _ in range(entries):
            (length,) = struct.unpack_from("<i", data, offset)
            name = data[offset + 4 : offset + 4 + length].decode()
            offset += 4 + length
            ncall, nval = struct.unpack_from("<ii", data, offset)
            offset += 8
            values = np.frombuffer(data, dtype="<f4", count=nval, offset=offset)
            offset += 4 * nval
            out[name] = torch.from_numpy(values.astype(np.float32)) / max(ncall, 1)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            path, f"not an importance matrix (imatrix.dat, GGUF or .cimatrix): {e}"
        ) from e
    if entries <= 0:
        raise ModelLoadError(path, "not an importance matrix: no entries")
    return out


def _split(key: str, path: Path) -> tuple[str, str]:
    for kind in (_SUM, _COUNT):
        if key.endswith(kind):
            return key[: -len(kind)], kind
    raise ModelLoadError(path, f"unexpected tensor {key!r} in importance matrix")
