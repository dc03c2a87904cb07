"""CTranslate2's `model.bin`: the variables of a converted model, read into torch tensors.

The layout is CTranslate2's own (`src/models/model.cc` reads it, `specs/model_spec.py`
writes it), little-endian throughout: a uint32 binary version, the spec's name as a string
(uint16 length counting a NUL terminator, then the bytes) and a uint32 spec revision; a uint32
count of variables, each a name, a uint8 rank, that many uint32 dimensions, a uint8 type id
(the `DataType` enum: float32, int8, int16, int32, float16, bfloat16) and a uint32 byte count
before its data; then a uint32 count of aliases, each two names (alias, target). A variable
the converter found twice (Whisper's output projection, tied to the token embeddings) is
stored once and aliased.

Quantized conversions store a linear or embedding `weight` as int8 beside `weight_scale`, one
float32 per row (`q = round(w * 127 / max|row|)`), or as int16 with one scale for the tensor;
`float_variable` divides the scale back out, so ladle computes in floats from a weight that is
the file's to the bit (re-quantizing for ladle's own kernels is ISQ's job). Scalars (head
counts, flags) are rank-0 tensors.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ladle.errors import ModelLoadError, UnsupportedArchitectureError

# CTranslate2's DataType ids 0-5, in the order of include/ctranslate2/types.h
_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
_MIN_BINARY_VERSION = 4  # the first to store type ids and byte counts (converters since 2.0)
_MAX_BINARY_VERSION = 6  # what converters write today
_MAX_RANK = 8


@dataclass(frozen=True, slots=True)
class CT2Model:
    """The contents of one `model.bin`: which spec it follows and its variables by name."""

    path: Path
    spec: str  # "WhisperSpec", "TransformerSpec", ...
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]  # alias -> the stored variable it shares

    def require_spec(self, spec: str, max_revision: int) -> None:
        """Refuse a file of another model family, or a layout newer than ladle reads."""
        if self.spec != spec:
            raise UnsupportedArchitectureError(self.path, f"spec {self.spec!r} is not {spec!r}")
        if self.revision > max_revision:
            raise ModelLoadError(
                self.path, f"{spec} revision {self.revision} is newer than {max_revision}"
            )

    def variable(self, name: str) -> torch.Tensor:
        """The stored tensor `name` (an alias, or an alias's `_scale`, resolves to its target)."""
        target = self.aliases.get(name, name)
        weight = name.removesuffix("_scale")
        if target == name and weight != name and weight in self.aliases:
            target = self.aliases[weight] + "_scale"  # an alias shares its target's scale too
        found = self.variables.get(target)
        if found is None:
            raise ModelLoadError(self.path, f"variable {name!r} is missing")
        return found

    def float_variable(self, name: str) -> torch.Tensor:
        """`name` as floats: an int8 or int16 weight divided by its stored `_scale`."""
        value = self.variable(name)
        if value.dtype not in (torch.int8, torch.int16):
            return value
        scale = self.variable(name + "_scale").float()
        # int8: a scale per row, broadcast as the converter multiplied it (np.expand_dims(s, 1))
        return value.float() / (scale.unsqueeze(1) if scale.ndim else scale)

    def layer_count(self, prefix: str) -> int:
        """How many `<prefix>/layer_<i>/...` blocks the file holds."""
        pattern = re.compile(rf"{re.escape(prefix)}/layer_(\d+)/")
        return len({m[1] for n in self.variables if (m := pattern.match(n))})


def read_ctranslate2(path: Path) -> CT2Model:
    """Read every variable of a `model.bin`, or of its parts (`model.bin.part1`, `.part2`,
    ... beside it, read in order as one file: how packages under a size limit carry it).

    Raises `ModelLoadError` naming the file when it cannot be opened, ends early, is garbled
    (a type id, rank or byte count that cannot be), or has a binary version ladle does not read.
    """
    try:
        with _Joined(model_parts(path)) as f:
            return _Reader(f, path).read()
    except OSError as e:
        raise ModelLoadError(path, f"cannot read the file ({e.strerror or e})") from e


def read_spec_name(path: Path) -> str | None:
    """The spec name in a `model.bin`'s header, or None when the file has none (a cheap look)."""
    try:
        with _Joined(model_parts(path)) as f:
            reader = _Reader(f, path)
            version = reader.unpack("<I", "binary version")
            return reader.string("spec name") if version >= 2 else None
    except (OSError, ModelLoadError):
        return None


def model_parts(path: Path) -> list[Path]:
    """`path` itself, or where it is missing, its parts `<name>.part<N>` in the order of N."""
    if path.exists():
        return [path]
    numbered = (
        (int(p.name.removeprefix(f"{path.name}.part")), p)
        for p in path.parent.glob(f"{path.name}.part*")
        if p.name.removeprefix(f"{path.name}.part").isdigit()
    )
    parts = [p for _, p in sorted(numbered)]
    if not parts:
        raise FileNotFoundError(2, "No such file or directory", str(path))
    return parts


class _Joined:
    """Files read one after another as one stream: the three calls `_Reader` makes."""

    def __init__(self, paths: list[Path]) -> None:
        self.files: list[io.BufferedReader] = []
        try:
            for p in paths:
                self.files.append(p.open("rb"))
        except OSError:
            self.close()
            raise
        self.index = 0
        self.offset = 0

    def readinto(self, buffer: bytearray) -> int:
        view, done = memoryview(buffer), 0
        while done < len(view) and self.index < len(self.files):
            got = self.files[self.index].readinto(view[done:])
            if not got:
                self.index += 1
            done += got or 0
        self.offset += done
        return done

    def read(self, size: int) -> bytes:
        buffer = bytearray(size)
        return bytes(buffer[: self.readinto(buffer)])

    def tell(self) -> int:
        return self.offset

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> _Joined:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Reader:
    def __init__(self, f: _Joined, path: Path) -> None:
        self.f = f
        self.path = path

    def read(self) -> CT2Model:
        version = self.unpack("<I", "binary version")
        if not _MIN_BINARY_VERSION <= version <= _MAX_BINARY_VERSION:
            raise ModelLoadError(
                self.path,
                f"binary version {version} is not one ladle reads "
                f"({_MIN_BINARY_VERSION} to {_MAX_BINARY_VERSION})",
            )
        spec = self.string("spec name")
        revision = self.unpack("<I", "spec revision")
        num_variables = self.unpack("<I", "variable count")
        variables = dict(self.variable() for _ in range(num_variables))
        num_aliases = self.unpack("<I", "alias count")
        aliases = {self.string("alias"): self.string("alias target") for _ in range(num_aliases)}
        if self.f.read(1):
            raise ModelLoadError(self.path, "garbled: bytes follow the last alias")
        return CT2Model(self.path, spec, revision, variables, aliases)

    def variable(self) -> tuple[str, torch.Tensor]:
        name = self.string("variable name")
        rank = self.unpack("<B", f"rank of {name!r}")
        if rank > _MAX_RANK:
            raise ModelLoadError(self.path, f"garbled: variable {name!r} has rank {rank}")
        shape = struct.unpack(f"<{rank}I", self.exactly(4 * rank, f"shape of {name!r}"))
        type_id = self.unpack("<B", f"type of {name!r}")
        if type_id >= len(_DTYPES):
            raise ModelLoadError(self.path, f"variable {name!r} has unknown data type id {type_id}")
        dtype = _DTYPES[type_id]
        num_bytes = self.unpack("<I", f"size of {name!r}")
        numel = 1
        for dim in shape:
            numel *= dim
        if num_bytes != numel * dtype.itemsize:
            raise ModelLoadError(
                self.path,
                f"garbled: variable {name!r} of shape {list(shape)} and {dtype} "
                f"claims {num_bytes} bytes",
            )
        # a fresh buffer per variable: aligned for its dtype, writable, owned by the tensor
        data = self.exactly(num_bytes, f"data of {name!r}")
        tensor = torch.frombuffer(data, dtype=dtype) if num_bytes else torch.empty(0, dtype=dtype)
        return name, tensor.reshape(shape)

    def string(self, what: str) -> str:
        length = self.unpack("<H", what)
        raw = self.exactly(length, what)
        if not raw.endswith(b"\0"):
            raise ModelLoadError(self.path, f"garbled: the {what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelLoadError(self.path, f"garbled: the {what} is not UTF-8") from e

    def unpack(self, fmt: str, what: str) -> int:
        value: int = struct.unpack(fmt, self.exactly(struct.calcsize(fmt), what))[0]
        return value

    def exactly(self, num_bytes: int, what: str) -> bytearray:
        offset = self.f.tell()
        data = bytearray(num_bytes)
        found = self.f.readinto(data)
        if found != num_bytes:
            raise ModelLoadError(
                self.path,
                f"truncated: the {what} needs {num_bytes} bytes at offset {offset}, "
                f"the file has {found}",
            )
        return data
