"""GGML block bytes -> the integers and per-group constants they encode, read exactly.

The 8-bit kernel form (`int8.py`) takes `w = q * scale (+ zero)` with q in int8 and a scale
(and zero) per group of 32 k, or a scale per 16 k. GGML's 5-, 6- and 8-bit blocks are such
groups once their bits are put back together (layouts as `gguf.quants` decodes them):
    Q8_0   32 k in 34 bytes:   d, q[32]                          w = d * q
    Q5_0   32 k in 22 bytes:   d, qh[4], qs[16]                  w = d * (q - 16)
    Q5_1   32 k in 24 bytes:   d, m, qh[4], qs[16]               w = d * q + m
    Q5_K  256 k in 176 bytes:  d, dmin, sc and m[12], qh[32], qs[128]
                               (6-bit sc, m per 32, as Q4_K)     w = d sc * q - dmin m
    Q6_K  256 k in 210 bytes:  ql[128], qh[64], int8 sc[16], d   w = d sc * (q - 32), per 16 k
The 5- and 6-bit q (and Q5_0's q - 16, Q6_K's q - 32) fit int8 whole. Scales and zeros come
out in float32, where d * sc and dmin * m (an fp16 times an integer of at most 7 bits) are
exact; `int8.py` rounds them to fp16 once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ladle.engine.quant.ggml import GGMLTensor

Q = GGMLQuantizationType
_SLICE_ROWS = 4096  # rows unpacked at a time, so the temporaries stay small


class Int8Groups(NamedTuple):
    """`w = q * scale (+ zero)`, a scale (and zero) per `group` k of each row."""

    q: torch.Tensor  # int8 [n, k]
    scale: torch.Tensor  # float32 [n, k / group]
    zero: torch.Tensor | None  # float32 [n, k / group], None for symmetric types
    group: int


# (q int8 [n, k], scale float32 [n, k / group], zero float32 or None) of one slice of rows
Unpacked = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def unpack_int8(weight: GGMLTensor) -> Int8Groups:
    """The exact integer form of a Q8_0 / Q5_0 / Q5_1 / Q5_K / Q6_K weight `[n, k]`."""
    n, k = weight.shape
    rows = weight.data.reshape(n, -1)
    unpack, group, has_zeros = _UNPACKERS[weight.ggml_type]
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, k // group)
    zero = torch.empty(n, k // group) if has_zeros else None
    for start in range(0, n, _SLICE_ROWS):  # written in place: no second copy of q at the end
        stop = min(start + _SLICE_ROWS, n)
        part_q, part_scale, part_zero = unpack(rows[start:stop], k)
        q[start:stop], scale[start:stop] = torch.from_numpy(part_q), torch.from_numpy(part_scale)
        if zero is not None:
            zero[start:stop] = torch.from_numpy(part_zero)
    return Int8Groups(q, scale, zero, group)


def _unpack_q8_0(rows: np.ndarray, k: int) -> Unpacked:
    blocks = rows.reshape(len(rows), k // 32, 34)
    q = blocks[..., 2:].view(np.int8).reshape(len(rows), k)
    return q, f16(blocks[..., 0:2]), None


def _unpack_q5_0(rows: np.ndarray, k: int) -> Unpacked:
    blocks = rows.reshape(len(rows), k // 32, 22)
    q = _five_bits(blocks[..., 2:6], blocks[..., 6:22]).view(np.int8) - np.int8(16)
    return q.reshape(len(rows), k), f16(blocks[..., 0:2]), None


def _unpack_q5_1(rows: np.ndarray, k: int) -> Unpacked:
    blocks = rows.reshape(len(rows), k // 32, 24)
    q = _five_bits(blocks[..., 4:8], blocks[..., 8:24]).view(np.int8)
    return q.reshape(len(rows), k), f16(blocks[..., 0:2]), f16(blocks[..., 2:4])


def _five_bits(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """A Q5_0 / Q5_1 block's 32 values: nibbles all low then all high, bit j of the
    little-endian uint32 qh the fifth bit of value j."""
    high = np.unpackbits(qh, axis=-1, bitorder="little")  # [..., 32]
    return nibbles(qs) | (high << 4)


def _unpack_q5_k(rows: np.ndarray, k: int) -> Unpacked:
    n = len(rows)
    blocks = rows.reshape(n, k // 256, 176)
    d = f16(blocks[..., 0:2])[..., None]  # [n, k / 256, 1]
    dmin = f16(blocks[..., 2:4])[..., None]
    sc, m = scale_min_k4(blocks[..., 4:16])  # [n, k / 256, 8]
    qh = blocks[..., None, 16:48]  # [n, k / 256, 1, 32]: bit g is group g's fifth bit
    high = (qh >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [n, k / 256, 8, 32]
    low = nibbles(blocks[..., 48:176].reshape(n, k // 256, 4, 32))  # groups 2j, 2j + 1 per 32
    q = (low.reshape(n, k // 256, 8, 32) | (high << 4)).view(np.int8)
    return q.reshape(n, k), (d * sc).reshape(n, -1), -(dmin * m).reshape(n, -1)


def _unpack_q6_k(rows: np.ndarray, k: int) -> Unpacked:
    n = len(rows)
    blocks = rows.reshape(n, k // 256, 210)
    low = nibbles(blocks[..., 0:128].reshape(n, k // 256, 2, 64))  # [n, k / 256, 2, 128]
    qh = blocks[..., 128:192].reshape(n, k // 256, 2, 1, 32)
    high = (qh >> np.arange(0, 8, 2, dtype=np.uint8)[:, None]) & 3  # [n, k / 256, 2, 4, 32]
    q = (low | (high.reshape(low.shape) << 4)).view(np.int8) - np.int8(32)
    sc = blocks[..., 192:208].view(np.int8).astype(np.float32)  # [n, k / 256, 16]
    d = f16(blocks[..., 208:210])[..., None]
    return q.reshape(n, k), (d * sc).reshape(n, -1), None


def scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `get_scale_min_k4` for all 8 groups: 12 bytes -> 6-bit scales and mins."""
    lo, hi, mix = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), m.astype(np.float32)


def nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # all low nibbles, then all high


def f16(pair: np.ndarray) -> np.ndarray:
    """Little-endian fp16 fields (the last axis: 2 bytes) as float32."""
    return np.ascontiguousarray(pair).view(np.float16)[..., 0].astype(np.float32)


# type -> (unpacker, k per scale, whether it has zeros)
_UNPACKERS: dict[GGMLQuantizationType, tuple[Callable[[np.ndarray, int], Unpacked], int, bool]] = {
    Q.Q8_0: (_unpack_q8_0, 32, False),
    Q.Q5_0: (_unpack_q5_0, 32, False),
    Q.Q5_1: (_unpack_q5_1, 32, True),
    Q.Q5_K: (_unpack_q5_k, 32, True),
    Q.Q6_K: (_unpack_q6_k, 16, False),
}
INT8_TYPES = frozenset(_UNPACKERS)
