"""The native kernels against torch references.

Attention is compared with `scaled_dot_product_attention` in float32: only the order of the
sums differs, so outputs (weighted means of unit-normal values) agree within 1e-5. With float16
keys and values the reference attends the same float16 values widened to float32 (the kernel
widens them exactly, and sums in float32), so the tolerance stays 1e-5. The dense
linear is compared with `x @ w.float().T`: both accumulate K float32 products of size about 1,
so the tolerance is 1e-4 times sqrt(K), the size of an output. The row ops (RMSNorm, SiLU)
differ from torch's only in the order of a row's sum or in an exp polynomial: 1e-6 relative;
the rotary does torch's products and sums exactly.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ladle.engine.kernels import build, isa, native
from ladle.engine.layers.rotary import RotaryEmbedding, apply_rotary
from ladle.errors import UnsupportedIsaError

if not native.load():
    pytest.skip(
        "native kernels unavailable (no g++, a failed build, or LADLE_NATIVE_KERNELS=0)",
        allow_module_level=True,
    )

CACHED_DTYPES = [torch.float32, torch.float16]  # what keys and values may be stored in


def sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    # q [H, D], keys/values [KVH, L, D] -> [H, Dv]
    out = F.scaled_dot_product_attention(
        q[None, :, None], keys[None], values[None], scale=scale, enable_gqa=True
    )
    return out[0, :, 0]


@pytest.mark.parametrize("dtype", CACHED_DTYPES)
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "length"),
    [
        (9, 3, 64, 650),  # SmolLM2's heads; several spans, the last one partial
        (4, 1, 80, 1),
        (8, 8, 128, 128),  # exactly one span
        (14, 2, 64, 257),  # 7 query heads per kv head: a block of 4 and one of 3
        (2, 2, 17, 300),  # a head dim that is no multiple of the vector width
    ],
)
def test_decode_attention_matches_sdpa(
    num_heads: int, num_kv_heads: int, head_dim: int, length: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    q = torch.randn(num_heads, head_dim)
    keys = torch.randn(num_kv_heads, length, head_dim).to(dtype)
    values = torch.randn(num_kv_heads, length, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = native.decode_attention(q, keys, values, scale)
    assert out.dtype == torch.float32
    expected = sdpa(q, keys.float(), values.float(), scale)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", CACHED_DTYPES)
def test_decode_attention_reads_strided_views_of_a_pool(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    pool_k, pool_v = torch.randn(3, 1000, 64).to(dtype), torch.randn(3, 1000, 64).to(dtype)
    q = torch.randn(9, 64)
    keys, values = pool_k[:, 100:431], pool_v[:, 100:431]  # rows of a bigger pool
    out = native.decode_attention(q, keys, values, 0.125)
    expected = sdpa(q, keys.float(), values.float(), 0.125)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    token_major = torch.randn(331, 3, 64).to(dtype)  # [L, KVH, D] seen as [KVH, L, D]
    keys = values = token_major.transpose(0, 1)
    out = native.decode_attention(q, keys, values, 0.125)
    expected = sdpa(q, keys.float(), values.float(), 0.125)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_decode_attention_is_stable_for_large_scores() -> None:
    torch.manual_seed(0)
    q, keys, values = torch.randn(4, 64) * 30, torch.randn(2, 400, 64), torch.randn(2, 400, 64)
    out = native.decode_attention(q, keys, values, 1.0)  # scores in the hundreds: exp overflows
    expected = sdpa(q.double(), keys.double(), values.double(), 1.0).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", CACHED_DTYPES)
def test_decode_attention_does_not_depend_on_the_thread_count(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    q = torch.randn(9, 64)
    keys, values = torch.randn(3, 1000, 64).to(dtype), torch.randn(3, 1000, 64).to(dtype)
    try:
        native.set_num_threads(1)
        serial = native.decode_attention(q, keys, values, 0.125)
        native.set_num_threads(2)
        parallel = native.decode_attention(q, keys, values, 0.125)
    finally:
        native.set_num_threads(torch.get_num_threads())
    assert torch.equal(serial, parallel)


@pytest.mark.parametrize("head_dim", [64, 40])  # 40: rows that end in a partial vector
@pytest.mark.parametrize("dtype", CACHED_DTYPES)
def test_paged_decode_attention_writes_new_slots_and_attends_through_block_tables(
    dtype: torch.dtype, head_dim: int
) -> None:
    """Float16 pools get the new k, v rounded as `.half()` rounds them, bit for bit."""
    torch.manual_seed(0)
    num_heads, num_kv_heads, block_size, num_blocks = 6, 2, 16, 40
    lengths = [1, 16, 300]  # new token: a fresh block, a block's last slot, a long sequence
    blocks = torch.randperm(num_blocks).tolist()  # scattered, not ascending
    tables = torch.zeros(3, 19, dtype=torch.int32)  # unused entries stay 0 (padding)
    tables[0, :1] = torch.tensor(blocks[:1])
    tables[1, :1] = torch.tensor(blocks[1:2])
    tables[2, :19] = torch.tensor(blocks[2:21])
    pool_k = torch.randn(num_kv_heads, num_blocks * block_size, head_dim).to(dtype)
    pool_v = torch.randn(num_kv_heads, num_blocks * block_size, head_dim).to(dtype)
    q = torch.randn(3, num_heads, head_dim)
    k, v = torch.randn(3, num_kv_heads, head_dim), torch.randn(3, num_kv_heads, head_dim)

    def slots(b: int) -> list[int]:
        return [
            int(tables[b, p // block_size]) * block_size + p % block_size for p in range(lengths[b])
        ]

    expected_k, expected_v = pool_k.clone(), pool_v.clone()
    for b in range(3):
        last = slots(b)[-1]
        expected_k[:, last], expected_v[:, last] = k[b].to(dtype), v[b].to(dtype)
    out = native.paged_decode_attention(
        q, k, v, pool_k, pool_v, tables, torch.tensor(lengths), block_size, 0.125
    )
    assert pool_k.dtype == dtype and out.dtype == torch.float32
    assert torch.equal(pool_k, expected_k) and torch.equal(pool_v, expected_v)
    for b in range(3):
        keys, values = expected_k[:, slots(b)].float(), expected_v[:, slots(b)].float()
        torch.testing.assert_close(out[b], sdpa(q[b], keys, values, 0.125), rtol=0, atol=1e-5)


def test_paged_decode_attention_on_float16_pools_is_close_to_float32_pools() -> None:
    """What storing the cache in float16 costs: outputs move by the values' rounding (a
    relative 2^-11 of unit-normal values, so well under 1e-2), not more."""
    torch.manual_seed(0)
    tables, lengths = (
        torch.randperm(64).view(4, 16).to(torch.int32),
        torch.tensor([5, 90, 200, 256]),
    )
    pool_k, pool_v = torch.randn(3, 64 * 16, 64), torch.randn(3, 64 * 16, 64)
    q, k, v = torch.randn(4, 9, 64), torch.randn(4, 3, 64), torch.randn(4, 3, 64)
    args = (tables, lengths, 16, 0.125)
    full = native.paged_decode_attention(q, k, v, pool_k, pool_v, *args)
    half = native.paged_decode_attention(q, k, v, pool_k.half(), pool_v.half(), *args)
    assert 0 < (half - full).abs().max().item() < 1e-2


@pytest.mark.parametrize("num_rows", [1, 3, 16])
@pytest.mark.parametrize(("out_features", "in_features"), [(37, 72), (1000, 576), (5, 1100)])
def test_dense_linear_matches_float_matmul(
    num_rows: int, out_features: int, in_features: int
) -> None:
    torch.manual_seed(0)
    x = torch.randn(num_rows, in_features)
    w = torch.randn(out_features, in_features).half()
    out = native.linear(x, native.KernelWeight.of(w))
    expected = x @ w.float().T
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4 * in_features**0.5)


@pytest.mark.parametrize("shape", [(1, 576), (37, 100), (5, 3, 64)])
def test_rms_norm_matches_torch(shape: tuple[int, ...]) -> None:
    """Sums of squares in another order: within a few float32 ulps of the output."""
    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    torch.testing.assert_close(
        native.rms_norm(x, w, 1e-5), F.rms_norm(x, (shape[-1],), w, 1e-5), rtol=1e-6, atol=1e-6
    )


def test_rms_norm_reads_strided_heads() -> None:
    """Qwen 3's per-head norms run on `[T, heads, D]` views into a wider projection."""
    torch.manual_seed(0)
    qkv, w = torch.randn(4, 160), torch.randn(16)
    heads = qkv[:, 32:96].view(4, 4, 16)
    expected = F.rms_norm(heads.contiguous(), (16,), w, 1e-6)
    torch.testing.assert_close(native.rms_norm(heads, w, 1e-6), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(64, 64), (96, 32)])
