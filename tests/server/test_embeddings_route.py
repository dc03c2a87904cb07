"""`POST /v1/embeddings` against a real service, with the `openai` client.

The module's catalog adds all-MiniLM-L6-v2 twice as a registered local folder: `minilm` with
task "embeddings", and `minilm-untagged` with no task, which the service must still load as an
embedding model because of what its files hold.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from ladle.server import ServerSettings

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def test_catalog(test_catalog: Path, minilm_path: Path) -> Path:
    catalog = json.loads(test_catalog.read_text())
    weights = minilm_path / "model.safetensors"
    files = [
        {
            "name": weights.name,
            "size": weights.stat().st_size,
            "sha256": None,
            "source": weights.as_uri(),
        }
    ]
    for alias, task in (("minilm", {"task": "embeddings"}), ("minilm-untagged", {})):
        catalog["models"].append(
            {"id": f"{alias}-local:1", "alias": alias, "format": "safetensors", **task,
             "uri": minilm_path.as_uri(), "provider_type": "Local", "files": files}
        )  # fmt: skip
    test_catalog.write_text(json.dumps(catalog))
    return test_catalog


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerSettings]) -> ServerSettings:
    return serve()


@pytest.fixture(scope="module")
def client(server: ServerSettings) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def http(server: ServerSettings) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def test_each_input_form_gives_one_vector_per_input(client: openai.OpenAI) -> None:
    one = client.embeddings.create(model="minilm", input="A monkey is playing drums.")
    assert one.model == "minilm-local:1" and len(one.data) == 1
    vector = np.array(one.data[0].embedding)
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert one.usage.prompt_tokens == one.usage.total_tokens == 8

    texts = ["first text", "A monkey is playing drums.", "third"]
    many = client.embeddings.create(model="minilm", input=texts)
    assert [d.index for d in many.data] == [0, 1, 2]
    assert np.allclose(many.data[1].embedding, vector, atol=1e-6)

    ids = [101, 1037, 10608, 2003, 2652, 7583, 1012, 102]  # "a monkey is playing drums." uncased
    by_ids = client.embeddings.create(model="minilm", input=ids)
    assert len(by_ids.data) == 1 and by_ids.usage.prompt_tokens == 8
    lists = client.embeddings.create(model="minilm", input=[ids, ids[:3]])
    assert len(lists.data) == 2
    assert np.allclose(lists.data[0].embedding, by_ids.data[0].embedding, atol=1e-6)


def test_base64_decodes_to_the_float_vectors(http: httpx.Client) -> None:
    body = {"model": "minilm", "input": ["hello", "world"]}
    floats = http.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    packed = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    assert packed["object"] == "list" and packed["data"][0]["object"] == "embedding"
    for f, b in zip(floats["data"], packed["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert np.allclose(decoded, f["embedding"], atol=1e-7)


def test_dimensions_truncate_then_renormalize(client: openai.OpenAI) -> None:
    full = client.embeddings.create(model="minilm", input="shorter vectors").data[0].embedding
    short = client.embeddings.create(model="minilm", input="shorter vectors", dimensions=64)
    vector = np.array(short.data[0].embedding)
    assert vector.shape == (64,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    want = np.array(full[:64]) / np.linalg.norm(full[:64])
    assert np.allclose(vector, want, atol=1e-6)


def test_a_path_holding_an_encoder_loads_as_an_embedding_model(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model="minilm-untagged", input="by architecture")
    assert response.model == "minilm-untagged-local:1" and len(response.data[0].embedding) == 384


def test_concurrent_requests_all_get_their_own_vectors(client: openai.OpenAI) -> None:
    texts = [f"request number {i}" for i in range(8)]
    alone = {t: client.embeddings.create(model="minilm", input=t).data[0].embedding for t in texts}
    results: dict[str, list[float]] = {}

    def call(text: str) -> None:
        results[text] = client.embeddings.create(model="minilm", input=text).data[0].embedding

    threads = [threading.Thread(target=call, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for text in texts:
        assert np.allclose(results[text], alone[text], atol=1e-5)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "minilm", "input": []}, "input"),
        ({"model": "minilm", "input": [1, "a"]}, "input"),
        ({"model": "minilm", "input": [["a"]]}, "input"),
        ({"model": "minilm", "input": 3.5}, "input"),
        ({"model": "minilm", "input": " ".join(["word"] * 300)}, "input[0]"),
        ({"model": "minilm", "input": [[5, 99999]]}, "input[0]"),
        ({"model": "minilm", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "minilm", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "minilm", "input": "x", "dimensions": 385}, "dimensions"),
        ({"model": "smol", "input": "a chat model"}, "model"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(
    http: httpx.Client, body: dict[str, object], param: str
) -> None:
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert http.post("/v1/embeddings", json={"model": "minilm", "input": "ok"}).status_code == 200


def test_over_long_input_is_truncated_when_asked(http: httpx.Client) -> None:
    body = {"model": "minilm", "input": " ".join(["word"] * 300), "truncate_sequence": True}
    response = http.post("/v1/embeddings", json=body).json()
    assert response["usage"]["prompt_tokens"] == 256


def test_an_embedding_model_asked_to_chat_is_a_400(http: httpx.Client) -> None:
    body = {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"
