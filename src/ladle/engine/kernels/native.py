"""The native kernel library for this CPU, and its calls on tensors.

`load()` picks the instruction set (`isa.py`: the best the CPU runs, or `LADLE_CPU_ISA`), finds
its build (`build.py`): the one `pip install` put in the package, else one in the user's cache
(`$XDG_CACHE_HOME/ladle/kernels/<hash>/`), else builds it there with `g++` (half a minute,
once), and loads it through ctypes. A build older than its sources (an edited checkout) is
built again. Without a build and without a compiler, `load()` logs one warning and returns
False, and ladle runs on torch's kernels. `LADLE_NATIVE_KERNELS=0` turns the kernels off.

The calls below take and return float32 CPU tensors (weights and caches in their own dtypes);
they check what the C side trusts (`api.h`), run on the library's own threads
(`set_num_threads`) with the GIL released, and give results that depend neither on the
number of threads nor on the instruction set. `Decoder` runs every layer of a Llama-family
decoder in one call. `linear` is also the operator `torch.ops.ladle.linear`, so a compiled
graph calls it (the other kernels run only eagerly; inside a graph, attention is the opaque
`ladle::attention`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ladle import envconfig
from ladle.engine.kernels import build, isa

logger = logging.getLogger(__name__)


class CWeight(ctypes.Structure):
    _fields_ = (
        ("format", ctypes.c_int32),
        ("has_zeros", ctypes.c_int32),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("data", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
    )


MAX_PARTS = 3  # api.h: LADLE_MAX_PARTS


class CLinear(ctypes.Structure):
    _fields_ = (
        ("num_parts", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("parts", CWeight * MAX_PARTS),
    )


class CLayer(ctypes.Structure):
    _fields_ = (
        ("input_norm", ctypes.c_void_p),
        ("qkv", CLinear),
        ("qkv_bias", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("o", CLinear),
        ("o_bias", ctypes.c_void_p),
        ("post_attention_norm", ctypes.c_void_p),
        ("pre_feedforward_norm", ctypes.c_void_p),
        ("post_feedforward_norm", ctypes.c_void_p),
        ("gate_up", CLinear),
        ("down", CLinear),
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
        ("window", ctypes.c_int64),
        ("rope", ctypes.c_int32),
        ("activation", ctypes.c_int32),
    )


class CDecoder(ctypes.Structure):
    _fields_ = (
        ("num_layers", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("num_heads", ctypes.c_int64),
        ("num_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("layers", ctypes.POINTER(CLayer)),
    )


class CRope(ctypes.Structure):
    _fields_ = (
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("cos_local", ctypes.c_void_p),
        ("sin_local", ctypes.c_void_p),
        ("rotary_dim", ctypes.c_int64),
    )


class CCache(ctypes.Structure):
    _fields_ = (
        ("pools_k", ctypes.POINTER(ctypes.c_void_p)),
        ("pools_v", ctypes.POINTER(ctypes.c_void_p)),
        ("half", ctypes.c_int32),
        ("is_decode", ctypes.c_int32),
        ("num_slots", ctypes.c_int64),
        ("block_tables", ctypes.c_void_p),
        ("table_stride", ctypes.c_int64),
        ("num_seqs", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("lengths", ctypes.c_void_p),
        ("query_lens", ctypes.c_void_p),
        ("slots", ctypes.c_void_p),
    )


class CKV(ctypes.Structure):
    _fields_ = (
        ("pool_k", ctypes.c_void_p),
        ("pool_v", ctypes.c_void_p),
        ("half", ctypes.c_int32),
        ("kv_heads", ctypes.c_int64),
        ("num_slots", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("v_head_dim", ctypes.c_int64),
        ("k_head_stride", ctypes.c_int64),
        ("k_row_stride", ctypes.c_int64),
        ("v_head_stride", ctypes.c_int64),
        ("v_row_stride", ctypes.c_int64),
        ("block_tables", ctypes.c_void_p),
        ("table_stride", ctypes.c_int64),
        ("num_seqs", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("lengths", ctypes.c_void_p),
        ("query_lens", ctypes.c_void_p),
    )


# every pointer crosses as an address from `data_ptr()`
_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
_ROWS = (_ptr, _i64, _i64, _i64, _i64)  # base, count, inner, stride0, stride1
_SIGNATURES: dict[str, tuple[object, tuple[object, ...]]] = {
    "ladle_isa": (ctypes.c_char_p, ()),
    "ladle_source_hash": (ctypes.c_char_p, ()),
    "ladle_last_error": (ctypes.c_char_p, ()),
    "ladle_set_num_threads": (None, (_i32,)),
    "ladle_get_num_threads": (_i32, ()),
    "ladle_linear": (None, (ctypes.POINTER(CLinear), _ptr, _i64, _ptr)),
    "ladle_rms_norm": (None, (*_ROWS, _i64, _ptr, _f32, _ptr)),
    "ladle_rotary": (None, (*_ROWS, _i64, _i64, _ptr, _ptr, _i64, _ptr)),
    "ladle_gated_activation": (None, (*_ROWS, _i64, _i32, _ptr)),
    "ladle_store_kv": (_i32, (ctypes.POINTER(CKV), _ptr, _i64, _ptr, _i64, _ptr, _i64)),
    "ladle_attention": (
        _i32,
        (ctypes.POINTER(CKV), _ptr, _i64, _i64, _i64, _f32, _i64, _f32, _i32, _ptr),
    ),
    "ladle_decoder_layers": (
        _i32,
        (ctypes.POINTER(CDecoder), ctypes.POINTER(CCache), ctypes.POINTER(CRope), _ptr, _i64),
    ),
}

# Weight formats (api.h: LadleWeight)
F32, F16, BF16, INT4, INT8, INT8_GROUP16, INT6_GROUP16 = range(7)
_DENSE_FORMATS = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


@dataclass(slots=True)
class _Library:
    """The process's one load attempt (a library cannot be unloaded once its calls are bound)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: bool | None = None  # None until the first attempt ends
    lib: ctypes.CDLL | None = None
    isa: str | None = None
    others: dict[str, ctypes.CDLL | None] = field(default_factory=dict)  # `using_isa`'s


