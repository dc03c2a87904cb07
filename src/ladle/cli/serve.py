"""`ladle serve` and `ladle service ...`: the model service, in the foreground or not."""

from __future__ import annotations

import argparse
import json
import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from ladle import envconfig
from ladle.cli._common import (
    NOT_RUNNING,
    cache_dir_option,
    command_group,
    json_option,
    table,
)
from ladle.manager import service
from ladle.manager.service import ServiceState
from ladle.server.app import ServerSettings, serve

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the model service in the foreground")
    serve.add_argument("--host", default=service.DEFAULT_HOST, help="interface to bind")
    serve.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    serve.add_argument(
        "--api-key",
        default=None,
        help=f"require this Bearer key (default: ${envconfig.API_KEY_VAR})",
    )
    serve.add_argument("--ttl", type=float, default=600.0, help="idle seconds before unloading")
    serve.add_argument(
        "--max-num-seqs", type=int, default=16, help="sequences a model decodes together"
    )
    serve.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help="each model's KV cache budget in tokens (default: one full context)",
    )
    serve.add_argument(
        "--kv-cache-dtype",
        choices=("f16", "f32"),
        default="f16",
        help="what each model's KV cache stores keys and values in (default: f16, half of f32)",
    )
    serve.add_argument("--threads", type=int, default=None, help="CPU threads per model")
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds a completion may take (504 past it; a request's `timeout` may ask less)",
    )
    serve.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="seconds a stream waits on a client that reads nothing before cutting it off",
    )
    serve.add_argument(
        "--max-body-mb", type=int, default=64, help="largest request body taken (413 past it)"
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="sequences (n per request) that may wait beyond --max-num-seqs; past them: 503",
    )
    serve.add_argument(
        "--mcp-config",
        type=Path,
        default=None,
        help='MCP servers whose tools every model may call: a {"mcpServers": {...}} JSON file',
    )
    serve.add_argument(
        "--sessions-db",
        type=Path,
        default=None,
        help="SQLite file that sessions persist in (default: $LADLE_HOME/sessions.db)",
    )
    serve.add_argument(
        "--max-sessions", type=int, default=1000, help="sessions kept (least recent go first)"
    )
    serve.add_argument(
        "--session-ttl",
        type=float,
        default=30 * 86400.0,
        help="seconds a session may stay idle before it is dropped (default: 30 days)",
    )
    serve.add_argument(
        "--session-max-mb",
        type=int,
        default=1024,
        help="MB that all sessions and their files may take (least recent go first)",
    )
    serve.add_argument(
        "--max-tool-rounds",
        type=int,
        default=8,
        help="rounds of server-side tool calls per request, by default",
    )
    cache_dir_option(serve)
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # uvicorn re-raises SIGTERM once it has shut down: leave through `finally` blocks instead
    signal.signal(signal.SIGTERM, _exit_quietly)
    cache_dir = args.cache_dir or envconfig.cache_dir()
    api_key = args.api_key or envconfig.api_key()
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=api_key,
        cache_dir=cache_dir,
        default_ttl=args.ttl,
        max_num_seqs=args.max_num_seqs,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_dtype=args.kv_cache_dtype,
        num_threads=args.threads,
        max_queue=args.max_queue,
        max_body_mb=args.max_body_mb,
        request_timeout=args.request_timeout,
        stall_timeout=args.stall_timeout,
        mcp_config=args.mcp_config,
        sessions_db=args.sessions_db or envconfig.home() / "sessions.db",
        max_sessions=args.max_sessions,
        session_ttl=args.session_ttl,
        session_max_mb=args.session_max_mb,
        max_tool_rounds=args.max_tool_rounds,
    )
    with service.registration(cache_dir, api_key) as on_ready:

        def ready(url: str) -> None:
            on_ready(url)
            print(f"Model management service is running on {url}/openai/status", flush=True)

        serve(settings, on_ready=ready)
    return 0


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def add_service(sub: Any) -> None:
    group = command_group(sub, "service", "manage the background model service")
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
    json_option(status)
    status.set_defaults(func=_service_status)
    for parser in (start, restart, stop, status):
        cache_dir_option(parser)
    ps = group.add_parser("ps", help="list the models loaded in the service")
    json_option(ps)
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
    from ladle.manager import FoundryLocalManager  # on use: see ladle/__init__.py

    with FoundryLocalManager(bootstrap=False) as manager:
        loaded = manager.list_loaded_models()
    if args.json:
        print(json.dumps([{"alias": m.alias, "id": m.id} for m in loaded], indent=2))
    elif not loaded:
        print("No models are loaded.")
    else:
        table(["ALIAS", "MODEL ID"], [[m.alias, m.id] for m in loaded])
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