def test_rotary_equals_the_torch_path_bit_for_bit(head_dim: int, rotary_dim: int) -> None:
    """The same products and sums as `apply_rotary`'s torch ops, on a strided view of q|k."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim, 10000.0, partial_rotary_factor=rotary_dim / head_dim)
    cos, sin = rope(torch.arange(7, 14), 14, torch.float32)
    qkv = torch.randn(7, 8 * head_dim)
    qk = qkv[:, : 6 * head_dim].view(7, 6, head_dim)
    assert torch.equal(native.rotary(qk, cos, sin), apply_rotary(qk, cos, sin))


@pytest.mark.parametrize("shape", [(1, 3072), (9, 40)])
def test_gated_activations_match_torch(shape: tuple[int, int]) -> None:
    """Both through the exp polynomial (tanh-GELU as g * sigmoid(2y)): 1e-6 relative."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 4
    gate, up = x.chunk(2, dim=-1)
    silu = native.gated_activation(x, "silu")
    torch.testing.assert_close(silu, F.silu(gate) * up, rtol=1e-6, atol=1e-6)
    gelu = native.gated_activation(x, "gelu_tanh")
    torch.testing.assert_close(gelu, F.gelu(gate, approximate="tanh") * up, rtol=1e-6, atol=1e-6)


