"""AsyncFoundryLocalManager mirrors FoundryLocalManager, against a service it starts itself.

This module's service requires an API key (`LADLE_API_KEY` when the manager starts it), so the
manager's `api_key` and the `openai` client are checked with a key that matters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ladle.errors import DownloadError, ModelNotFoundError, ServiceError
from ladle.manager import AsyncFoundryLocalManager, service

ALIAS = "ladle-test-smollm2"
CPU_ID = "ladle-test-smollm2-generic-cpu:1"
COPY_ID = "ladle-test-copy-generic-cpu:1"
BROKEN_ID = "ladle-test-broken-generic-cpu:1"
API_KEY = "ladle-test-key"
CHAT = [{"role": "user", "content": "Name a fruit."}]


def _entry(model_id: str, alias: str, source: Path, size: int) -> dict[str, Any]:
    file = {"name": source.name, "size": size, "sha256": None, "source": source.as_uri()}
    return {"id": model_id, "alias": alias, "format": "gguf", "files": [file]}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("ladle-home")
    size = smollm2_path.stat().st_size
    models = [
        _entry(CPU_ID, ALIAS, smollm2_path, size),
        _entry(COPY_ID, "ladle-test-copy", smollm2_path, size),
        _entry(BROKEN_ID, "ladle-test-broken", root / "missing.gguf", 10),
    ]
    (root / "catalog").mkdir()
    (root / "catalog" / "test.json").write_text(json.dumps({"models": models}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LADLE_HOME", str(root))
        mp.setenv("LADLE_CACHE_DIR", str(root / "models"))
        mp.setenv("LADLE_API_KEY", API_KEY)
        for name in ("LADLE_CATALOG_PATH", "OPENAI_API_KEY"):
            mp.delenv(name, raising=False)
        yield root
        for state in service.list_running():
            service.stop(Path(state.cache_dir))


@pytest.fixture(scope="module")
def bootstrapped(home: Path) -> None:
    """`create` starts the service, downloads and loads, as the sync constructor does."""
    assert service.find() is None

    async def create() -> None:
        async with await AsyncFoundryLocalManager.create(ALIAS) as manager:
            assert await manager.is_service_running()

    asyncio.run(create())


def _run(scenario: Any) -> Any:
    """Run `scenario(manager)` with a fresh manager that finds the running service."""

    async def main() -> Any:
        async with AsyncFoundryLocalManager() as manager:
            return await scenario(manager)

    return asyncio.run(main())


def test_bootstrap_starts_the_service_then_downloads_and_loads(bootstrapped: None) -> None:
    async def scenario(m: AsyncFoundryLocalManager) -> None:
        state = service.find()
        assert state is not None and m.service_uri == state.uri
        assert [i.id for i in await m.list_loaded_models()] == [CPU_ID]

    _run(scenario)


def test_endpoint_and_the_services_api_key(bootstrapped: None) -> None:
    async def scenario(m: AsyncFoundryLocalManager) -> None:
        assert m.endpoint == f"{m.service_uri}/v1"
        assert m.api_key == API_KEY
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{m.service_uri}/openai/status")).status_code == 401
            assert (await client.get(f"{m.service_uri}/health")).status_code == 200

    _run(scenario)


def test_catalog_and_model_info(bootstrapped: None) -> None:
    async def scenario(m: AsyncFoundryLocalManager) -> None:
        assert {CPU_ID, COPY_ID, BROKEN_ID} <= {i.id for i in await m.list_catalog_models()}
        info = await m.get_model_info(ALIAS)
        assert info is not None and info.id == CPU_ID
        assert await m.get_model_info("ladle-test-smollm2-generic-cpu") == info
        assert await m.get_model_info("no-such-model") is None
        with pytest.raises(ModelNotFoundError):
            await m.get_model_info("no-such-model", raise_on_not_found=True)
        m.refresh_catalog()
        assert await m.get_model_info(CPU_ID) == info

    _run(scenario)


def test_cache_location_and_cached_models(bootstrapped: None, home: Path) -> None:
    async def scenario(m: AsyncFoundryLocalManager) -> None:
        assert await m.get_cache_location() == str(home / "models")
        assert [i.id for i in await m.list_cached_models()] == [CPU_ID]

    _run(scenario)


def test_download_with_progress_and_failure(bootstrapped: None) -> None:
    async def scenario(m: AsyncFoundryLocalManager) -> None:
        percents: list[float] = []
        assert (await m.download_model("ladle-test-copy", progress=percents.append)).id == COPY_ID
        assert percents and percents[-1] == 100.0
        assert COPY_ID in [i.id for i in await m.list_cached_models()]
        with pytest.raises(DownloadError, match=BROKEN_ID):
            await m.download_model("ladle-test-broken")

    _run(scenario)


def test_load_and_unload(bootstrapped: None) -> None:
    async def scenario(m: AsyncFoundryLocalManager) -> None:
        with pytest.raises(ModelNotFoundError, match="not downloaded"):
            await m.load_model("ladle-test-broken")
        await m.unload_model(ALIAS)
        assert await m.list_loaded_models() == []
        await m.unload_model(ALIAS)  # not loaded: nothing to do
        assert (await m.load_model(ALIAS, ttl=60)).id == CPU_ID
        assert [i.id for i in await m.list_loaded_models()] == [CPU_ID]

    _run(scenario)


def test_async_openai_client_at_the_endpoint(bootstrapped: None) -> None:
    async def scenario(m: AsyncFoundryLocalManager) -> None:
        request: dict[str, Any] = {"model": CPU_ID, "messages": CHAT, "max_tokens": 8}
        async with openai.AsyncOpenAI(base_url=m.endpoint, api_key=m.api_key) as client:
            reply = await client.chat.completions.create(**request, temperature=0)
            text = reply.choices[0].message.content
            assert text
            stream = await client.chat.completions.create(**request, temperature=0, stream=True)
            chunks = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            assert "".join(chunks) == text

    _run(scenario)


def test_without_a_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LADLE_HOME", str(tmp_path))
    monkeypatch.setenv("LADLE_CACHE_DIR", str(tmp_path / "models"))

    async def scenario(m: AsyncFoundryLocalManager) -> None:
        assert not await m.is_service_running()
        with pytest.raises(ServiceError, match="no ladle service is running"):
            await m.list_catalog_models()

    _run(scenario)
