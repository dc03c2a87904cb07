"""Build and load the `ladle_kernels` torch operators from the C++ sources beside this file.

The sources are compiled with the system's `g++` for this very CPU (`-march=native`), once:
the library is cached as `$XDG_CACHE_HOME/ladle/kernels/<hash>/ladle_kernels.so` (default
`~/.cache`), the hash covering the sources, torch's version, the flags and the CPU's feature
flags, so an upgrade or another machine rebuilds. A build takes 15-60 s, so callers load in a
background thread and keep their pure-torch path until `available()`. Without a compiler, or
when the build fails, `load()` logs one warning and returns False. `LADLE_NATIVE_KERNELS=0`
turns the kernels off (`envconfig.native_kernels`).

Once loaded, the operators are (all CPU, float32 in and out unless said):

    torch.ops.ladle_kernels.decode_attention(q, keys, values, scale)
        q [H, D], keys [KVH, L, D], values [KVH, L, Dv] (unit stride in the last dim; keys and
        values both float32 or both float16) -> [H, Dv]: softmax(q k * scale) v over all L
        positions, query head h on kv head h // (H // KVH), summed in float32.
    torch.ops.ladle_kernels.paged_decode_attention(
            q, k, v, pool_k, pool_v, block_tables, lengths, block_size, scale)
        One decode step of B sequences over a paged pool: writes k, v [B, KVH, D] at position
        lengths[b] - 1 of pool_k, pool_v [KVH, num_slots, D] (slot = block * block_size +
        offset, through block_tables int32 [B, max_blocks]; lengths int64 [B] counts the new
        token), then returns [B, H, Dv]: each q [B, H, D] over its positions 0..lengths[b]-1.
        The pools are both float32 or both float16; float16 pools get k, v rounded to nearest
        (as `.half()` rounds) and are read widened to float32.
    torch.ops.ladle_kernels.paged_prefill_attention(
            q, pool_k, pool_v, block_tables, lengths, query_lens, block_size, scale)
        The new rows of B sequences, their keys and values already in the pools: q [N, H, D]
        holds query_lens[b] rows of each sequence in turn (int64 [B], summing to N), at its
        positions lengths[b] - query_lens[b] .. lengths[b] - 1; each row attends its positions
        up to its own -> [N, H * Dv]. A row's output is bit for bit what
        paged_decode_attention gives it decoded alone, whatever other rows come with it.
    torch.ops.ladle_kernels.half_linear(x, w)
        x [N, K] float32 contiguous, w [M, K] float16 contiguous -> [N, M] = x @ w.float().T.
    torch.ops.ladle_kernels.int4_linear(x, q, scales)
        x [N, K] float32 contiguous, a 4-bit weight in `quant/int4.py`'s `NativeInt4Weight`
        layout (q uint8 [M / 16, K / 2, 16], scales float16 [M / 16, K / 32, 2, 16]) ->
        [N, M] = x @ w.T, x quantized to int16 per group of 32 on the way in.
    torch.ops.ladle_kernels.int8_linear(x, q, scales)
        The same for Q8_0 (`quant/int8.py`'s `NativeInt8Weight`: q int8 [M / 16, K / 2, 32],
        scales float16 [M / 16, K / 32, 16]).
    torch.ops.ladle_kernels.rms_norm(x, w, eps)
        x [.., N] (2-D or 3-D, last dim contiguous), w [N] -> x / sqrt(mean(x^2) + eps) * w.
    torch.ops.ladle_kernels.rotary(x, cos, sin)
        x [T, heads, D], cos and sin [T, 1, R] in `layers/rotary.py`'s layout -> the rotated
        x (channels from R on pass through), the products and sums of torch's path.
    torch.ops.ladle_kernels.silu_mul(x)
        x [.., 2F] -> silu(x[..., :F]) * x[..., F:].
    torch.ops.ladle_kernels.attention_inputs(
            x, norm, eps, qkv_proj, qkv_bias, cos, sin, num_heads, num_kv_heads)
    torch.ops.ladle_kernels.mlp_residual(
            x, attn, o_proj, o_bias, norm, eps, gate_up_proj, down_proj)
        A Llama-family decoder layer before and after its attention, from the kernels above
        (`decoder_layer.cpp`).
    torch.ops.ladle_kernels.decoder_layers(
            x, cos, sin, weights, eps, num_heads, num_kv_heads, scale, pools_k, pools_v,
            block_tables, lengths, query_lens, slots, block_size, is_decode)
        Every layer of such a decoder, attention included, over per-layer pools addressed as
        the paged attention ops address them (`kv_cache.KernelStep`): a decode step
        (is_decode) through paged_decode_attention; any other writes its keys and values at
        slots int64 [T] first, then attends through paged_prefill_attention. weights holds
        twelve entries a layer (their order: `decoder_layer.cpp`). Only eager forwards call
        the three layer ops, so they have no fake kernels.

They run on torch's intra-op threads (`torch.set_num_threads`), with results that do not
depend on their number, and each but the layer ops has a fake kernel, so
`torch.compile(fullgraph=True)` traces calls to it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ladle import envconfig

logger = logging.getLogger(__name__)

_SOURCES = (
    "attention_rows.cpp",
    "decode_attention.cpp",
    "decoder_layer.cpp",
    "half_linear.cpp",
    "prefill_attention.cpp",
    "quant_linear.cpp",
    "row_ops.cpp",
)
_HEADERS = ("attention_checks.h", "attention_rows.h", "ops.h", "parallel_items.h", "vec_exp.h")
_LIBRARY_NAME = "ladle_kernels.so"
_COMPILER = "g++"
# -fopenmp is left out on purpose: parallel work runs on torch's own pool (decode_attention.cpp).
_FLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fno-math-errno",
    "-ffp-contract=off",  # a * b + c stays two roundings where the kernels mirror torch's ops
    "-std=c++20",  # torch's headers require C++20 (cpp_extension builds with it too)
    "-shared",
    "-fPIC",
)
_BUILD_TIMEOUT_S = 600
_ERROR_TAIL_CHARS = 2000


@dataclass(slots=True)
class _Library:
    """The process's one load attempt: torch holds an operator namespace once per process."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: bool | None = None  # None until the first attempt ends


