"""`ladle run`: chat in the terminal, or answer one prompt and exit."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ladle.builders import TextModelBuilder
from ladle.cli._common import (
    cache_dir_option,
    download_with_bar,
)
from ladle.model import Model
from ladle.store.cache import ModelCache
from ladle.store.catalog import DEFAULT_CHAT_MODEL, Catalog


def add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="chat with a model, or complete one prompt")
    run.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_CHAT_MODEL,
        help=f"a GGUF file, a model folder, or an alias or id (default: {DEFAULT_CHAT_MODEL})",
    )
    run.add_argument("prompt", nargs="?", help="answer this prompt and exit (else chat)")
    run.add_argument("--temperature", type=float, default=0.7)
    run.add_argument("--top-p", type=float, default=None)
    run.add_argument("--max-tokens", type=int, default=None)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--system", default=None, help="system prompt")
    run.add_argument("--raw", action="store_true", help="complete the prompt, no chat template")
    run.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    cache_dir_option(run)
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    path = Path(args.model).expanduser()
    if not path.exists():
        cache = ModelCache(args.cache_dir)
        path = download_with_bar(
            Catalog.load().get(args.model, cached_ids=cache.cached_ids()), cache
        )
    started = time.perf_counter()
    builder = TextModelBuilder(path)
    if args.threads:
        builder.with_num_threads(args.threads)
    interactive = args.prompt is None and sys.stdin.isatty()
    if not interactive:  # one answer is over before a compiled step would be ready
        builder.with_compile(False)
    model = builder.build()
    if sys.stderr.isatty():
        print(f"loaded {path.name} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    with model:
        sampling: dict[str, Any] = {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
        }
        if interactive:
            return _interactive(model, args.system, sampling)
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        if args.raw:
            stream: Iterator[str] = (
                c.choices[0].text
                for c in model.stream_completion_request({"prompt": prompt, **sampling})
            )
        else:
            messages = _with_system(args.system, [{"role": "user", "content": prompt}])
            stream = _chat_text(model, messages, sampling)
        for text in stream:
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _interactive(model: Model, system: str | None, sampling: dict[str, Any]) -> int:
    print("Chatting with the model. Ctrl-D or /exit to quit, /clear to forget.", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/clear":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        for text in _chat_text(model, _with_system(system, history), sampling):
            reply += text
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


def _with_system(system: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def _chat_text(
    model: Model, messages: list[dict[str, str]], sampling: dict[str, Any]
) -> Iterator[str]:
    request = {"messages": messages, **sampling}
    for chunk in model.stream_chat_request(request):
        for choice in chunk.choices:
            if choice.delta.content:
                yield choice.delta.content
