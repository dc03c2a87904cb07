"""Service metrics in Prometheus's text format, written by hand.

Five families cover what an operator asks of a model service: requests by route and status,
latency, tokens in and out, time to first token, and what is loaded. They are few and simple,
so a small writer here costs less than a dependency. Everything is updated on the event loop's
thread, so there are no locks.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ladle.engine.engine import EngineStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # one per bucket, then +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: Labels) -> Iterable[str]:
        cumulative = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            yield f"{name}_bucket{_labels((*labels, ('le', le)))} {cumulative}"
        yield f"{name}_sum{_labels(labels)} {self.total}"
        yield f"{name}_count{_labels(labels)} {self.count}"


@dataclass(frozen=True, slots=True)
class LoadedModelStats:
    """What the metrics report about one loaded model."""

    model_id: str
    size_bytes: int
    requests_in_flight: int
    engine: EngineStats | None = None  # text models only


class Metrics:
    """Counters and histograms of one service; `render` writes them for `GET /metrics`."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (route, method, status)
        self.latency: dict[str, Histogram] = {}
        self.prompt_tokens: Counter[str] = Counter()
        self.completion_tokens: Counter[str] = Counter()
        self.ttft: dict[str, Histogram] = {}
        self.loads: dict[str, Histogram] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests[(route, method, str(status))] += 1
        self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens[model] += prompt
        self.completion_tokens[model] += completion

    def observe_first_token(self, model: str, seconds: float) -> None:
        self.ttft.setdefault(model, Histogram(TTFT_BUCKETS)).observe(seconds)

    def observe_load(self, model: str, seconds: float) -> None:
        self.loads.setdefault(model, Histogram(LOAD_BUCKETS)).observe(seconds)

    def render(self, loaded: list[LoadedModelStats]) -> str:
        out: list[str] = []
        _family(out, "ladle_requests_total", "counter", "HTTP requests by route and status.")
        for (route, method, status), n in sorted(self.requests.items()):
            labels = (("route", route), ("method", method), ("status", status))
            out.append(f"ladle_requests_total{_labels(labels)} {n}")
        _family(out, "ladle_request_duration_seconds", "histogram", "Request latency.")
        for route, hist in sorted(self.latency.items()):
            out.extend(hist.lines("ladle_request_duration_seconds", (("route", route),)))
        for name, counter, text in (
            ("ladle_prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
            ("ladle_completion_tokens_total", self.completion_tokens, "Tokens generated."),
        ):
            _family(out, name, "counter", text)
            out.extend(f"{name}{_labels((('model', m),))} {n}" for m, n in sorted(counter.items()))
        _family(
            out, "ladle_time_to_first_token_seconds", "histogram", "Streams' first token delay."
        )
        for model, hist in sorted(self.ttft.items()):
            out.extend(hist.lines("ladle_time_to_first_token_seconds", (("model", model),)))
        _family(out, "ladle_model_load_seconds", "histogram", "Time to load a model.")
        for model, hist in sorted(self.loads.items()):
            out.extend(hist.lines("ladle_model_load_seconds", (("model", model),)))
        _family(out, "ladle_loaded_models", "gauge", "Models loaded in memory.")
        out.append(f"ladle_loaded_models {len(loaded)}")
        _family(out, "ladle_loaded_model_bytes", "gauge", "Estimated memory of a loaded model.")
        out.extend(f"ladle_loaded_model_bytes{_model(s)} {s.size_bytes}" for s in loaded)
        _family(out, "ladle_requests_in_flight", "gauge", "Requests running on a loaded model.")
        out.extend(f"ladle_requests_in_flight{_model(s)} {s.requests_in_flight}" for s in loaded)
        engines = [(s, s.engine) for s in loaded if s.engine is not None]
        for name, kind, text, value in (
            ("ladle_sequences_running", "gauge", "Sequences in the running batch.", "running"),
            ("ladle_sequences_waiting", "gauge", "Sequences queued for the batch.", "waiting"),
            ("ladle_kv_cache_blocks_used", "gauge", "KV blocks held.", "kv_blocks_used"),
            ("ladle_kv_cache_blocks", "gauge", "KV blocks in the budget.", "kv_blocks"),
            ("ladle_preemptions_total", "counter", "Sequences preempted.", "preemptions"),
        ):
            _family(out, name, kind, text)
            out.extend(f"{name}{_model(s)} {getattr(e, value)}" for s, e in engines)
        _family(out, "ladle_model_compiled", "gauge", "1 once the compiled step serves.")
        out.extend(
            f"ladle_model_compiled{_model(s)} {int(e.compile_status == 'ready')}"
            for s, e in engines
        )
        _family(out, "ladle_model_compiling", "gauge", "1 while the step compiles.")
        out.extend(
            f"ladle_model_compiling{_model(s)} {int(e.compile_status == 'compiling')}"
            for s, e in engines
        )
        return "\n".join(out) + "\n"


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by route template and status, and times it
    until its last body byte is sent (so a stream's latency is the whole stream)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before it starts a response

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = scope.get("route")
            template = route.path if isinstance(route, Route) else "unmatched"
            elapsed = time.perf_counter() - started
            self.metrics.observe_request(template, scope["method"], status, elapsed)


def _family(out: list[str], name: str, kind: str, text: str) -> None:
    out.append(f"# HELP {name} {text}")
    out.append(f"# TYPE {name} {kind}")


def _model(stats: LoadedModelStats) -> str:
    return _labels((("model", stats.model_id),))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
