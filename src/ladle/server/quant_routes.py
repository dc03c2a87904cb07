"""In-place quantization over HTTP, as mistral.rs's server offers it.

    POST /re_isq               {"model"?, "ggml_type": "Q4K"}          re-quantize while serving
    POST /calibration/start    {"model"?}                               collect activation stats
    GET  /calibration/status   ?model=...                               tokens seen per layer
    POST /calibration/apply    {"model"?, "save_cimatrix"?: "path"}     re-quantize with them

The model is named as OpenAI's routes name it, by `model`; it may be left out when exactly one
model is loaded (mistral.rs serves one). Errors are OpenAI error bodies (`server/errors.py`):
a bad type, calls in the wrong order and a model not quantized in place are 400s.
`save_cimatrix` is a file name, not a path: the statistics are saved under
`$LADLE_HOME/calibration/`, so a client can write nowhere else on the server's disk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ladle import envconfig
from ladle.engine.quant.isq import isq_type_pattern
from ladle.errors import InvalidRequestError
from ladle.protocol.openai import parse_body
from ladle.server.lifecycle import ModelPool
from ladle.server.openapi import Operation, Query, documented

TAG = "Quantization"
FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None


class ReIsqRequest(_Body):
    ggml_type: str = Field(json_schema_extra={"pattern": isq_type_pattern()})


class CalibrationApplyRequest(_Body):
    save_cimatrix: str | None = Field(default=None, pattern=FILE_NAME.pattern)


class QuantResult(BaseModel):
    model: str
    ggml_type: str


class CalibrationStarted(BaseModel):
    model: str
    status: str


class CalibrationStatus(BaseModel):
    model: str
    min_rows: int
    max_rows: int
    layers: dict[str, int]


class CalibrationApplied(QuantResult):
    saved: str | None


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

    @documented(
        Operation(
            "Re-quantize a model's linear layers while it serves",
            TAG,
            body=ReIsqRequest,
            returns=QuantResult,
            errors=(400, 404, 409, 503),
        )
    )
    async def re_isq(self, request: Request) -> Response:
        req = parse_body(ReIsqRequest, await request.body())
        name = self._model(req.model)
        async with self.pool.use(name) as model:
            ggml_type = await model.re_isq_model(req.ggml_type)
        return JSONResponse({"model": name, "ggml_type": ggml_type})

    @documented(
        Operation(
            "Start collecting activation statistics from the traffic served",
            TAG,
            body=_Body,
            body_required=False,
            returns=CalibrationStarted,
            errors=(400, 404, 409, 503),
        )
    )
    async def calibration_start(self, request: Request) -> Response:
        req = parse_body(_Body, await _body_or_empty(request))
        name = self._model(req.model)
        async with self.pool.use(name) as model:
            await model.begin_calibration()
        return JSONResponse({"model": name, "status": "calibrating"})

    @documented(
        Operation(
            "Tokens each layer has seen since calibration started",
            TAG,
            query=(Query("model", {"type": "string"}),),
            returns=CalibrationStatus,
            errors=(400, 404, 409, 503),
        )
    )
    async def calibration_status(self, request: Request) -> Response:
        name = self._model(request.query_params.get("model"))
        async with self.pool.use(name) as model:
            layers = await model.calibration_status()
        rows = list(layers.values())
        least, most = min(rows, default=0), max(rows, default=0)
        return JSONResponse({"model": name, "min_rows": least, "max_rows": most, "layers": layers})

    @documented(
        Operation(
            "Re-quantize weighted by the statistics collected",
            TAG,
            body=CalibrationApplyRequest,
            body_required=False,
            returns=CalibrationApplied,
            errors=(400, 404, 409, 503),
        )
    )
    async def calibration_apply(self, request: Request) -> Response:
        req = parse_body(CalibrationApplyRequest, await _body_or_empty(request))
        name = self._model(req.model)
        target = None if req.save_cimatrix is None else _calibration_file(req.save_cimatrix)
        async with self.pool.use(name) as model:
            ggml_type = await model.apply_calibration(None if target is None else str(target))
        saved = None if target is None else str(target)
        return JSONResponse({"model": name, "ggml_type": ggml_type, "saved": saved})

    def _model(self, requested: str | None) -> str:
        if requested:
            return requested
        loaded = self.pool.loaded_ids()
        if len(loaded) != 1:
            raise InvalidRequestError(
                f"required when {len(loaded)} models are loaded (not exactly one)", "model"
            )
        return loaded[0]


def _calibration_file(name: str) -> Path:
    """Where a client's `save_cimatrix` goes: inside the ladle home's calibration folder (the
    request model's pattern allows no separator and no leading dot)."""
    folder = envconfig.home() / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


async def _body_or_empty(request: Request) -> bytes:
    """These bodies are all optional: no body reads as `{}`."""
    raw = await request.body()
    return raw if raw.strip() else json.dumps({}).encode()