_LIBRARY = _Library()
_THIS_THREAD = threading.local()  # `using_isa`'s library, on the thread that set it


def load() -> bool:
    """Find or build, and load, the library for this CPU; True when available.

    Thread-safe and idempotent: the first call does the work, the others wait for it and share
    its outcome. False, after one logged warning naming the reason, when there is no build
    and none can be made; False without looking when `LADLE_NATIVE_KERNELS=0`. Raises
    `UnsupportedIsaError` when `LADLE_CPU_ISA` names a set this CPU cannot run.
    """
    if not envconfig.native_kernels():
        return False
    with _LIBRARY.lock:
        if _LIBRARY.loaded is None:
            chosen = isa.selected_isa()
            _LIBRARY.lib = _open(chosen)
            _LIBRARY.loaded = _LIBRARY.lib is not None
            _LIBRARY.isa = chosen if _LIBRARY.loaded else None
            if _LIBRARY.loaded:
                set_num_threads(torch.get_num_threads())
        return _LIBRARY.loaded


def available() -> bool:
    """Whether the kernels are loaded, so the calls below can be made."""
    return bool(_LIBRARY.loaded)


def loaded_isa() -> str | None:
    """The instruction set of the loaded library ("avx2", ...), None when none is loaded."""
    return _LIBRARY.isa


def set_num_threads(n: int) -> None:
    """The kernels' thread count for calls from this thread, itself included (per thread, as
    torch's OpenMP count; a thread that never set one takes the last count set anywhere)."""
    for lib in (_LIBRARY.lib, *_LIBRARY.others.values()):
        if lib is not None:
            lib.ladle_set_num_threads(max(1, int(n)))


