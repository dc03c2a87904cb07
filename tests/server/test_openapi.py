"""`/openapi.json` describes every route, and the real service keeps to it under fuzzing.

schemathesis generates requests from the document, valid and invalid, against a real service
on a loopback port with SmolLM2 loaded, and checks each answer: no 5xx, a documented status
and content type, a body that conforms to its schema. In valid cases `max_tokens` is capped
at 4 (set where the case has none), so a chat costs a fraction of a second, and the case's
own `timeout` is dropped (a 504 past the deadline a client set is what it asked for); the
service's `request_timeout` of 30 s stays as a backstop, so a slow case fails, not stalls.
Invalid cases go as generated: capping an `n` of 129 would make one valid.
Hypothesis is asked to derandomize, yet schemathesis' cases still vary from run to run: each
run tries new ones.

One check is left out: `positive_data_acceptance` (a schema-valid request must not get a
400): a schema cannot say whether a request fits the model it names (token ids within its
vocabulary, a prompt within its context, a `tool_choice` naming an offered tool, a grammar
that compiles, `n` 1 on a session), and those are 400s naming the field; the gaps it found
that a schema can state (stop lists, embedding inputs, session ids, ISQ types, base64
bodies) are in the document. Request bodies parse strictly (`"5"` is not an integer), so
`negative_data_rejection` holds; in lax mode, `"n": "128"` once slipped past the caps below
and queued 640 sequences.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from starlette.routing import Route

from ladle.server import ServerSettings, create_app
from ladle.server.openapi import operation_of

MODEL = "smol-local:1"
CAPPED = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2, "top_logprobs": 2}

EXAMPLES = 20  # per operation and mode
EXCLUDED = [positive_data_acceptance]  # why: the module's docstring
FEWER = {"POST /re_isq": 1, "POST /calibration/apply": 3}  # each valid one re-quantizes
# a valid re-quantization to any other type takes 10-30 s on SmolLM2 and adds nothing
# here (tests/test_isq.py covers each type): Q8_0, the quickest, stands in for them
CHEAP_ISQ_TYPE = "Q8_0"
TIMEOUT = 120  # seconds a request may take (schemathesis' default is 10)

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def service(serve: Any) -> ServerSettings:
    settings_ = serve(request_timeout=30)  # a backstop: no case may hold the run for long
    with httpx.Client(base_url=settings_.url, timeout=120) as client:
        assert client.get(f"/openai/load/{MODEL}").status_code == 200
    return settings_


@pytest.fixture(scope="module")
def api_schema(service: ServerSettings) -> Any:
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json")


def test_every_route_is_documented_once() -> None:
    app = create_app(ServerSettings())
    routes = [r for r in app.routes if isinstance(r, Route)]
    assert all(operation_of(r) is not None for r in routes)
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        document = client.get("/openapi.json").json()
    documented = {(m, p) for p, ops in document["paths"].items() for m in ops}
    served = {
        (m.lower(), r.path.replace(":path}", "}")) for r in routes for m in r.methods or ()
    } - {("head", r.path) for r in routes}
    assert documented == {(m, p) for m, p in served if m != "head"}
    assert document["openapi"] == "3.1.0"
    schemas = document["components"]["schemas"]
    assert {"ChatCompletionRequest", "ChatCompletionResponse", "ErrorResponse"} <= set(schemas)


def test_the_service_keeps_to_its_document(api_schema: Any) -> None:
    """Every operation, valid and invalid input; all failures reported together."""
    failures: list[str] = []
    cases: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            started = time.monotonic()
            try:
                _fuzzer(operation, mode, cases)()
            except Unsatisfiable:  # no input of this mode exists (nothing there to break)
                continue
            except (Exception, BaseExceptionGroup) as e:  # gathered: a run shows them all
                failures.append(f"{operation.label} ({mode}): {_first_lines(e)}")
            took = time.monotonic() - started
            print(f"fuzzed {operation.label} ({mode.value}) in {took:.1f} s")
    print(f"schemathesis: {len(cases)} cases, {len(failures)} operations failing")
    assert not failures, "\n\n".join(failures)


def _fuzzer(operation: Any, mode: GenerationMode, cases: list[str]) -> Any:
    """The hypothesis test of one operation in one mode; each case it runs joins `cases`."""

    @given(case=operation.as_strategy(mode))
    @settings(
        max_examples=FEWER.get(operation.label, EXAMPLES),
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        cases.append(operation.label)
        if mode == GenerationMode.POSITIVE:  # an invalid case stays as generated: capping
            _capped(case)  # its `n` of 129 would make it valid
        case.call_and_validate(excluded_checks=EXCLUDED, timeout=TIMEOUT)

    return check


def _first_lines(error: BaseException) -> str:
    """The failure's title and the server's answer: enough to find it, short to read."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return "\n    ".join(line for line in lines if not line.lstrip().startswith("curl"))[:1500]


def _capped(case: Any) -> None:
    if not isinstance(case.body, dict):
        return
    for key, cap in CAPPED.items():
        if isinstance(case.body.get(key), int) and case.body[key] > cap:
            case.body[key] = cap
    if case.path == "/re_isq" and isinstance(case.body.get("ggml_type"), str):
        case.body["ggml_type"] = CHEAP_ISQ_TYPE
    if case.path in ("/v1/chat/completions", "/v1/completions"):
        case.body["model"] = MODEL  # reach the model, not only its 404
        if "timeout" in case.body:  # the client's own deadline: its 504 is not a fault
            del case.body["timeout"]
        for key in ("max_tokens", "max_completion_tokens"):
            if key in case.body and case.body[key] is None:
                del case.body[key]  # null, a reply may run to the context's end
        case.body.setdefault("max_tokens", 4)
