"""The one place where exceptions become OpenAI error bodies and HTTP statuses.

Every route lets ladle's exceptions (`ladle.errors`) rise; the app's exception handler and the
streaming routes both call `to_error`, so a failure reads the same before and after a stream's
headers are sent. The two errors defined here belong to the service alone: they describe the
set of loaded models, which only the service has.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ladle.errors import (
    ConflictError,
    ContextLengthError,
    DownloadError,
    EngineClosedError,
    InvalidRequestError,
    LadleError,
    ModelLoadError,
    ModelNotFoundError,
    NotFoundError,
)
from ladle.protocol.openai import ErrorDetail, ErrorResponse

logger = logging.getLogger(__name__)


class ModelBusyError(LadleError):
    """An unload without `force` found requests in flight on the model."""


class CapacityError(LadleError):
    """A model cannot be loaded within `max_loaded_models` / `memory_budget_mb`."""


class RequestTooLargeError(LadleError):
    """A request body over the service's `max_body_mb` (server/limits.py)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the request body is over the limit of {limit >> 20} MB (max_body_mb)")


class DeadlineExceededError(LadleError):
    """A request ran past its deadline (its `timeout`, or the service's `request_timeout`)."""

    def __init__(self) -> None:
        super().__init__(
            "the request ran past its deadline (its timeout, or the service's request_timeout)"
        )


class OverloadedError(LadleError):
    """A model's queue is full: the request is refused at once, to be retried."""

    retry_after = 1  # seconds, sent as `Retry-After`


# The first row whose class matches wins, so subclasses come before their bases.
_TABLE: list[tuple[type[Exception], int, str, str | None]] = [
    (ContextLengthError, 400, "invalid_request_error", "context_length_exceeded"),
    (ConflictError, 409, "invalid_request_error", "conflict"),
    (InvalidRequestError, 400, "invalid_request_error", None),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (NotFoundError, 404, "invalid_request_error", "not_found"),
    (ModelBusyError, 409, "invalid_request_error", "model_busy"),
    (RequestTooLargeError, 413, "invalid_request_error", "request_too_large"),
    (CapacityError, 503, "server_error", "model_capacity"),
    (OverloadedError, 503, "server_error", "overloaded"),
    (DeadlineExceededError, 504, "server_error", "deadline_exceeded"),
    (EngineClosedError, 503, "server_error", "model_unloaded"),
    (DownloadError, 502, "server_error", "download_failed"),
    (ModelLoadError, 500, "server_error", "model_load_failed"),
    (LadleError, 500, "server_error", None),
]


def to_error(exc: Exception) -> tuple[int, ErrorResponse]:
    """The HTTP status and OpenAI error body for `exc` (any exception)."""
    if isinstance(exc, HTTPException):  # unknown route, wrong method
        return exc.status_code, _body(str(exc.detail), "invalid_request_error")
    for cls, status, kind, code in _TABLE:
        if isinstance(exc, cls):
            is_model = isinstance(exc, ModelNotFoundError)
            param = "model" if is_model else getattr(exc, "param", None)
            return status, _body(str(exc), kind, param, code)
    logger.error("unexpected error", exc_info=exc)
    return 500, _body("internal server error (see the service log)", "server_error")


def unauthorized() -> Response:
    """401 for a missing or wrong `Authorization: Bearer` key."""
    body = _body(
        "missing or incorrect API key; send it as 'Authorization: Bearer <key>'",
        "invalid_request_error",
        code="invalid_api_key",
    )
    return _response(401, body)


async def handle_exception(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: any error raised by a route becomes an OpenAI body."""
    return error_response(exc)


def error_response(exc: Exception) -> Response:
    """The OpenAI error response for `exc`, with `Retry-After` when there is one."""
    status, body = to_error(exc)
    response = _response(status, body)
    if isinstance(exc, OverloadedError):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def _body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))


def _response(status: int, body: ErrorResponse) -> Response:
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")