def open_library(isa_name: str) -> ctypes.CDLL | None:
    """A library for `isa_name` whose build matches the sources, built when none is found;
    None (after a warning) when none can be had. Each is its own handle: the symbols of two
    sets loaded side by side never mix."""
    return _open(isa_name)


@contextmanager
def using_isa(isa_name: str) -> Iterator[None]:
    """Calls made on this thread inside the block go to `isa_name`'s build (which this CPU
    must run): how the tests compare every instruction set's results with the others'."""
    with _LIBRARY.lock:
        if isa_name not in _LIBRARY.others:
            lib = open_library(isa_name)
            if lib is not None:
                lib.ladle_set_num_threads(torch.get_num_threads())
            _LIBRARY.others[isa_name] = lib
        lib = _LIBRARY.others[isa_name]
    if lib is None:
        raise RuntimeError(f"no {isa_name} build of the native kernels (see the log)")
    previous = getattr(_THIS_THREAD, "lib", None)
    _THIS_THREAD.lib = lib
    try:
        yield
    finally:
        _THIS_THREAD.lib = previous


def _open(isa_name: str) -> ctypes.CDLL | None:
    wanted = build.source_hash(isa_name)
    name = build.library_name(isa_name)
    cached = _cache_dir() / wanted / name
    for path in (_package_dir() / name, cached):
        if path.exists():
            lib = _bind(path)
            if lib is not None and lib.ladle_source_hash().decode() == wanted:
                return lib
            if lib is not None:
                logger.info("native kernels: %s is older than its sources", path)
    logger.info("building the %s kernels into %s (about half a minute, once)", isa_name, cached)
    error = build.build(isa_name, cached)
    if error is not None:
        logger.warning("native kernels disabled: %s", error)
        return None
    return _bind(cached)


def _bind(path: Path) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:  # another process's unusable file: delete it, build again
        logger.warning("native kernels: cannot load %s: %s", path, exc)
        if path.parent != _package_dir():
            path.unlink(missing_ok=True)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


def _package_dir() -> Path:
    """Where `pip install` put the libraries (`setup.py`)."""
    return build.SOURCE_DIR / "lib"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ladle" / "kernels"


def _lib() -> ctypes.CDLL:
    lib = getattr(_THIS_THREAD, "lib", None) or _LIBRARY.lib
    if lib is None:
        raise RuntimeError("the native kernels are not loaded (native.load() first)")
    return lib


def _check(status: int, lib: ctypes.CDLL) -> None:
    if status != 0:
        raise ValueError(lib.ladle_last_error().decode())


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ------------------------------------------------------------------------------------------
# Linear layers


@dataclass(frozen=True, slots=True, eq=False)
class KernelWeight:
    """A linear weight in forms the kernels take, with the tensors it points into: one form, or
    up to three stacked along the rows (`stacked`: a fused projection whose checkpoint parts
    have different block types).

    A part's data: float32 / float16 / bfloat16 [out, in]; int4 uint8 [out / 16, in / 2, 16]
    with scales float16 [out / 16, in / 32, 1 | 2, 16]; int8 int8 [out / 16, in / 2, 32] with
    scales [out / 16, in / 32, 1 | 2, 16], or [out / 16, in / 16, 16] (a scale per 16 k).
    """

    data: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor | None, ...]
    struct: CLinear

    @staticmethod
    def of(data: torch.Tensor, scales: torch.Tensor | None = None) -> KernelWeight:
        """The weight for `data` (and `scales`), its format read from their dtypes and shapes;
        ValueError naming what does not fit."""
        struct = CLinear(1, 0)
        struct.parts[0] = _part(data, scales)
        return KernelWeight((data,), (scales,), struct)

    @staticmethod
    def stacked(weights: Sequence[KernelWeight]) -> KernelWeight:
        """`weights` one after the other along the rows (their outputs side by side)."""
        parts = [
            (d, sc, weight.struct.parts[i])
            for weight in weights
            for i, (d, sc) in enumerate(zip(weight.data, weight.scales, strict=True))
        ]
        _require(0 < len(parts) <= MAX_PARTS, f"weight: {len(parts)} parts (1 to {MAX_PARTS})")
        _require(len({int(p.cols) for _, _, p in parts}) == 1, "weight: parts of other widths")
        struct = CLinear(len(parts), 0)
        for i, (_, _, part) in enumerate(parts):
            struct.parts[i] = part
        return KernelWeight(tuple(d for d, _, _ in parts), tuple(s for _, s, _ in parts), struct)

    @property
    def rows(self) -> int:
        return sum(int(self.struct.parts[i].rows) for i in range(self.struct.num_parts))

    @property
    def cols(self) -> int:
        return int(self.struct.parts[0].cols)


