"""`ladle perplexity MODEL FILE`: how well a model, quantized or not, predicts a text."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ladle.builders import TextModelBuilder
from ladle.cli._common import cache_dir_option, download_with_bar
from ladle.errors import InvalidRequestError
from ladle.perplexity import DEFAULT_CONTEXT_LENGTH, perplexity
from ladle.store.cache import ModelCache
from ladle.store.catalog import Catalog


def add_perplexity(sub: Any) -> None:
    parser = sub.add_parser("perplexity", help="measure a model's perplexity on a text file")
    parser.add_argument("model", help="a GGUF file, a model folder, or an alias or id")
    parser.add_argument("file", type=Path, help="a UTF-8 text file")
    parser.add_argument(
        "--context",
        type=int,
        default=DEFAULT_CONTEXT_LENGTH,
        help=f"tokens per window (default: {DEFAULT_CONTEXT_LENGTH})",
    )
    parser.add_argument(
        "--stride", type=int, default=None, help="tokens between windows (default: context/2)"
    )
    parser.add_argument("--isq", default=None, help="quantize in place as it loads (e.g. Q4K)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    cache_dir_option(parser)
    parser.set_defaults(func=_perplexity)


def _perplexity(args: argparse.Namespace) -> int:
    text = _read_text(args.file)  # before loading: a wrong file fails at once
    path = Path(args.model).expanduser()
    if not path.exists():
        cache = ModelCache(args.cache_dir)
        path = download_with_bar(
            Catalog.load().get(args.model, cached_ids=cache.cached_ids()), cache
        )
    builder = TextModelBuilder(path).with_compile(False)  # scoring runs the eager forward
    if args.threads:
        builder.with_num_threads(args.threads)
    if args.isq:
        builder.with_isq(args.isq)
    with builder.build() as model, tqdm(desc="windows", unit="win", disable=None) as bar:

        def progress(done: int, total: int, ppl: float) -> None:
            bar.total = total
            bar.set_postfix(ppl=f"{ppl:.3f}")
            bar.update(done - bar.n)

        try:
            result = perplexity(
                model, text, context_length=args.context, stride=args.stride, progress=progress
            )
        except InvalidRequestError as e:
            if e.param != "text":
                raise
            raise InvalidRequestError(f"{args.file}: the text {e.message}") from e
    isq = f", ISQ {args.isq}" if args.isq else ""
    print(f"{path.name}{isq} on {args.file}")
    print(f"perplexity: {result.ppl:.4f} over {result.num_tokens} tokens")
    print(f"speed: {result.tokens_per_second:.1f} tokens/s")
    return 0


def _read_text(file: Path) -> str:
    if not file.is_file():
        raise InvalidRequestError(f"{file}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise InvalidRequestError(f"{file}: the file is empty")
    return text
