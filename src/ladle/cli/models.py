"""`ladle model ...` and `ladle cache ...`: the catalog, the service's models, the cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ladle.cli._common import (
    NOT_RUNNING,
    cache_dir_option,
    command_group,
    download_with_bar,
    json_option,
    mark,
    table,
)
from ladle.errors import ModelNotFoundError, ServiceError
from ladle.store.cache import ModelCache
from ladle.store.catalog import Catalog
from ladle.store.entry import CatalogEntry


def add_model(sub: Any) -> None:
    group = command_group(sub, "model", "the model catalog, and models in the service")
    listing = group.add_parser("list", help="list the catalog")
    json_option(listing)
    cache_dir_option(listing)
    listing.set_defaults(func=_model_list)
    info = group.add_parser("info", help="show one catalog entry")
    info.add_argument("model", help="alias or model id")
    json_option(info)
    cache_dir_option(info)
    info.set_defaults(func=_model_info)
    download = group.add_parser("download", help="download a model into the cache")
    download.add_argument("model", help="alias or model id")
    download.add_argument("--force", action="store_true", help="download again if cached")
    download.add_argument("--token", default=None, help="hub token (default: $LADLE_HF_TOKEN)")
    cache_dir_option(download)
    download.set_defaults(func=_model_download)
    load = group.add_parser("load", help="load a model in the service (starting it if needed)")
    load.add_argument("model", help="alias or model id")
    load.add_argument("--ttl", type=int, default=600, help="idle seconds before unloading")
    load.set_defaults(func=_model_load)
    unload = group.add_parser("unload", help="unload a model from the service")
    unload.add_argument("model", help="alias or model id")
    unload.add_argument("--force", action="store_true", help="end its requests in flight")
    unload.set_defaults(func=_model_unload)
    register = group.add_parser("register", help="add a local GGUF file or model folder")
    register.add_argument("alias", help="the name to run it by")
    register.add_argument(
        "path", type=Path, help="a GGUF file, a Hugging Face folder, a Piper .onnx or a Whisper"
    )
    register.add_argument(
        "--task",
        default="chat-completion",
        choices=("chat-completion", "embeddings"),
        help="of a text model (voices and Whispers are known by their files)",
    )
    register.set_defaults(func=_model_register)
    unregister = group.add_parser("unregister", help="forget a registered local model")
    unregister.add_argument("alias", help="its alias or id")
    unregister.set_defaults(func=_model_unregister)


def _model_list(args: argparse.Namespace) -> int:
    cache = ModelCache(args.cache_dir)
    entries = Catalog.load().entries()
    if args.json:
        print(json.dumps([_entry_json(e, cache) for e in entries], indent=2))
        return 0
    rows = [
        [e.alias, e.device_type, e.task, f"{e.file_size_mb} MB", mark(cache.is_cached(e)), e.id]
        for e in entries
    ]
    table(["ALIAS", "DEVICE", "TASK", "SIZE", "CACHED", "MODEL ID"], rows)
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
    path = download_with_bar(entry, cache, token=args.token, force=args.force)
    print(f"{entry.id} is in {path}")
    return 0


def _model_load(args: argparse.Namespace) -> int:
    from ladle.manager import FoundryLocalManager  # on use: see ladle/__init__.py

    with FoundryLocalManager() as manager:
        info = manager.load_model(args.model, ttl=args.ttl)
        print(f"Model {info.id} loaded on {manager.endpoint}")
    return 0


def _model_unload(args: argparse.Namespace) -> int:
    from ladle.manager import FoundryLocalManager  # on use: see ladle/__init__.py

    with FoundryLocalManager(bootstrap=False) as manager:
        if not manager.is_service_running():
            raise ServiceError(NOT_RUNNING)
        info = manager.get_model_info(args.model, raise_on_not_found=True)
        assert info is not None  # raise_on_not_found
        manager.unload_model(info.id, force=args.force)
        print(f"Model {info.id} unloaded")
    return 0


def _model_register(args: argparse.Namespace) -> int:
    if not args.path.exists():
        raise ModelNotFoundError(str(args.path), "no such file or folder")
    entry = Catalog.load().register_local(args.alias, args.path, task=args.task)
    print(f"Registered {entry.id} -> {entry.local_path}")
    return 0


def _model_unregister(args: argparse.Namespace) -> int:
    if not Catalog.load().unregister_local(args.alias):
        raise ModelNotFoundError(args.alias, "no registered local model has that name")
    print(f"Unregistered {args.alias}")
    return 0


def _entry_json(entry: CatalogEntry, cache: ModelCache) -> dict[str, Any]:
    return {**entry.to_json(), "cached": cache.is_cached(entry)}


def add_cache(sub: Any) -> None:
    group = command_group(sub, "cache", "the downloaded models")
    listing = group.add_parser("list", help="list the downloaded models")
    json_option(listing)
    listing.set_defaults(func=_cache_list)
    location = group.add_parser("location", help="print the cache folder")
    location.set_defaults(func=_cache_location)
    remove = group.add_parser("remove", help="delete a downloaded model")
    remove.add_argument("model", help="alias or model id")
    remove.set_defaults(func=_cache_remove)
    for parser in (listing, location, remove):
        cache_dir_option(parser)


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
        table(["MODEL ID", "SIZE", "PATH"], rows)
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
