"""The service's OpenAPI 3.1 document, built from the routes themselves.

Each handler carries its `Operation` (`@documented(...)`, beside the code it describes): its
summary, the pydantic model of its body, of its answer, its query parameters and the error
statuses it returns. `openapi_document` walks the app's routes and turns those into paths,
and the models into `components/schemas` through pydantic's own JSON schema, so the document
cannot describe a body the route does not parse. A route without an `Operation` is an error
here, not a gap in the document; `tests/server/test_openapi.py` fuzzes the routes against
it with schemathesis.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import TypeAdapter
from starlette.routing import BaseRoute, Route

from ladle.protocol.openai import ErrorResponse

F = TypeVar("F", bound=Callable[..., Any])
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
REF = "#/components/schemas/{model}"
UPLOAD = {  # the file part of a multipart form, beside the body model's fields
    "type": "object",
    "properties": {"file": {"type": "string", "format": "binary"}},
    "required": ["file"],
}
ERROR_TEXT = {
    400: "Invalid request: the error's `param` names the field",
    401: "Missing or wrong API key",
    404: "No model, session or file with that id",
    409: "Valid, but not now: the model is busy, or calibration is not in that state",
    413: "The request body is over the service's max_body_mb",
    502: "A download source failed",
    503: "No capacity, a full queue (Retry-After), or the model was unloaded meanwhile",
    504: "The request ran past its deadline",
}


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Operation:
    """What one route takes and gives.

    `returns` is a type pydantic can describe (a model, `list[str]`, ...) sent as JSON;
    `media_type` a 200 body of another kind (`text/plain`, bytes); `streams` adds
    `text/event-stream` for a body with `"stream": true`.
    """

    summary: str
    tag: str
    body: Any = None
    body_required: bool = True
    body_media_type: str = "application/json"  # multipart/form-data: `body` + a `file` part
    returns: Any = None
    media_type: str | None = None
    streams: bool = False
    query: tuple[Query, ...] = ()
    path: dict[str, dict[str, Any]] | None = None  # a path parameter's schema, by name
    errors: tuple[int, ...] = (400,)
    description: str = ""


def documented(operation: Operation) -> Callable[[F], F]:
    """Attach `operation` to a route handler."""

    def mark(handler: F) -> F:
        handler.__operation__ = operation  # type: ignore[attr-defined]
        return handler

    return mark


def operation_of(route: Route) -> Operation | None:
    return getattr(route.endpoint, "__operation__", None)


class _Schemas:
    """Component schemas, gathered as operations name them."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def of(self, kind: Any, mode: str) -> dict[str, Any]:
        schema = TypeAdapter(kind).json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
        self.components.update(schema.pop("$defs", {}))
        title = schema.get("title")
        if schema.get("type") == "object" and isinstance(title, str) and "properties" in schema:
            self.components.setdefault(title, schema)  # a model: by reference, as pydantic would
            return {"$ref": REF.format(model=title)}
        return schema


def openapi_document(
    routes: Sequence[BaseRoute], *, title: str, version: str, secured: bool
) -> dict[str, Any]:
    """The document for `routes`; every `Route` must carry an `Operation`."""
    schemas = _Schemas()
    error = schemas.of(ErrorResponse, "serialization")
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        op = operation_of(route)
        if op is None:
            raise ValueError(f"route {route.path} has no Operation: add @documented(...)")
        path, parameters = _path(route.path, op.path or {})
        for method in sorted((route.methods or set()) - {"HEAD"}):
            entry: dict[str, Any] = {
                "summary": op.summary,
                "operationId": f"{method.lower()}_{_slug(path)}",
                "tags": [op.tag],
                "responses": _responses(op, schemas, error, secured and route.path != "/health"),
            }
            if op.description:
                entry["description"] = op.description
            params = parameters + [
                {"name": q.name, "in": "query", "required": False, "schema": q.schema}
                | ({"description": q.description} if q.description else {})
                for q in op.query
            ]
            if params:
                entry["parameters"] = params
            if op.body is not None:
                schema = schemas.of(op.body, "validation")
                if op.body_media_type == "multipart/form-data":
                    schema = {"allOf": [schema, UPLOAD]}
                entry["requestBody"] = {
                    "required": op.body_required,
                    "content": {op.body_media_type: {"schema": schema}},
                }
            paths.setdefault(path, {})[method.lower()] = entry
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schemas.components},
    }
    if secured:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


def _responses(
    op: Operation, schemas: _Schemas, error: dict[str, Any], secured: bool
) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if op.returns is not None:
        content["application/json"] = {"schema": schemas.of(op.returns, "serialization")}
    if op.media_type is not None:
        content[op.media_type] = {"schema": {"type": "string"}}
    if op.streams:  # each event: `data:` a chunk as JSON, an error, or `[DONE]`
        content["text/event-stream"] = {"schema": SSE_EVENT}
    ok: dict[str, Any] = {"description": "OK"}
    if content:
        ok["content"] = content
    responses = {"200": ok}
    implied = (*((401,) if secured else ()), *((413,) if op.body is not None else ()))
    for status in sorted({*op.errors, *implied}):
        responses[str(status)] = {
            "description": ERROR_TEXT[status],
            "content": {"application/json": {"schema": error}},
        }
    return responses


def _path(template: str, schemas: dict[str, dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Starlette's `{name:convertor}` as OpenAPI's `{name}`, and its path parameters."""
    names = re.findall(r"{(\w+)(?::\w+)?}", template)
    path = re.sub(r"{(\w+)(?::\w+)?}", r"{\1}", template)
    any_text = {"type": "string", "minLength": 1}
    params = [
        {"name": n, "in": "path", "required": True, "schema": schemas.get(n, any_text)}
        for n in names
    ]
    return path, params


def _slug(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", path.lower()).strip("_")
