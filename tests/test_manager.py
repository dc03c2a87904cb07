"""FoundryLocalManager against a real service it starts itself, with a real model.

The module's catalog holds the SmolLM2 GGUF under a test alias (a `file://` source, so the
download is a local copy), a GPU variant of that alias, a second copy to watch a download's
progress, and an entry whose file does not exist.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from ladle.errors import DownloadError, ModelNotFoundError, ServiceError
from ladle.manager import (
    DeviceType,
    ExecutionProvider,
    FoundryLocalManager,
    FoundryModelInfo,
    ModelRuntime,
    service,
)
from ladle.manager._base import ServiceCatalog

ALIAS = "ladle-test-smollm2"
CPU_ID = "ladle-test-smollm2-generic-cpu:1"
GPU_ID = "ladle-test-smollm2-cuda-gpu:1"
COPY_ID = "ladle-test-copy-generic-cpu:1"
BROKEN_ID = "ladle-test-broken-generic-cpu:1"
CHAT = [{"role": "user", "content": "Name a fruit."}]


def _entry(
    model_id: str, alias: str, source: Path, size: int, device: str = "CPU"
) -> dict[str, Any]:
    file = {"name": source.name, "size": size, "sha256": None, "source": source.as_uri()}
    return {
        "id": model_id,
        "alias": alias,
        "format": "gguf",
        "device_type": device,
        "files": [file],
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("ladle-home")
    size = smollm2_path.stat().st_size
    models = [
        _entry(CPU_ID, ALIAS, smollm2_path, size),
        _entry(GPU_ID, ALIAS, smollm2_path, size, device="GPU"),
        _entry(COPY_ID, "ladle-test-copy", smollm2_path, size),
        _entry(BROKEN_ID, "ladle-test-broken", root / "missing.gguf", 10),
    ]
    (root / "catalog").mkdir()
    (root / "catalog" / "test.json").write_text(json.dumps({"models": models}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LADLE_HOME", str(root))
        mp.setenv("LADLE_CACHE_DIR", str(root / "models"))
        for name in ("LADLE_API_KEY", "LADLE_CATALOG_PATH", "OPENAI_API_KEY"):
            mp.delenv(name, raising=False)
        yield root
        for state in service.list_running():
            service.stop(Path(state.cache_dir))


@pytest.fixture(scope="module")
def manager(home: Path) -> Iterator[FoundryLocalManager]:
    """Bootstrapped from nothing: the manager starts the service, downloads and loads."""
    assert service.find() is None
    with FoundryLocalManager(ALIAS) as manager:
        yield manager


def test_bootstrap_starts_the_service_then_downloads_and_loads(
    manager: FoundryLocalManager,
) -> None:
    state = service.find()
    assert state is not None and manager.service_uri == state.uri
    assert manager.is_service_running()
    assert [m.id for m in manager.list_loaded_models()] == [CPU_ID]


def test_endpoint_and_api_key(manager: FoundryLocalManager) -> None:
    assert manager.service_uri.startswith("http://127.0.0.1:")
    assert manager.endpoint == f"{manager.service_uri}/v1"
    assert manager.api_key == "OPENAI_API_KEY"  # the service has no key: any value works


def test_catalog_lists_every_variant(manager: FoundryLocalManager) -> None:
    ids = {m.id for m in manager.list_catalog_models()}
    assert {CPU_ID, GPU_ID, COPY_ID, BROKEN_ID} <= ids


def test_get_model_info_by_alias_id_and_name(manager: FoundryLocalManager) -> None:
    info = manager.get_model_info(ALIAS)
    assert info is not None
    if not torch.cuda.is_available():
        assert info.id == CPU_ID  # the GPU variant cannot run here
    assert manager.get_model_info(GPU_ID) == FoundryModelInfo.from_list_response(
        _list_entry(manager, GPU_ID)
    )
    assert manager.get_model_info(CPU_ID.upper()) == manager.get_model_info(CPU_ID)
    assert manager.get_model_info("ladle-test-smollm2-generic-cpu") == manager.get_model_info(
        CPU_ID
    )
    assert manager.get_model_info("no-such-model") is None
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        manager.get_model_info("no-such-model", raise_on_not_found=True)


def test_refresh_catalog_sees_new_entries(manager: FoundryLocalManager, home: Path) -> None:
    extra = home / "catalog" / "extra.json"
    entry = _entry("ladle-test-extra-generic-cpu:1", "ladle-test-extra", home / "x.gguf", 1)
    extra.write_text(json.dumps({"models": [entry]}))
    try:
        assert manager.get_model_info("ladle-test-extra") is None  # the catalog is fetched once
        manager.refresh_catalog()
        assert manager.get_model_info("ladle-test-extra") is not None
    finally:
        extra.unlink()
        manager.refresh_catalog()


def test_cache_location_and_cached_models(manager: FoundryLocalManager, home: Path) -> None:
    assert manager.get_cache_location() == str(home / "models")
    assert CPU_ID in [m.id for m in manager.list_cached_models()]


def test_download_reports_progress_and_skips_a_cached_model(
    manager: FoundryLocalManager,
) -> None:
    percents: list[float] = []
    info = manager.download_model("ladle-test-copy", progress=percents.append)
    assert info.id == COPY_ID
    assert percents and percents[-1] == 100.0 and percents == sorted(percents)
    assert COPY_ID in [m.id for m in manager.list_cached_models()]
    again: list[float] = []
    assert manager.download_model(COPY_ID, progress=again.append) == info
    assert again == []  # already cached: no request at all


def test_a_failed_download_raises_download_error(manager: FoundryLocalManager) -> None:
    with pytest.raises(DownloadError, match=BROKEN_ID):
        manager.download_model("ladle-test-broken")
    with pytest.raises(ModelNotFoundError):
        manager.download_model("no-such-model")


def test_load_and_unload(manager: FoundryLocalManager) -> None:
    assert manager.load_model("ladle-test-copy", ttl=60).id == COPY_ID
    assert manager.load_model(ALIAS).id == CPU_ID  # loaded already: only its TTL changes
    assert {m.id for m in manager.list_loaded_models()} == {COPY_ID, CPU_ID}
    manager.unload_model(COPY_ID, force=True)
    assert [m.id for m in manager.list_loaded_models()] == [CPU_ID]
    manager.unload_model(COPY_ID)  # not loaded: nothing to do


def test_loading_a_model_not_downloaded_names_it(manager: FoundryLocalManager) -> None:
    with pytest.raises(ModelNotFoundError, match="not downloaded"):
        manager.load_model("ladle-test-broken")


def test_openai_client_at_the_endpoint(manager: FoundryLocalManager) -> None:
    model = manager.get_model_info(ALIAS, raise_on_not_found=True)
    assert model is not None
    request: dict[str, Any] = {"model": model.id, "messages": CHAT, "max_tokens": 8}
    with openai.OpenAI(base_url=manager.endpoint, api_key=manager.api_key) as client:
        reply = client.chat.completions.create(**request, temperature=0)
        text = reply.choices[0].message.content
        assert text
        stream = client.chat.completions.create(**request, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
        assert model.id in [m.id for m in client.models.list()]


def test_without_a_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LADLE_HOME", str(tmp_path))
    monkeypatch.setenv("LADLE_CACHE_DIR", str(tmp_path / "models"))
    manager = FoundryLocalManager(bootstrap=False)
    assert not manager.is_service_running()
    with pytest.raises(ServiceError, match="no ladle service is running"):
        _ = manager.endpoint
    with pytest.raises(ServiceError):
        manager.list_catalog_models()


def test_a_service_that_does_not_answer_is_a_service_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LADLE_HOME", str(tmp_path))
    monkeypatch.setenv("LADLE_CACHE_DIR", str(tmp_path / "models"))
    with service.registration(tmp_path / "models") as on_ready:
        on_ready(f"http://127.0.0.1:{_closed_port()}")  # recorded, but nothing listens
        manager = FoundryLocalManager(bootstrap=False)
        assert not manager.is_service_running()
        with pytest.raises(ServiceError, match="cannot reach the ladle service"):
            manager.list_loaded_models()


# ---------------------------------------------------------------- model types, without a service


def _wire(model_id: str, alias: str, provider: str, device: str = "CPU") -> dict[str, Any]:
    return {
        "name": model_id,
        "displayName": alias,
        "alias": alias,
        "version": model_id.rpartition(":")[2],
        "uri": f"hf://org/{alias}",
        "providerType": "AzureFoundry",
        "modelType": "GGUF",
        "promptTemplate": {"user": "<|user|>{Content}"},
        "publisher": "org",
        "task": "chat-completion",
        "license": "mit",
        "licenseDescription": "",
        "parentModelUri": "",
        "runtime": {"deviceType": device, "executionProvider": provider},
        "fileSizeMb": 12,
        "modelSettings": {"parameters": []},
        "supportsToolCalling": True,
        "maxOutputTokens": 2048,
    }


def test_model_info_from_the_list_and_to_a_download_body() -> None:
    info = FoundryModelInfo.from_list_response(_wire("m-cuda-gpu:2", "m", "CUDAExecutionProvider"))
    assert (info.alias, info.id, info.version, info.runtime) == (
        "m",
        "m-cuda-gpu:2",
        "2",
        ExecutionProvider.CUDA,
    )
    assert (info.file_size_mb, info.supports_tool_calling, info.provider) == (
        12,
        True,
        "AzureFoundry",
    )
    assert info.to_download_body() == {
        "Name": "m-cuda-gpu:2",
        "Uri": "hf://org/m",
        "Publisher": "org",
        "ProviderType": "AzureFoundryLocal",
        "PromptTemplate": {"user": "<|user|>{Content}"},
    }
    assert repr(info) == (
        "FoundryModelInfo(alias=m, id=m-cuda-gpu:2, runtime=cuda, file_size=12 MB, license=mit)"
    )
    with pytest.raises(ServiceError, match="malformed"):
        FoundryModelInfo.from_list_response({"name": "x"})


def test_execution_provider_aliases_and_runtime() -> None:
    assert [p.get_alias() for p in ExecutionProvider] == ["cpu", "webgpu", "cuda", "qnn"]
    assert ExecutionProvider("CPUExecutionProvider") is ExecutionProvider.CPU
    runtime = ModelRuntime(DeviceType.GPU, ExecutionProvider.CUDA)
    assert runtime.device_type == "GPU" and runtime.execution_provider.get_alias() == "cuda"


def test_an_alias_takes_the_best_runnable_variant() -> None:
    entries = [
        _wire("m-generic-cpu:1", "m", "CPUExecutionProvider"),
        _wire("m-generic-cpu:3", "m", "CPUExecutionProvider"),
        _wire("m-cuda-gpu:1", "m", "CUDAExecutionProvider", "GPU"),
        _wire("n-webgpu:1", "n", "WebGpuExecutionProvider", "GPU"),
    ]
    cpu_only = ServiceCatalog.parse(entries, {ExecutionProvider.CPU})
    with_cuda = ServiceCatalog.parse(entries, {ExecutionProvider.CPU, ExecutionProvider.CUDA})
    assert _id(cpu_only.find("m")) == "m-generic-cpu:3"  # highest version
    assert _id(with_cuda.find("m")) == "m-cuda-gpu:1"  # GPU before CPU
    assert _id(cpu_only.find("m-generic-cpu")) == "m-generic-cpu:3"
    assert _id(cpu_only.find("m-generic-cpu:1")) == "m-generic-cpu:1"
    assert _id(cpu_only.find("n")) == "n-webgpu:1"  # nothing runnable: still resolves
    assert cpu_only.load_params(cpu_only.get("m-cuda-gpu:1"), 60) == {"ttl": 60, "ep": "cuda"}
    assert cpu_only.load_params(cpu_only.get("m"), 60) == {"ttl": 60}


def _id(info: FoundryModelInfo | None) -> str | None:
    return info.id if info is not None else None


def _list_entry(manager: FoundryLocalManager, model_id: str) -> dict[str, Any]:
    entries = httpx.get(f"{manager.service_uri}/foundry/list").json()
    return next(e for e in entries if e["name"] == model_id)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
