"""The native kernels on every instruction set this CPU runs, beside torch's own op for each.

    python benchmarks/bench_kernels.py [--threads 2] [--rounds 5]

For SmolLM2-135M's shapes: the int4 and int8 matmuls (1 row: a decode step; 128 rows: a
prefill chunk), the float16 head, decode attention over 600 cached positions, RMSNorm.
Attention is called from Python here, where the model's step calls it from C++: the row at
1 position is that call's own cost, to subtract (the cache is hot, as it is not in a step). Each
op runs on each build (`native.using_isa`) and on torch's counterpart (int4: torch's
`_weight_int4pack_mm_for_cpu` with bfloat16 activations; float16 and int8: `F.linear` on the
dequantized float32 weight; attention: `scaled_dot_product_attention`), in rounds that visit
every candidate in turn, and prints the best microseconds per call of all rounds (another
process sharing the cores only ever slows a call down). torch's row runs at the capability
torch chose for this CPU; run with `ATEN_CPU_CAPABILITY=default` to see what torch does on a
CPU without AVX2, the one the portable build is for. A portable build slower than torch on
some op is a reason to call torch there.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ladle.engine.kernels import isa, native

Op = Callable[[], object]


def best_us(op: Op, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        op()
    return (time.perf_counter() - start) / calls * 1e6


def cases() -> dict[str, tuple[Op, Op, int]]:
    """name -> (the native call, torch's counterpart, calls per timing)."""
    torch.manual_seed(0)
    out: dict[str, tuple[Op, Op, int]] = {}
    for rows, cols in ((3072, 576), (576, 1536)):
        q = torch.randint(0, 256, (rows // 16, cols // 2, 16), dtype=torch.uint8)
        scales = (torch.rand(rows // 16, cols // 32, 2, 16) * 0.01).half()
        int4 = native.KernelWeight.of(q, scales)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (rows, cols), dtype=torch.int32), 1
        )
        sz = torch.rand(cols // 32, rows, 2, dtype=torch.bfloat16)
        for n in (1, 128):
            x = torch.randn(n, cols)
            out[f"int4 {rows}x{cols}, {n} rows"] = (
                lambda x=x, w=int4: native.linear(x, w),
                lambda x=x, p=packed, s=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x.to(torch.bfloat16), p, 32, s
                ),
                200 if n == 1 else 10,
            )
    head = torch.randn(49152, 576) * 0.05
    q8 = torch.randint(-128, 128, (49152 // 16, 288, 32), dtype=torch.int8)
    int8 = native.KernelWeight.of(q8, (torch.rand(49152 // 16, 18, 16) * 0.01).half())
    half = native.KernelWeight.of(head.half())
    x = torch.randn(1, 576)
    out["int8 head 49152x576, 1 row"] = (lambda: native.linear(x, int8), lambda: x @ head.T, 20)
    out["fp16 head 49152x576, 1 row"] = (lambda: native.linear(x, half), lambda: x @ head.T, 20)
    q = torch.randn(9, 64)
    keys, values = torch.randn(3, 600, 64).half(), torch.randn(3, 600, 64).half()

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q[None, :, None], keys[None].float(), values[None].float(), enable_gqa=True
        )

    out["decode attention, 600 positions"] = (
        lambda: native.decode_attention(q, keys, values, 0.125),
        sdpa,
        200,
    )
    one_k, one_v = keys[:, :1].contiguous(), values[:, :1].contiguous()
    out["attention call cost, 1 position"] = (
        lambda: native.decode_attention(q, one_k, one_v, 0.125),
        lambda: F.scaled_dot_product_attention(
            q[None, :, None], one_k[None].float(), one_v[None].float(), enable_gqa=True
        ),
        200,
    )
    rows, w = torch.randn(128, 576), torch.randn(576)
    out["rms_norm 128x576"] = (
        lambda: native.rms_norm(rows, w, 1e-5),
        lambda: F.rms_norm(rows, (576,), w, 1e-5),
        200,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.load():
        raise SystemExit("the native kernels did not load")
    native.set_num_threads(args.threads)
    isas = isa.runnable_isas()
    print(
        f"CPU: {isa.cpu_name()}; threads: {args.threads}; torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}); best of {args.rounds} rounds, us/call\n"
    )
    candidates = [*isas, "torch"]
    print(f"{'op':<36}" + "".join(f"{c:>13}" for c in candidates))
    for name, (call, reference, calls) in cases().items():
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(args.rounds):
            for candidate in candidates:
                if candidate == "torch":
                    best[candidate] = min(best[candidate], best_us(reference, calls))
                    continue
                with native.using_isa(candidate):
                    call()  # warm
                    best[candidate] = min(best[candidate], best_us(call, calls))
        print(f"{name:<36}" + "".join(f"{best[c]:>13.1f}" for c in candidates))


if __name__ == "__main__":
    main()