def _part(data: torch.Tensor, scales: torch.Tensor | None) -> CWeight:
    _require(data.is_contiguous() and data.device.type == "cpu", "weight: not contiguous")
    if scales is None:
        _require(data.dim() == 2 and data.dtype in _DENSE_FORMATS, "weight: not dense 2-D")
        fmt, zeros, (rows, cols) = _DENSE_FORMATS[data.dtype], 0, data.shape
    else:
        _require(data.dim() == 3 and scales.dtype == torch.float16, "weight: bad packed form")
        _require(scales.is_contiguous(), "weight: scales not contiguous")
        blocks, pairs, width = data.shape
        rows, cols = blocks * 16, pairs * 2
        _require(cols % 32 == 0, f"weight: {cols} input features, not a multiple of 32")
        group = cols // scales.shape[1]  # k per scale: 32, or 16 (Q6_K's sub-blocks)
        zeros = int(scales.numel() == blocks * scales.shape[1] * 2 * 16)
        if data.dtype == torch.uint8 and width == 16 and group == 32:
            fmt = INT4
        elif data.dtype == torch.int8 and width == 32 and group in (16, 32):
            fmt = INT8 if group == 32 else INT8_GROUP16
        elif data.dtype == torch.uint8 and width == 24 and group == 16:
            fmt = INT6_GROUP16
        else:
            raise ValueError(
                f"weight: no packed form is {data.dtype} [.., {width}] in groups of {group}"
            )
        expected = blocks * (cols // group) * (1 + zeros) * 16
        _require(
            scales.numel() == expected and not (zeros and group == 16),
            f"weight: scales {tuple(scales.shape)} do not fit",
        )
    scales_address = 0 if scales is None else scales.data_ptr()
    return CWeight(fmt, zeros, rows, cols, data.data_ptr(), scales_address)


def linear(x: torch.Tensor, w: KernelWeight) -> torch.Tensor:
    """`x @ W.T` for x [..., in] (computed in float32, returned in x's dtype): quantized forms
    meet x as int16 per group of 32 (`quant_linear.cpp`), dense ones in float32. Inside a
    graph being compiled, the call is the operator `torch.ops.ladle.linear`."""
    if torch.compiler.is_compiling():
        return torch.ops.ladle.linear(x, list(w.data), list(w.scales))
    return _linear(x, w)


def _linear(x: torch.Tensor, w: KernelWeight) -> torch.Tensor:
    if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous():
        shape = x.shape
        y = _linear(x.reshape(-1, shape[-1]).float().contiguous(), w)
        return y.to(x.dtype).reshape(*shape[:-1], w.rows)
    _require(x.shape[1] == w.cols, f"linear: x has {x.shape[1]} features, the weight {w.cols}")
    out = torch.empty(x.shape[0], w.rows)
    _lib().ladle_linear(ctypes.byref(w.struct), x.data_ptr(), x.shape[0], out.data_ptr())
    return out


# ------------------------------------------------------------------------------------------
# Row ops


def _rows(x: torch.Tensor, op: str, name: str = "x") -> tuple[int, int, int, int, int]:
    """x's rows as api.h takes them: (base, count, inner, stride0, stride1)."""
    _require(x.dtype == torch.float32 and x.device.type == "cpu", f"{op}: {name} must be float32")
    _require(x.dim() in (2, 3), f"{op}: {name} must be 2-D or 3-D, got {x.dim()}-D")
    _require(x.stride(-1) == 1, f"{op}: {name}'s last dimension must be contiguous")
    if x.dim() == 2:
        return x.data_ptr(), x.shape[0], 1, x.stride(0), 0
    return x.data_ptr(), x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w over the last dimension of x [.., n] (2-D or 3-D)."""
    rows = _rows(x, "rms_norm")
    n = x.shape[-1]
    ok = w.dtype == torch.float32 and w.shape == (n,) and w.is_contiguous()
    _require(ok, f"rms_norm: w must be a contiguous float32 vector of {n} values")
    out = torch.empty(x.shape)
    _lib().ladle_rms_norm(*rows, n, w.data_ptr(), eps, out.data_ptr())
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos, sin [T, 1, R] in `layers/rotary.py`'s layout (channels
    from R on pass through): the products and sums of torch's path, bit for bit."""
    rows = _rows(x, "rotary")
    _require(x.dim() == 3, f"rotary: x must be [tokens, heads, head_dim], got {tuple(x.shape)}")
    T, heads, D = x.shape
    R = cos.shape[-1]
    for t in (cos, sin):
        ok = t.dtype == torch.float32 and t.is_contiguous() and t.shape == (T, 1, R)
        _require(ok, f"rotary: cos and sin must be contiguous float32 [{T}, 1, R]")
    _require(R % 2 == 0 and R <= D, f"rotary: the rotary dimension {R} must be even, <= {D}")
    out = torch.empty(T, heads, D)
    _lib().ladle_rotary(*rows, heads, D, cos.data_ptr(), sin.data_ptr(), R, out.data_ptr())
    return out


def gated_activation(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(x[..., :F]) * x[..., F:] for x [.., 2F]: SwiGLU ("silu") or GeGLU ("gelu_tanh")."""
    rows = _rows(x, "gated_activation")
    _require(x.shape[-1] % 2 == 0, f"gated_activation: x's last dimension {x.shape[-1]} is odd")
    half = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], half)
    _lib().ladle_gated_activation(*rows, half, ACTIVATIONS[activation], out.data_ptr())
    return out


# ------------------------------------------------------------------------------------------
# Attention


def paged_kv(
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    block_tables: torch.Tensor | None,
    lengths: torch.Tensor,
    query_lens: torch.Tensor | None,
    block_size: int,
    op: str = "attention",
) -> CKV:
    """One layer's pools [KVH, slots, D] (any row and head strides) and how sequences address
    them: through block_tables int32 [B, n] (None: position p in slot p), lengths int64 [B]
    (tokens with this step's), query_lens int64 [B] (this step's rows of each; prefill)."""
    for name, t in (("pool_k", pool_k), ("pool_v", pool_v)):
        ok = t.dtype in (torch.float32, torch.float16) and t.dim() == 3 and t.stride(-1) == 1
        _require(ok, f"{op}: {name} must be float32 or float16 [KVH, slots, D], unit stride")
    _require(pool_k.dtype == pool_v.dtype, f"{op}: pool_k and pool_v must have one dtype")
    _require(
        pool_v.shape[:2] == pool_k.shape[:2],
        f"{op}: pool_v {tuple(pool_v.shape)} does not match pool_k {tuple(pool_k.shape)}",
    )
    ok = lengths.dtype == torch.int64 and lengths.dim() == 1 and lengths.is_contiguous()
    _require(ok, f"{op}: lengths must be contiguous int64 [B]")
    B = lengths.shape[0]
    table_ptr, table_stride = 0, 0
    if block_tables is not None:
        ok = block_tables.dtype == torch.int32 and block_tables.dim() == 2
        _require(ok and block_tables.is_contiguous(), f"{op}: block_tables must be int32 [B, n]")
        _require(
            block_tables.shape[0] == B,
            f"{op}: block_tables has {block_tables.shape[0]} rows for {B} sequences",
        )
        table_ptr, table_stride = block_tables.data_ptr(), block_tables.shape[1]
    q_ptr = 0
    if query_lens is not None:
        ok = query_lens.dtype == torch.int64 and query_lens.shape == (B,)
        _require(ok and query_lens.is_contiguous(), f"{op}: query_lens must be int64 [{B}]")
        q_ptr = query_lens.data_ptr()
    kv = CKV(
        pool_k.data_ptr(),
        pool_v.data_ptr(),
        int(pool_k.dtype == torch.float16),
        pool_k.shape[0],
        pool_k.shape[1],
        pool_k.shape[2],
        pool_v.shape[2],
        pool_k.stride(0),
        pool_k.stride(1),
        pool_v.stride(0),
        pool_v.stride(1),
        table_ptr,
        table_stride,
        B,
        block_size,
        lengths.data_ptr(),
        q_ptr,
    )
    kv.tensors = (pool_k, pool_v, block_tables, lengths, query_lens)  # alive while kv is
    return kv


def _queries(q: torch.Tensor, kv: CKV, op: str) -> None:
    ok = q.dtype == torch.float32 and q.dim() == 3 and q.stride(2) == 1
    _require(ok and q.stride(1) == q.shape[2], f"{op}: q must be float32 [N, H, D], heads packed")
    _require(q.shape[2] == kv.head_dim, f"{op}: q has head dim {q.shape[2]}, pool_k {kv.head_dim}")


def attention(
    q: torch.Tensor,
    kv: CKV,
    scale: float,
    is_decode: bool,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [N, H, D] over pools already holding the rows' keys and values -> [N, H * Dv]."""
    op = "decode attention" if is_decode else "prefill attention"
    q = _packed_heads(q)
    _queries(q, kv, op)
    out = torch.empty(q.shape[0], q.shape[1] * kv.v_head_dim)
    lib = _lib()
    status = lib.ladle_attention(
        ctypes.byref(kv),
        q.data_ptr(),
        q.stride(0),
        q.shape[0],
        q.shape[1],
        scale,
        window or 0,
        softcap or 0.0,
        int(is_decode),
        out.data_ptr(),
    )
    _check(status, lib)
    return out


def store_kv(kv: CKV, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None) -> None:
    """Writes k [N, KVH, D] and v [N, KVH, Dv] at slots int64 [N] (rounded to the pools' dtype
    as `.half()` rounds); with slots None, row b at sequence b's last position (a decode)."""
    n = k.shape[0]
    k, v = _packed_heads(k), _packed_heads(v)
    for name, t, dim in (("k", k, kv.head_dim), ("v", v, kv.v_head_dim)):
        ok = t.dtype == torch.float32 and t.dim() == 3 and t.shape[1:] == (kv.kv_heads, dim)
        _require(
            ok and t.shape[0] == n, f"store_kv: {name} must be float32 [{n}, {kv.kv_heads}, {dim}]"
        )
    address = 0
    if slots is not None:
        ok = slots.dtype == torch.int64 and slots.shape == (n,) and slots.is_contiguous()
        _require(ok, f"store_kv: slots must be contiguous int64 [{n}]")
        address = slots.data_ptr()
    lib = _lib()
    status = lib.ladle_store_kv(
        ctypes.byref(kv), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), address, n
    )
    _check(status, lib)


def _packed_heads(t: torch.Tensor) -> torch.Tensor:
    """t [N, heads, D] with each row's heads side by side (the C side's layout), copied only
    when they are not."""
    if t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]:
        return t
    return t.contiguous()


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """One sequence's decode step: q [H, D] over keys [KVH, L, D] and values [KVH, L, Dv]
    (any row and head strides, float32 or float16) -> [H, Dv]."""
    lengths = torch.tensor([keys.shape[1]])
    kv = paged_kv(keys, values, None, lengths, None, keys.shape[1], "decode attention")
    return attention(q.unsqueeze(0), kv, scale, is_decode=True).view(q.shape[0], -1)


