"""Matmul kernels an ISQ layer can run on, per weight format, at SmolLM2-135M's shapes.

    python benchmarks/bench_isq_kernels.py [--threads 2] [--rows 1 16]

Prints the best-of-30 microseconds per call for `rows` activations of fp32 (a decode step is 1 row,
a prefill chunk many): the candidates `Linear` chooses between for 8-bit, 4-bit and 16-bit
weights. The numbers in `ladle.engine.layers.linear`'s docstring come from this script.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in)


def timed(fn: Callable[[], torch.Tensor], repeat: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6  # min: other processes share these cores


def candidates(w: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    n, k = w.shape
    scale = w.abs().amax(dim=1) / 127
    q8 = (w / scale[:, None]).round().to(torch.int8)
    qw = torch.quantize_per_channel(
        w, scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8
    )
    packed8 = torch.ops.quantized.linear_prepack(qw, None)
    w_bf16, w_f16 = w.to(torch.bfloat16), w.to(torch.float16)
    x_bf16 = x.to(torch.bfloat16)
    q4 = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    sz32 = torch.rand(k // 32, n, 2, dtype=torch.bfloat16)
    sz64 = torch.rand(k // 64, n, 2, dtype=torch.bfloat16)
    return {
        "fp32 F.linear": lambda: F.linear(x, w),
        "bf16 F.linear": lambda: F.linear(x.to(torch.bfloat16), w_bf16).float(),
        "fp16 F.linear": lambda: F.linear(x.to(torch.float16), w_f16).float(),
        "bf16 w upcast fp32": lambda: F.linear(x, w_bf16.float()),
        "int8 fbgemm dynamic": lambda: torch.ops.quantized.linear_dynamic(x, packed8),
        "int8 _weight_int8pack_mm": lambda: torch._weight_int8pack_mm(
            x_bf16, q8, scale.to(torch.bfloat16)
        ).float(),
        "int4 g32": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), packed4, 32, sz32
        ).float(),
        "int4 g64": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), packed4, 64, sz64
        ).float(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for rows in args.rows:
        header = f"rows={rows}"
        table: dict[str, list[float]] = {}
        for n, k in SHAPES:
            w = torch.randn(n, k) * 0.02
            x = torch.randn(rows, k)
            for name, fn in candidates(w, x).items():
                table.setdefault(name, []).append(timed(fn))
        cols = "".join(f"{f'{n}x{k}':>14}" for n, k in SHAPES)
        print(f"{header:<26}{cols}   (µs, best of 30; threads={args.threads})")
        for name, values in table.items():
            print(f"{name:<26}" + "".join(f"{v:>14.0f}" for v in values))
        print()


if __name__ == "__main__":
    main()