def test_row_ops_do_not_depend_on_the_thread_count() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(600, 576), torch.randn(576)
    cos, sin = RotaryEmbedding(64, 10000.0)(torch.arange(600), 600, torch.float32)
    outputs = []
    try:
        for threads in (1, 2):
            native.set_num_threads(threads)
            heads = x[:, :512].view(600, 8, 64)
            rows = native.rms_norm(x, w, 1e-5), native.rotary(heads, cos, sin)
            outputs.append((*rows, native.gated_activation(x)))
    finally:
        native.set_num_threads(torch.get_num_threads())
    for one, two in zip(*outputs, strict=True):
        assert torch.equal(one, two)
    # and a row alone is the row in the batch
    assert torch.equal(native.rms_norm(x[5:6], w, 1e-5), outputs[0][0][5:6])


def _rope(num_tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding(dim, 10000.0)(torch.arange(num_tokens), num_tokens, torch.float32)


def _kv(
    num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_kv_heads, 5, head_dim)
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)


def _paged(
    tables: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    pools: torch.dtype | tuple[torch.dtype, torch.dtype] = torch.float32,
) -> object:
    """A valid call (6 tokens, a 2-block table, a pool of 4 blocks of 4) but for one argument."""
    tables = torch.tensor([[2, 0]], dtype=torch.int32) if tables is None else tables
    lengths = torch.tensor([6]) if lengths is None else lengths
    k_dtype, v_dtype = pools if isinstance(pools, tuple) else (pools, pools)
    pool_k, pool_v = torch.zeros(1, 16, 8, dtype=k_dtype), torch.zeros(1, 16, 8, dtype=v_dtype)
    q, k, v = torch.randn(1, 2, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    return native.paged_decode_attention(q, k, v, pool_k, pool_v, tables, lengths, 4, 1.0)


def _decoder(slots: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> object:
    """A valid prefill of 2 tokens through one dense layer (hidden 16, 2 heads of 8, one kv
    head) but for one argument."""
    dense = native.KernelWeight.of
    layer = native.LayerWeights(
        torch.ones(16),
        dense(torch.randn(32, 16)),
        None,
        None,
        None,
        dense(torch.randn(16, 16)),
        None,
        torch.ones(16),
        None,
        None,
        dense(torch.randn(64, 16)),
        dense(torch.randn(16, 32)),
        scale=1.0,
    )
    decoder = native.Decoder([layer], hidden=16, num_heads=2, num_kv_heads=1, head_dim=8, eps=1e-6)
    pool = torch.zeros(1, 16, 8)
    return decoder.run(
        torch.randn(2, 16),
        _rope(2, 8),
        [pool],
        [pool.clone()],
        torch.tensor([[0]], dtype=torch.int32),
        torch.tensor([2]) if lengths is None else lengths,
        torch.tensor([2]),
        torch.tensor([0, 1]) if slots is None else slots,
        16,
        False,
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: native.rms_norm(torch.randn(2, 8).double(), torch.randn(8), 1e-6), "x must be"),
        (lambda: native.rms_norm(torch.randn(8, 2).T, torch.randn(8), 1e-6), "last dimension"),
        (lambda: native.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6), "w must be"),
        (lambda: native.rotary(torch.randn(2, 3, 8), *_rope(2, 10)), "must be even, <= 8"),
        (lambda: native.rotary(torch.randn(2, 3, 8), *_rope(3, 8)), "cos and sin must"),
        (lambda: native.gated_activation(torch.randn(2, 7)), "last dimension 7 is odd"),
        (lambda: native.KernelWeight.of(torch.randn(8, 4).T), "not contiguous"),
        (lambda: native.KernelWeight.of(torch.randn(4, 8).double()), "not dense"),
        (
            lambda: native.linear(torch.randn(2, 8), native.KernelWeight.of(torch.randn(4, 6))),
            "x has 8 features, the weight 6",
        ),
        (lambda: native.decode_attention(torch.randn(4, 8).half(), *_kv(2, 8), 1.0), "q must"),
        (lambda: native.decode_attention(torch.randn(3, 8), *_kv(2, 8), 1.0), "kv heads"),
        (lambda: _paged(tables=torch.zeros(1, 2, dtype=torch.int64)), "block_tables must"),
        (lambda: _paged(lengths=torch.tensor([9])), "lengths[0] = 9"),
        (lambda: _paged(tables=torch.tensor([[0, 99]], dtype=torch.int32)), "block_tables[0][1]"),
        (lambda: _paged(pools=torch.bfloat16), "pool_k must be float32 or float16"),
        (lambda: _paged(pools=(torch.float16, torch.float32)), "must have one dtype"),
        (
            lambda: native.decode_attention(torch.randn(4, 8), *_kv(2, 8, torch.float64), 1.0),
            "pool_k must be float32 or float16",
        ),
        (lambda: _decoder(slots=torch.tensor([0, 99])), "slots[1] = 99 is outside"),
        (lambda: _decoder(lengths=torch.tensor([99])), "lengths[0] = 99 exceeds"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_the_decoder_helper_is_a_valid_call() -> None:
    """The bad-input cases above fail on their one bad argument, not on `_decoder` itself."""
    out = _decoder()
    assert isinstance(out, torch.Tensor) and out.shape == (2, 16)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_a_compiled_graph_calls_the_linear_operator() -> None:
    """Inside a compiled graph the native linear is the operator `ladle::linear`: the graph
    gives what the eager calls give, for a dense and a packed weight."""
    torch.manual_seed(0)
    half = native.KernelWeight.of(torch.randn(32, 64).half())
    q = torch.randint(0, 256, (2, 32, 16), dtype=torch.uint8)
    packed = native.KernelWeight.of(q, torch.rand(2, 2, 2, 16).half())

    def step(x: torch.Tensor) -> torch.Tensor:
        return native.linear(torch.relu(x), half) + native.linear(x, packed)

    x = torch.randn(3, 64)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x), rtol=0, atol=0)


