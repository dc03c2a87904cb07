"""The `ladle` command line. Only this module prints; everything else returns or logs.

ladle run [MODEL] [PROMPT]                     chat in the terminal, or answer one prompt
ladle serve                                    run the service in the foreground
ladle service start|stop|restart|status|ps     manage the background service
ladle model list|info|download|load|unload     the catalog, and models in the service
ladle cache list|location|remove               the downloaded models
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm import tqdm

from ladle import envconfig, service
from ladle.builders import TextModelBuilder
from ladle.cache import ModelCache
from ladle.catalog import DEFAULT_CHAT_MODEL, Catalog, CatalogEntry
from ladle.download import DownloadProgress, download_model
from ladle.errors import LadleError, ModelNotFoundError, ServiceError
from ladle.manager import FoundryLocalManager
from ladle.model import Model
from ladle.server.app import ServerSettings, serve
from ladle.service import ServiceState

NOT_RUNNING = "Model management service is not running."
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        (getattr(args, "group_parser", None) or parser).print_help()
        return 2
    try:
        return int(args.func(args))
    except (LadleError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ladle", description="Run local AI models.")
    sub = parser.add_subparsers(dest="command")
    _add_run(sub)
    _add_serve(sub)
    _add_service(sub)
    _add_model(sub)
    _add_cache(sub)
    return parser


def _group(sub: Any, name: str, help: str) -> Any:
    """A command with subcommands (`ladle service ...`); alone, it prints its help."""
    parser = sub.add_parser(name, help=help)
    parser.set_defaults(func=None, group_parser=parser)
    return parser.add_subparsers(dest=f"{name}_command")


def _cache_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="model cache (default: $LADLE_CACHE_DIR)"
    )


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


# ---------------------------------------------------------------- ladle run


def _add_run(sub: Any) -> None:
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
    _cache_dir_option(run)
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    path = Path(args.model).expanduser()
    if not path.exists():
        cache = ModelCache(args.cache_dir)
        path = _download(Catalog.load().get(args.model, cached_ids=cache.cached_ids()), cache)
    started = time.perf_counter()
    builder = TextModelBuilder(path)
    if args.threads:
        builder.with_num_threads(args.threads)
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
        if args.prompt is None and sys.stdin.isatty():
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


# ---------------------------------------------------------------- ladle serve / service


def _add_serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the model service in the foreground")
    serve.add_argument("--host", default=service.DEFAULT_HOST, help="interface to bind")
    serve.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    serve.add_argument(
        "--api-key",
        default=None,
        help=f"require this Bearer key (default: ${envconfig.API_KEY_VAR})",
    )
    serve.add_argument("--ttl", type=float, default=600.0, help="idle seconds before unloading")
    _cache_dir_option(serve)
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # uvicorn re-raises SIGTERM once it has shut down: leave through `finally` blocks instead
    signal.signal(signal.SIGTERM, _exit_quietly)
    cache_dir = args.cache_dir or envconfig.cache_dir()
    api_key = args.api_key or envconfig.api_key()
    settings = ServerSettings(
        host=args.host, port=args.port, api_key=api_key, cache_dir=cache_dir, default_ttl=args.ttl
    )
    with service.registration(cache_dir, api_key) as on_ready:

        def ready(url: str) -> None:
            on_ready(url)
            print(f"Model management service is running on {url}/openai/status", flush=True)

        serve(settings, on_ready=ready)
    return 0


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _add_service(sub: Any) -> None:
    group = _group(sub, "service", "manage the background model service")
    start = group.add_parser("start", help="start the service in the background")
    restart = group.add_parser("restart", help="stop the service, then start it again")
    for parser in (start, restart):
        parser.add_argument("--port", type=int, default=None, help="pin the TCP port")
        parser.add_argument("--api-key", default=None, help="require this Bearer key")
    start.set_defaults(func=_service_start)
    restart.set_defaults(func=_service_restart)
    stop = group.add_parser("stop", help="stop the service")
    stop.set_defaults(func=_service_stop)
    status = group.add_parser("status", help="say whether the service runs, and where")
    _json_option(status)
    status.set_defaults(func=_service_status)
    for parser in (start, restart, stop, status):
        _cache_dir_option(parser)
    ps = group.add_parser("ps", help="list the models loaded in the service")
    _json_option(ps)
    ps.set_defaults(func=_service_ps)


def _service_start(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or envconfig.cache_dir()
    running = service.find(cache_dir)
    if running is not None:
        print(f"Model management service is already running on {running.status_url}")
        return 0
    state = service.start(port=args.port or 0, cache_dir=cache_dir, api_key=args.api_key)
    print(f"Model management service is running on {state.status_url}")
    return 0


def _service_restart(args: argparse.Namespace) -> int:
    stopped = service.stop(args.cache_dir)
    port = args.port or (stopped.port if stopped else 0)
    api_key = args.api_key or (stopped.api_key if stopped else None)
    cache_dir = Path(stopped.cache_dir) if stopped and not args.cache_dir else args.cache_dir
    state = service.start(port=port, cache_dir=cache_dir, api_key=api_key)
    print(f"Model management service is running on {state.status_url}")
    return 0


def _service_stop(args: argparse.Namespace) -> int:
    stopped = service.stop(args.cache_dir)
    print(
        NOT_RUNNING if stopped is None else f"Model management service stopped (pid {stopped.pid})."
    )
    return 0


def _service_status(args: argparse.Namespace) -> int:
    state = service.find(args.cache_dir)
    if args.json:
        print(json.dumps(_state_json(state), indent=2))
    elif state is None:
        print(NOT_RUNNING)
    else:
        print(f"Model management service is running on {state.status_url}")
    return 0 if state is not None else 1


def _service_ps(args: argparse.Namespace) -> int:
    with FoundryLocalManager(bootstrap=False) as manager:
        loaded = manager.list_loaded_models()
    if args.json:
        print(json.dumps([{"alias": m.alias, "id": m.id} for m in loaded], indent=2))
    elif not loaded:
        print("No models are loaded.")
    else:
        _table(["ALIAS", "MODEL ID"], [[m.alias, m.id] for m in loaded])
    return 0


def _state_json(state: ServiceState | None) -> dict[str, Any]:
    if state is None:
        return {"running": False}
    return {
        "running": True,
        "url": state.uri,
        "statusUrl": state.status_url,
        "endpoint": f"{state.uri}/v1",
        "pid": state.pid,
        "port": state.port,
        "cacheDir": state.cache_dir,
        "logFile": str(service.log_file(Path(state.cache_dir))),
    }


# ---------------------------------------------------------------- ladle model


def _add_model(sub: Any) -> None:
    group = _group(sub, "model", "the model catalog, and models in the service")
    listing = group.add_parser("list", help="list the catalog")
    _json_option(listing)
    _cache_dir_option(listing)
    listing.set_defaults(func=_model_list)
    info = group.add_parser("info", help="show one catalog entry")
    info.add_argument("model", help="alias or model id")
    _json_option(info)
    _cache_dir_option(info)
    info.set_defaults(func=_model_info)
    download = group.add_parser("download", help="download a model into the cache")
    download.add_argument("model", help="alias or model id")
    download.add_argument("--force", action="store_true", help="download again if cached")
    download.add_argument("--token", default=None, help="hub token (default: $LADLE_HF_TOKEN)")
    _cache_dir_option(download)
    download.set_defaults(func=_model_download)
    load = group.add_parser("load", help="load a model in the service (starting it if needed)")
    load.add_argument("model", help="alias or model id")
    load.add_argument("--ttl", type=int, default=600, help="idle seconds before unloading")
    load.set_defaults(func=_model_load)
    unload = group.add_parser("unload", help="unload a model from the service")
    unload.add_argument("model", help="alias or model id")
    unload.add_argument("--force", action="store_true", help="end its requests in flight")
    unload.set_defaults(func=_model_unload)


def _model_list(args: argparse.Namespace) -> int:
    cache = ModelCache(args.cache_dir)
    entries = Catalog.load().entries()
    if args.json:
        print(json.dumps([_entry_json(e, cache) for e in entries], indent=2))
        return 0
    rows = [
        [e.alias, e.device_type, e.task, f"{e.file_size_mb} MB", _mark(cache.is_cached(e)), e.id]
        for e in entries
    ]
    _table(["ALIAS", "DEVICE", "TASK", "SIZE", "CACHED", "MODEL ID"], rows)
    return 0


def _model_info(args: argparse.Namespace) -> int:
    cache = ModelCache(args.cache_dir)
    entry = Catalog.load().get(args.model, cached_ids=cache.cached_ids())
    raw = _entry_json(entry, cache)
    if args.json:
        print(json.dumps(raw, indent=2))
        return 0
    for key, value in raw.items():
        if key == "files":
            for f in value:
                print(f"{'file':<22}{f['name']} ({f['size']} bytes) from {f['source']}")
        elif value not in (None, "", {}):
            print(f"{key:<22}{value}")
    return 0


def _model_download(args: argparse.Namespace) -> int:
    cache = ModelCache(args.cache_dir)
    entry = Catalog.load().get(args.model, cached_ids=cache.cached_ids())
    path = _download(entry, cache, token=args.token, force=args.force)
    print(f"{entry.id} is in {path}")
    return 0


def _model_load(args: argparse.Namespace) -> int:
    with FoundryLocalManager() as manager:
        info = manager.load_model(args.model, ttl=args.ttl)
        print(f"Model {info.id} loaded on {manager.endpoint}")
    return 0


def _model_unload(args: argparse.Namespace) -> int:
    with FoundryLocalManager(bootstrap=False) as manager:
        if not manager.is_service_running():
            raise ServiceError(NOT_RUNNING)
        info = manager.get_model_info(args.model, raise_on_not_found=True)
        assert info is not None  # raise_on_not_found
        manager.unload_model(info.id, force=args.force)
        print(f"Model {info.id} unloaded")
    return 0


def _download(
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


def _entry_json(entry: CatalogEntry, cache: ModelCache) -> dict[str, Any]:
    return {**entry.to_json(), "cached": cache.is_cached(entry)}


# ---------------------------------------------------------------- ladle cache


def _add_cache(sub: Any) -> None:
    group = _group(sub, "cache", "the downloaded models")
    listing = group.add_parser("list", help="list the downloaded models")
    _json_option(listing)
    listing.set_defaults(func=_cache_list)
    location = group.add_parser("location", help="print the cache folder")
    location.set_defaults(func=_cache_location)
    remove = group.add_parser("remove", help="delete a downloaded model")
    remove.add_argument("model", help="alias or model id")
    remove.set_defaults(func=_cache_remove)
    for parser in (listing, location, remove):
        _cache_dir_option(parser)


def _cache_list(args: argparse.Namespace) -> int:
    cache = ModelCache(args.cache_dir)
    cached = cache.list()
    if args.json:
        found = [{"id": m.id, "path": str(m.path), "size_bytes": m.size_bytes} for m in cached]
        print(json.dumps(found, indent=2))
    elif not cached:
        print(f"No models in {cache.root}")
    else:
        rows = [[m.id, f"{m.size_bytes / 2**20:.0f} MB", str(m.path)] for m in cached]
        _table(["MODEL ID", "SIZE", "PATH"], rows)
    return 0


def _cache_location(args: argparse.Namespace) -> int:
    print(ModelCache(args.cache_dir).root)
    return 0


def _cache_remove(args: argparse.Namespace) -> int:
    cache = ModelCache(args.cache_dir)
    cached = cache.cached_ids()
    entry = Catalog.load().find(args.model, cached_ids=cached)
    model_id = entry.id if entry is not None else args.model
    if not cache.remove(model_id):
        raise ModelNotFoundError(args.model, f"not in the cache at {cache.root}")
    print(f"Removed {model_id}")
    return 0


# ---------------------------------------------------------------- output


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _mark(flag: bool) -> str:
    return "yes" if flag else ""