def paged_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """A decode step of B sequences: writes k, v [B, KVH, D] at each one's last position
    (lengths[b] - 1, through its block table), then q [B, H, D] over its positions ->
    [B, H, Dv]."""
    kv = paged_kv(pool_k, pool_v, block_tables, lengths, None, block_size, "decode attention")
    store_kv(kv, k, v, None)
    out = attention(q, kv, scale, True, window, softcap)
    return out.view(q.shape[0], q.shape[1], -1)


def paged_prefill_attention(
    q: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    query_lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The new rows q [N, H, D] of B sequences (query_lens[b] rows each, in turn, ending at
    position lengths[b] - 1), their keys and values already in the pools -> [N, H * Dv]."""
    kv = paged_kv(
        pool_k, pool_v, block_tables, lengths, query_lens, block_size, "prefill attention"
    )
    return attention(q, kv, scale, False, window, softcap)


# ------------------------------------------------------------------------------------------
# The whole decoder


@dataclass(frozen=True, slots=True, eq=False)
class LayerWeights:
    """One decoder layer as `Decoder` takes it (api.h: LadleLayer)."""

    input_norm: torch.Tensor
    qkv: KernelWeight
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: KernelWeight
    o_bias: torch.Tensor | None
    post_attention_norm: torch.Tensor
    pre_feedforward_norm: torch.Tensor | None
    post_feedforward_norm: torch.Tensor | None
    gate_up: KernelWeight
    down: KernelWeight
    scale: float
    softcap: float | None = None
    window: int | None = None
    local_rope: bool = False
    activation: str = "silu"

    def struct(self) -> CLayer:
        def address(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.data_ptr()

        return CLayer(
            address(self.input_norm),
            self.qkv.struct,
            address(self.qkv_bias),
            address(self.q_norm),
            address(self.k_norm),
            self.o.struct,
            address(self.o_bias),
            address(self.post_attention_norm),
            address(self.pre_feedforward_norm),
            address(self.post_feedforward_norm),
            self.gate_up.struct,
            self.down.struct,
            self.scale,
            self.softcap or 0.0,
            self.window or 0,
            int(self.local_rope),
            ACTIVATIONS[self.activation],
        )


class Decoder:
    """Every layer of a decoder in one native call a step (`decoder.cpp`).

    Built once per set of weights; each `run` passes the step's rows, rotary tables and
    cache. Its arithmetic is the per-layer path's (the same kernels in the same order).
    """

    def __init__(
        self,
        layers: Sequence[LayerWeights],
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        eps: float,
    ) -> None:
        self.layers = list(layers)  # keeps every tensor the structs point into alive
        for i, layer in enumerate(self.layers):
            expected = (num_heads + 2 * num_kv_heads) * head_dim
            _require(
                layer.qkv.rows == expected and layer.qkv.cols == hidden,
                f"decoder: layer {i}'s qkv_proj is {layer.qkv.rows} x {layer.qkv.cols}",
            )
            _require(
                layer.gate_up.rows % 2 == 0 and layer.down.cols == layer.gate_up.rows // 2,
                f"decoder: layer {i}'s MLP projections do not match",
            )
        self.hidden, self.num_kv_heads, self.head_dim = hidden, num_kv_heads, head_dim
        self._structs = (CLayer * len(self.layers))(*(layer.struct() for layer in self.layers))
        self._model = CDecoder(
            len(self.layers), hidden, num_heads, num_kv_heads, head_dim, eps, self._structs
        )
        self._pools: tuple[tuple[int, ...], ctypes.Array[ctypes.c_void_p], ...] | None = None

    def run(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        pools_k: Sequence[torch.Tensor],
        pools_v: Sequence[torch.Tensor],
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
        query_lens: torch.Tensor,
        slots: torch.Tensor,
        block_size: int,
        is_decode: bool,
    ) -> torch.Tensor:
        """x [T, hidden] float32 through every layer (a new tensor); rope is (cos, sin) or
        (cos, sin, cos_local, sin_local), each [T, 1, R]; the pools per layer, contiguous
        [KVH, slots, D] in float32 or float16."""
        _require(
            x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == self.hidden,
            f"decoder: x must be float32 [T, {self.hidden}]",
        )
        x = x.clone(memory_format=torch.contiguous_format)  # written in place
        cos, sin = rope[0].contiguous(), rope[1].contiguous()
        cos_l, sin_l = (
            (rope[2].contiguous(), rope[3].contiguous()) if len(rope) == 4 else (cos, sin)
        )
        c_rope = CRope(
            cos.data_ptr(), sin.data_ptr(), cos_l.data_ptr(), sin_l.data_ptr(), cos.shape[-1]
        )
        pool = pools_k[0]
        for t in (*pools_k, *pools_v):
            ok = t.is_contiguous() and t.shape == pool.shape and t.dtype == pool.dtype
            _require(ok, "decoder: every pool must be a contiguous [KVH, slots, D] of one dtype")
        _require(
            pool.shape[0] == self.num_kv_heads and pool.shape[2] == self.head_dim,
            f"decoder: pools are {tuple(pool.shape)}",
        )
        _require(len(pools_k) == len(self.layers) == len(pools_v), "decoder: a pool per layer")
        _keep, array_k, array_v = self._pool_arrays(pools_k, pools_v)
        tables = block_tables.contiguous()
        cache = CCache(
            array_k,
            array_v,
            int(pool.dtype == torch.float16),
            int(is_decode),
            pool.shape[1],
            tables.data_ptr(),
            tables.shape[1],
            lengths.shape[0],
            block_size,
            lengths.contiguous().data_ptr(),
            query_lens.contiguous().data_ptr(),
            slots.contiguous().data_ptr(),
        )
        lib = _lib()
        status = lib.ladle_decoder_layers(
            ctypes.byref(self._model),
            ctypes.byref(cache),
            ctypes.byref(c_rope),
            x.data_ptr(),
            x.shape[0],
        )
        _check(status, lib)
        return x

    def _pool_arrays(
        self, pools_k: Sequence[torch.Tensor], pools_v: Sequence[torch.Tensor]
    ) -> tuple[tuple[int, ...], ctypes.Array[ctypes.c_void_p], ctypes.Array[ctypes.c_void_p]]:
        """The pools' addresses as C arrays, made again only when the pools change."""
        key = tuple(t.data_ptr() for t in (*pools_k, *pools_v))
        if self._pools is None or self._pools[0] != key:
            n = len(pools_k)
            array_k = (ctypes.c_void_p * n)(*key[:n])
            array_v = (ctypes.c_void_p * n)(*key[n:])
            self._pools = (key, array_k, array_v)
        return self._pools


# ------------------------------------------------------------------------------------------
# The operator compiled graphs call


_ops = torch.library.Library("ladle", "FRAGMENT")
_ops.define("linear(Tensor x, Tensor[] data, Tensor?[] scales) -> Tensor")


def _linear_op(
    x: torch.Tensor, data: list[torch.Tensor], scales: list[torch.Tensor | None]
) -> torch.Tensor:
    parts = [KernelWeight.of(d, s) for d, s in zip(data, scales, strict=True)]
    return _linear(x, KernelWeight.stacked(parts))


_ops.impl("linear", _linear_op, "CPU")


@torch.library.register_fake("ladle::linear", lib=_ops)
def _linear_shape(
    x: torch.Tensor, data: list[torch.Tensor], scales: list[torch.Tensor | None]
) -> torch.Tensor:
    pairs = zip(data, scales, strict=True)
    rows = sum(d.shape[0] if s is None else d.shape[0] * 16 for d, s in pairs)
    return x.new_empty(*x.shape[:-1], rows)
