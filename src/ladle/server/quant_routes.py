"""In-place quantization over HTTP, as mistral.rs's server offers it.

    POST /re_isq               {"model"?, "ggml_type": "Q4K"}          re-quantize while serving
    POST /calibration/start    {"model"?}                               collect activation stats
    GET  /calibration/status   ?model=...                               tokens seen per layer
    POST /calibration/apply    {"model"?, "save_cimatrix"?: "path"}     re-quantize with them

The model is named as OpenAI's routes name it, by `model`; it may be left out when exactly one
model is loaded (mistral.rs serves one). Errors are OpenAI error bodies (`server/errors.py`):
a bad type, calls in the wrong order and a model not quantized in place are 400s.
`save_cimatrix` is a path on the server's file system, written by the service's user.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ladle.errors import InvalidRequestError
from ladle.protocol.openai import parse_body
from ladle.server.lifecycle import ModelPool


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None


class ReIsqRequest(_Body):
    ggml_type: str


class CalibrationApplyRequest(_Body):
    save_cimatrix: str | None = None


class QuantRoutes:
    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def routes(self) -> list[Route]:
        return [
            Route("/re_isq", self.re_isq, methods=["POST"]),
            Route("/calibration/start", self.calibration_start, methods=["POST"]),
            Route("/calibration/status", self.calibration_status, methods=["GET"]),
            Route("/calibration/apply", self.calibration_apply, methods=["POST"]),
        ]

    async def re_isq(self, request: Request) -> Response:
        req = parse_body(ReIsqRequest, await request.body())
        name = self._model(req.model)
        async with self.pool.use(name) as model:
            ggml_type = await model.re_isq_model(req.ggml_type)
        return JSONResponse({"model": name, "ggml_type": ggml_type})

    async def calibration_start(self, request: Request) -> Response:
        req = parse_body(_Body, await _body_or_empty(request))
        name = self._model(req.model)
        async with self.pool.use(name) as model:
            await model.begin_calibration()
        return JSONResponse({"model": name, "status": "calibrating"})

    async def calibration_status(self, request: Request) -> Response:
        name = self._model(request.query_params.get("model"))
        async with self.pool.use(name) as model:
            layers = await model.calibration_status()
        rows = list(layers.values())
        least, most = min(rows, default=0), max(rows, default=0)
        return JSONResponse({"model": name, "min_rows": least, "max_rows": most, "layers": layers})

    async def calibration_apply(self, request: Request) -> Response:
        req = parse_body(CalibrationApplyRequest, await _body_or_empty(request))
        name = self._model(req.model)
        async with self.pool.use(name) as model:
            ggml_type = await model.apply_calibration(req.save_cimatrix)
        return JSONResponse({"model": name, "ggml_type": ggml_type, "saved": req.save_cimatrix})

    def _model(self, requested: str | None) -> str:
        if requested:
            return requested
        loaded = self.pool.loaded_ids()
        if len(loaded) != 1:
            raise InvalidRequestError(
                f"required when {len(loaded)} models are loaded (not exactly one)", "model"
            )
        return loaded[0]


async def _body_or_empty(request: Request) -> bytes:
    """These bodies are all optional: no body reads as `{}`."""
    raw = await request.body()
    return raw if raw.strip() else json.dumps({}).encode()