def test_load_is_off_when_disabled_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LADLE_NATIVE_KERNELS", "0")
    assert native.load() is False


def test_an_unrunnable_isa_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LADLE_CPU_ISA", "sse9")
    with pytest.raises(UnsupportedIsaError, match="LADLE_CPU_ISA=sse9: unknown instruction set"):
        isa.selected_isa()
    other = "neon" if build.machine() == "x86_64" else "avx2"
    monkeypatch.setenv("LADLE_CPU_ISA", other)
    with pytest.raises(UnsupportedIsaError, match="this CPU cannot run it"):
        isa.selected_isa()


def test_a_missing_compiler_is_a_warning_not_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path)  # nothing built there yet
    monkeypatch.setattr(native, "_package_dir", lambda: tmp_path / "package")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.open_library("portable") is None
    assert "no g++" in caplog.text


def test_a_compile_error_is_a_warning_with_the_compiler_output(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    if shutil.which("g++") is None:
        pytest.skip("no g++ (the kernels came prebuilt)")
    for name in (*build.SOURCES, *build.HEADERS):
        (tmp_path / name).write_text("this is not C++\n")
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    monkeypatch.setattr(native, "_package_dir", lambda: tmp_path / "package")
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.open_library("portable") is None
    assert "the portable build failed" in caplog.text and "this is not C++" in caplog.text
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no partial file


def test_a_missing_build_is_built_on_first_use(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A checkout or install without the libraries builds the one it needs into the user's
    cache, once (about half a minute), and says so."""
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    name = native.loaded_isa()
    assert name is not None
    # the mechanism, not the code, is under test here: -O0 compiles in a third of the time
    unoptimized = tuple("-O0" if flag == "-O3" else flag for flag in build._COMMON)
    monkeypatch.setattr(build, "_COMMON", unoptimized)
    monkeypatch.setattr(native, "_package_dir", lambda: tmp_path / "package")  # none installed
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger=native.__name__):
        lib = native.open_library(name)
    assert lib is not None and lib.ladle_isa().decode() == name
    assert f"building the {name} kernels" in caplog.text
    assert [p.name for p in (tmp_path / "cache").rglob("*.so")] == [build.library_name(name)]


def test_a_build_older_than_its_sources_is_not_loaded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An installed library built from other sources (an edited checkout) is built again."""
    name = native.loaded_isa()
    assert name is not None
    if not (native._package_dir() / build.library_name(name)).exists():
        pytest.skip("no library was installed with the package")
    monkeypatch.setattr(build, "source_hash", lambda isa_name: "0" * 16)
    monkeypatch.setattr(build, "build", lambda isa_name, path: "refused by the test")
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert native.open_library(name) is None
    assert "is older than its sources" in caplog.text and "refused by the test" in caplog.text
