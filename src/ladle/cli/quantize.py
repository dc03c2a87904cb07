"""`ladle quantize SRC --type Q4K --out F.gguf [--imatrix M]`: write a quantized GGUF file from a
GGUF file or a Hugging Face safetensors folder."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ladle.engine.quant.gguf_export import write_quantized_gguf
from ladle.engine.quant.isq import GGML_ISQ
from ladle.errors import InvalidRequestError


def add_quantize(sub: Any) -> None:
    parser = sub.add_parser("quantize", help="write a GGUF file quantized to another type")
    parser.add_argument(
        "source", type=Path, help="a GGUF file, or a Hugging Face safetensors model folder"
    )
    parser.add_argument(
        "--type", required=True, help=f"{', '.join(GGML_ISQ)} (case-insensitive), or bits 4, 8"
    )
    parser.add_argument("--out", type=Path, required=True, help="the GGUF file to write")
    parser.add_argument(
        "--imatrix", type=Path, default=None, help="imatrix.dat, GGUF imatrix or .cimatrix"
    )
    parser.set_defaults(func=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    if args.out.resolve() == args.source.resolve():
        raise InvalidRequestError("must differ from the source file", "out")
    with tqdm(desc="quantizing", unit="tensor", disable=None) as bar:

        def progress(names: Iterable[str]) -> Iterable[str]:
            items = list(names)
            bar.total = len(items)
            for name in items:
                bar.set_postfix_str(name)
                yield name
                bar.update()

        try:
            counts = write_quantized_gguf(
                args.source.expanduser(), args.out.expanduser(), args.type, args.imatrix, progress
            )
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
    summary = ", ".join(f"{n} {t}" for t, n in counts.most_common())
    print(f"wrote {args.out} ({summary})")
    return 0
