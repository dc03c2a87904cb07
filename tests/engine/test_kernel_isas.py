"""Every instruction set this CPU runs gives the kernels' results: one model, the same logits.

The kernels are written once on sixteen float lanes (`kernels/simd.h`) whose every operation
is defined as IEEE computes it lane by lane (a fused multiply-add rounds once, sums reduce in
one tree, exp is one polynomial), so the SIMD builds (AVX-512 VNNI, AVX-512, AVX-VNNI, AVX2,
NEON) must agree bit for bit, on every kernel. The portable build is the same code on plain
arrays: equal too where its target has a fused multiply-add (ARM64); on x86-64 it has none, so
a*b+c rounds twice, and it is held to 1e-5 of each output's scale instead (sums of a few
hundred float32 terms, each rounded once more than the others'); the three-layer decoder to
2e-4 (measured 8e-5: the layers amplify those roundings, and a cached key that rounds the
other way in float16 moves by a float16 step, 2^-11 of its size).

Each case runs on the build `native.load()` chose and on every other build this machine can
execute (`native.using_isa`); a machine with only one build skips. The SIMD paths an x86-64
AVX2 machine cannot execute (AVX-512, AVX-VNNI, NEON) run too, emulated: their simd.h code
compiled with SIMDe's definitions of the intrinsics (`kernels/simd_emulated.h`; Debian's
`libsimde-dev`, which `.ci/run` installs), held to the same bits.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ladle.engine.kernels import build, isa, native
from ladle.engine.layers.rotary import RotaryEmbedding
from ladle.engine.quant.ggml_blocks import Int8Groups
from ladle.engine.quant.int8 import pack_native6

if not native.load():
    pytest.skip("native kernels unavailable", allow_module_level=True)

OTHERS = [name for name in isa.runnable_isas() if name != native.loaded_isa()]
EMULATED = build.emulated_isas(isa.runnable_isas())
ROUNDS_TWICE = build.machine() == "x86_64"  # the x86-64 portable build has no FMA


@pytest.fixture(scope="module", autouse=True)
def _emulated_builds() -> None:
    """Build the emulated libraries (about 30 s each, once per source change) two at a time,
    before their cases ask for them one by one."""
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(native.open_library, EMULATED))


def _int4(rows: int, cols: int, zeros: bool = True) -> native.KernelWeight:
    q = torch.randint(0, 256, (rows // 16, cols // 2, 16), dtype=torch.uint8)
    scales = ((torch.rand(rows // 16, cols // 32, 2 if zeros else 1, 16) - 0.5) * 0.05).half()
    return native.KernelWeight.of(q, scales)


def _int8(rows: int, cols: int, group: int = 32, zeros: bool = False) -> native.KernelWeight:
    q = torch.randint(-128, 128, (rows // 16, cols // 2, 32), dtype=torch.int8)
    shape = (rows // 16, cols // group, 2, 16) if zeros else (rows // 16, cols // group, 16)
    return native.KernelWeight.of(q, (torch.rand(shape) * 0.01).half())


def _int6(rows: int, cols: int) -> native.KernelWeight:
    q = torch.randint(-32, 32, (rows, cols), dtype=torch.int8)
    scales = torch.rand(rows, cols // 16) * 0.01
    packed = pack_native6(Int8Groups(q, scales, None, 16))
    return native.KernelWeight.of(packed.q, packed.scales)


def _dense(rows: int, cols: int, dtype: torch.dtype) -> native.KernelWeight:
    return native.KernelWeight.of((torch.randn(rows, cols) * 0.1).to(dtype))


def _pools(dtype: torch.dtype, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pools of 3 kv heads of 64, and one sequence's scattered block table of `length`."""
    blocks = (length + 7) // 8
    pool_k = torch.randn(3, (blocks + 4) * 8, 64).to(dtype)
    pool_v = torch.randn(3, (blocks + 4) * 8, 64).to(dtype)
    table = torch.randperm(blocks + 4)[:blocks].to(torch.int32)[None]
    return pool_k, pool_v, table


def _attention(dtype: torch.dtype, window: int | None, softcap: float | None) -> torch.Tensor:
    """A prefill of 40 rows ending at position 299, and a decode step at position 300."""
    pool_k, pool_v, table = _pools(dtype, 301)
    q = torch.randn(40, 9, 64) * 2
    rows = native.paged_prefill_attention(
        q,
        pool_k,
        pool_v,
        table,
        torch.tensor([300]),
        torch.tensor([40]),
        8,
        0.125,
        window,
        softcap,
    )
    k, v = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    decoded = native.paged_decode_attention(
        q[:1], k, v, pool_k, pool_v, table, torch.tensor([301]), 8, 0.125, window, softcap
    )
    return torch.cat([rows.flatten(), decoded.flatten(), pool_k.float().flatten()])


