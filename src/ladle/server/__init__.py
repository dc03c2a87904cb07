"""The local model service: an OpenAI-compatible and Foundry Local-compatible HTTP API.

    from ladle.server import ServerSettings, serve
    serve(ServerSettings(port=5273))

Layout, after Ollama's `server/`: `app.py` wires settings, routes and middleware;
`openai_routes.py` and `foundry_routes.py` hold the handlers; `lifecycle.py` decides which
models are loaded; `errors.py` maps exceptions to OpenAI error bodies; `metrics.py` counts.
"""

from ladle.server.app import ServerSettings, create_app, serve

__all__ = ["ServerSettings", "create_app", "serve"]
