"""Pieces every `ladle` command uses: option helpers, the download bar, tables."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ladle.store.cache import ModelCache
from ladle.store.download import DownloadProgress, download_model
from ladle.store.entry import CatalogEntry

NOT_RUNNING = "Model management service is not running."


def command_group(sub: Any, name: str, help: str) -> Any:
    """A command with subcommands (`ladle service ...`); alone, it prints its help."""
    parser = sub.add_parser(name, help=help)
    parser.set_defaults(func=None, group_parser=parser)
    return parser.add_subparsers(dest=f"{name}_command")


def cache_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="model cache (default: $LADLE_CACHE_DIR)"
    )


def json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def download_with_bar(
    entry: CatalogEntry, cache: ModelCache, *, token: str | None = None, force: bool = False
) -> Path:
    """Download `entry` unless it is cached, with a progress bar on a terminal."""
    if not force and cache.is_cached(entry):
        return cache.model_path(entry)
    with tqdm(
        desc=entry.id, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False
    ) as bar:

        def progress(p: DownloadProgress) -> None:
            bar.total = p.total
            bar.update(p.downloaded - bar.n)

        return download_model(entry, cache, token=token, force=force, progress=progress)


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def mark(flag: bool) -> str:
    return "yes" if flag else ""