_LIBRARY = _Library()


def load() -> bool:
    """Build (once per machine, cached on disk) and load the kernels; True when available.

    Thread-safe and idempotent: the first call does the work, the others wait for it and share
    its outcome. Returns False, after one logged warning naming the reason, when there is no
    compiler or the build fails; False without building when `LADLE_NATIVE_KERNELS=0`.
    """
    if not envconfig.native_kernels():
        return False
    with _LIBRARY.lock:
        if _LIBRARY.loaded is None:
            _LIBRARY.loaded = _load()
        return _LIBRARY.loaded


def available() -> bool:
    """Whether the kernels are loaded, so `torch.ops.ladle_kernels.*` can be called."""
    return bool(_LIBRARY.loaded)


def _load() -> bool:
    path = _cache_dir() / _build_hash() / _LIBRARY_NAME
    if not path.exists():
        error = _build(path)
        if error is not None:
            logger.warning("native kernels disabled: %s", error)
            return False
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:  # a library another process left unusable: delete it, rebuild next time
        path.unlink(missing_ok=True)
        logger.warning("native kernels disabled: cannot load %s: %s", path, exc)
        return False
    _register_fakes()
    return True


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ladle" / "kernels"


def _source_dir() -> Path:
    return Path(__file__).resolve().parent


def _build_hash() -> str:
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        digest.update((_source_dir() / name).read_bytes())
    for part in (torch.__version__, " ".join(_FLAGS), _cpu_flags()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    """What `-march=native` depends on: the CPU's feature flags (its model name elsewhere)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):  # x86, then ARM
            return line.partition(":")[2].strip()
    return platform.machine()


def _build(path: Path) -> str | None:
    """Compile the library to `path`; None on success, else why it could not.

    Each source compiles in its own process (they take 5-15 s each), then one link.
    """
    compiler = shutil.which(_COMPILER)
    if compiler is None:
        return f"no {_COMPILER} on PATH to build them"
    # imported only to build: it brings setuptools, 4 MB of a serving process's memory
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    compile_flags = [
        *_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-isystem{include}" for include in cpp_extension.include_paths()),
    ]
    logger.info("building native kernels into %s (up to a minute, once)", path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # temporary names in the same folder, the library renamed when complete: a process
        # building at the same time, or one that loads while this one builds, never sees a
        # partial file
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as work:
            objects = [Path(work) / f"{Path(name).stem}.o" for name in _SOURCES]
            compiles = [
                [compiler, *compile_flags, "-c", str(_source_dir() / name), "-o", str(obj)]
                for name, obj in zip(_SOURCES, objects, strict=True)
            ]
            tmp = Path(work) / _LIBRARY_NAME
            link = [compiler, *_FLAGS, *map(str, objects), "-o", str(tmp), f"-L{torch_lib}"]
            link += ["-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{torch_lib}"]
            with ThreadPoolExecutor(len(compiles)) as pool:
                results = list(pool.map(_run, compiles))
            failed = next((r for r in results if r.returncode != 0), None) or _run(link)
            if failed.returncode != 0:
                return "the build failed:\n" + (failed.stderr or failed.stdout)[-_ERROR_TAIL_CHARS:]
            os.replace(tmp, path)
    except (OSError, subprocess.TimeoutExpired) as exc:  # an unwritable cache, a killed compiler
        return f"the build failed: {exc}"
    return None


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)


def _register_fakes() -> None:
    """Output shapes for tracing: `torch.compile` calls these instead of the kernels."""

    @torch.library.register_fake("ladle_kernels::decode_attention")
    def _(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        return q.new_empty(q.shape[0], values.shape[-1])

    @torch.library.register_fake("ladle_kernels::paged_decode_attention")
    def _(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pool_k: torch.Tensor,
        pool_v: torch.Tensor,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor:
        return q.new_empty(q.shape[0], q.shape[1], pool_v.shape[-1])

    @torch.library.register_fake("ladle_kernels::paged_prefill_attention")
    def _(
        q: torch.Tensor,
        pool_k: torch.Tensor,
        pool_v: torch.Tensor,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
        query_lens: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor:
        return q.new_empty(q.shape[0], q.shape[1] * pool_v.shape[-1])

    @torch.library.register_fake("ladle_kernels::half_linear")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    def quant_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], q.shape[0] * 16)  # 16 output columns per block

    for name in ("int4_linear", "int8_linear"):
        torch.library.register_fake(f"ladle_kernels::{name}", quant_linear)

    @torch.library.register_fake("ladle_kernels::rms_norm")
    def _(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return x.new_empty(x.shape)

    @torch.library.register_fake("ladle_kernels::rotary")
    def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape)

    @torch.library.register_fake("ladle_kernels::silu_mul")
    def _(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