def _decoder(num_tokens: int) -> torch.Tensor:
    """Two Gemma 3-like layers (q/k norms, sandwich norms, GeGLU, a window, a local rope) and a
    Llama-like one, on int4 / int8 / bf16 weights: a prefill of `num_tokens`."""
    hidden, heads, kv_heads, head_dim = 64, 4, 2, 32

    def layer(kind: str) -> native.LayerWeights:
        qkv_rows, gemma = (heads + 2 * kv_heads) * head_dim, kind == "gemma"
        norm = torch.rand(hidden) + 0.5
        return native.LayerWeights(
            norm,
            _int4(qkv_rows, hidden) if gemma else _dense(qkv_rows, hidden, torch.bfloat16),
            None if gemma else torch.randn(qkv_rows),
            torch.rand(head_dim) + 0.5 if gemma else None,
            torch.rand(head_dim) + 0.5 if gemma else None,
            _int8(hidden, heads * head_dim, group=16),
            None,
            torch.rand(hidden) + 0.5,
            torch.rand(hidden) + 0.5 if gemma else None,
            torch.rand(hidden) + 0.5 if gemma else None,
            _int4(256, hidden),
            _int8(hidden, 128, zeros=True),
            scale=head_dim**-0.5,
            softcap=30.0 if gemma else None,
            window=5 if gemma else None,
            local_rope=gemma,
            activation="gelu_tanh" if gemma else "silu",
        )

    decoder = native.Decoder(
        [layer("gemma"), layer("gemma"), layer("llama")], hidden, heads, kv_heads, head_dim, 1e-6
    )
    rope = RotaryEmbedding(head_dim, 10000.0)(torch.arange(num_tokens), num_tokens, torch.float32)
    local = RotaryEmbedding(head_dim, 500.0)(torch.arange(num_tokens), num_tokens, torch.float32)
    pools = [torch.zeros(kv_heads, 64, head_dim, dtype=torch.float16) for _ in range(6)]
    out = decoder.run(
        torch.randn(num_tokens, hidden),
        (*rope, *local),
        pools[:3],
        pools[3:],
        torch.arange(8, dtype=torch.int32)[None],
        torch.tensor([num_tokens]),
        torch.tensor([num_tokens]),
        torch.arange(num_tokens),
        8,
        False,
    )
    return torch.cat([out.flatten(), *(p.float().flatten() for p in pools)])


CASES: dict[str, Callable[[], torch.Tensor]] = {
    **{
        f"int4_{n}_rows": (lambda n=n: native.linear(torch.randn(n, 96), _int4(48, 96)))
        for n in (1, 2, 5, 13)
    },
    "int4_no_zeros": lambda: native.linear(torch.randn(3, 64), _int4(32, 64, zeros=False)),
    "int8": lambda: native.linear(torch.randn(7, 96), _int8(32, 96)),
    "int8_zeros": lambda: native.linear(torch.randn(2, 64), _int8(16, 64, zeros=True)),
    "int8_group16": lambda: native.linear(torch.randn(9, 64), _int8(32, 64, group=16)),
    "int6_1_row": lambda: native.linear(torch.randn(1, 64), _int6(32, 64)),
    "int6_9_rows": lambda: native.linear(torch.randn(9, 96), _int6(48, 96)),
    **{
        f"dense_{dtype}": (
            lambda dtype=dtype: native.linear(torch.randn(5, 72), _dense(19, 72, dtype))
        )
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    },
    "rms_norm": lambda: native.rms_norm(torch.randn(3, 100) * 3, torch.randn(100), 1e-6),
    "rotary": lambda: native.rotary(
        torch.randn(6, 5, 64),
        *RotaryEmbedding(64, 10000.0, partial_rotary_factor=0.5)(torch.arange(6), 6, torch.float32),
    ),
    "silu": lambda: native.gated_activation(torch.randn(4, 200) * 4, "silu"),
    "gelu": lambda: native.gated_activation(torch.randn(4, 200) * 4, "gelu_tanh"),
    "attention_f16": lambda: _attention(torch.float16, None, None),
    "attention_f32_window_softcap": lambda: _attention(torch.float32, 150, 20.0),
    "decoder_prefill": lambda: _decoder(19),
}


def _run(case: str, isa_name: str | None) -> torch.Tensor:
    torch.manual_seed(0)  # the same inputs on every build
    if isa_name is None:
        return CASES[case]()
    with native.using_isa(isa_name):
        return CASES[case]()


@pytest.mark.skipif(not OTHERS, reason="this CPU runs one build of the kernels")
@pytest.mark.parametrize("other", OTHERS)
@pytest.mark.parametrize("case", CASES)
def test_every_build_this_cpu_runs_gives_the_same_results(case: str, other: str) -> None:
    expected, got = _run(case, None), _run(case, other)
    assert torch.isfinite(expected).all()
    if other == "portable" and ROUNDS_TWICE:
        scale = expected.abs().max().item() * (2e-4 if case == "decoder_prefill" else 1e-5)
        torch.testing.assert_close(got, expected, rtol=0, atol=scale)
    else:
        assert torch.equal(got, expected), f"{case}: {other} differs from {native.loaded_isa()}"


@pytest.mark.skipif(not EMULATED, reason="no SIMDe headers, or not an x86-64 AVX2 machine")
@pytest.mark.parametrize("emulated", EMULATED)
@pytest.mark.parametrize("case", CASES)
def test_the_paths_this_cpu_cannot_run_give_the_same_results_emulated(
    case: str, emulated: str
) -> None:
    expected, got = _run(case, None), _run(case, emulated)
    assert torch.equal(got, expected), f"{case}: {emulated} differs from {native.loaded_isa()}"
