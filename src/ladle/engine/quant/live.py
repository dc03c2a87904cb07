"""Re-quantizing a model while it serves, and calibrating it on the traffic it serves.

Quantization runs on the caller's thread; only the swap of finished layers runs on the engine
thread, between two steps (`LLMEngine.run`), all layers in one go: a request in flight
decodes its next token with the new weights and never sees a half-swapped model. The new
weights come from the source file, read again (not kept in memory), so re-quantizing never
compounds errors; when that file is gone they come from the resident weights, with a warning.

Calibration sets an `ActivationStats` on every quantizable `Linear`, which then sums its
inputs' squares per channel; applying it re-quantizes to the current ISQ type, weighted by
those means, and may save them as a `.cimatrix` for `with_imatrix`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ladle.engine.layers.linear import Linear
from ladle.engine.loader import LoadedModel, layer_specs, quantizable_linears, reload_model
from ladle.engine.quant.calibration import ActivationStats
from ladle.engine.quant.imatrix import save_cimatrix
from ladle.engine.quant.isq import Imatrix, IsqSpec, parse_isq_type
from ladle.errors import ConflictError, InvalidRequestError

RunOnEngine = Callable[[Callable[[], Any]], "Future[Any]"]


class LiveQuantizer:
    """Re-ISQ and calibration for one loaded text model and the engine that serves it."""

    def __init__(self, loaded: LoadedModel, run_on_engine: RunOnEngine) -> None:
        self.loaded = loaded
        self.run_on_engine = run_on_engine
        self._busy = threading.Lock()  # one re-quantization at a time
        self._stats: dict[str, ActivationStats] | None = None

    def re_isq(self, isq_type: str, imatrix: Imatrix | None = None) -> str:
        """Re-quantize every linear layer but the head to `isq_type`; returns the canonical type."""
        try:
            spec = IsqSpec(parse_isq_type(isq_type), imatrix)
        except ValueError as e:
            raise InvalidRequestError(str(e), "ggml_type") from e
        if not self._busy.acquire(blocking=False):
            raise ConflictError("a re-quantization of this model is already running")
        try:
            source = self.loaded.path.exists()
            fresh = self._from_source(spec) if source else self._from_resident(spec)
            live = quantizable_linears(self.loaded.model)

            def swap() -> None:
                for name, layer in live.items():
                    layer.take_weights(fresh[name])

            self.run_on_engine(swap).result()
            self.loaded.isq = spec
        finally:
            self._busy.release()
        return spec.isq_type

    def _from_source(self, spec: IsqSpec) -> dict[str, Linear]:
        return quantizable_linears(reload_model(self.loaded, spec))

    def _from_resident(self, spec: IsqSpec) -> dict[str, Linear]:
        warnings.warn(
            f"{self.loaded.path} is gone: re-quantizing from the weights in memory, which "
            "keep the error of their current quantization",
            stacklevel=4,
        )
        live = quantizable_linears(self.loaded.model)
        specs = layer_specs(self.loaded.model, spec)
        shadow = {}
        for name, layer in live.items():
            copy = Linear(layer.in_features, layer.out_features, layer.has_bias)
            copy.isq = specs[name]
            copy.load_weight(layer.dequantized(), self.loaded.dtype, layer.bias)
            shadow[name] = copy
        return shadow

    # ---- calibration

    def begin_calibration(self) -> None:
        if self.loaded.isq is None:
            raise ConflictError(
                "calibration needs a model quantized in place: load it with with_isq(...) or "
                "re-quantize it (re_isq_model) first"
            )
        if self._stats is not None:
            raise ConflictError("calibration is already running: apply it first")
        live = quantizable_linears(self.loaded.model)
        stats = {name: ActivationStats(layer.in_features) for name, layer in live.items()}

        def start() -> None:
            for name, layer in live.items():
                layer.calibration = stats[name]

        self.run_on_engine(start).result()
        self._stats = stats

    def calibration_status(self) -> dict[str, int]:
        """Rows (tokens) each layer has seen since `begin_calibration`, by module name."""
        return {name: s.rows for name, s in self._running().items()}

    def apply_calibration(self, save_cimatrix_to: str | Path | None = None) -> str:
        """Stop collecting, re-quantize weighted by the statistics, optionally save them."""
        stats = self._running()
        if not any(s.rows for s in stats.values()):
            raise ConflictError("no tokens seen since begin_calibration: serve some first")
        live = quantizable_linears(self.loaded.model)

        def stop() -> None:
            for layer in live.values():
                layer.calibration = None

        self.run_on_engine(stop).result()
        self._stats = None
        if save_cimatrix_to is not None:
            save_cimatrix(save_cimatrix_to, stats)
        assert self.loaded.isq is not None  # begin_calibration checked
        imatrix = {name: s.mean() for name, s in stats.items() if s.rows}
        return self.re_isq(self.loaded.isq.isq_type, imatrix)

    def _running(self) -> dict[str, ActivationStats]:
        if self._stats is None:
            raise ConflictError("no calibration running: call begin_calibration first")
        return self._stats
