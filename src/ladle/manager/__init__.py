"""The manager SDK: find or start the local model service and drive it, as Foundry Local's
Python SDK (`foundry_local`) does.

    from ladle.manager import FoundryLocalManager
    manager = FoundryLocalManager("smollm2-135m-instruct")
    client = openai.OpenAI(base_url=manager.endpoint, api_key=manager.api_key)
    model = manager.get_model_info("smollm2-135m-instruct").id

service.py finds, starts and stops the background service; the managers (_sync.py,
_async.py, on _base.py) talk to it over HTTP. The service itself imports service.py to record
where it listens, so the managers and httpx (5-6 MB of a server's memory) are imported here
only when one of their names is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ladle.manager._async import AsyncFoundryLocalManager
    from ladle.manager._models import (
        DeviceType,
        ExecutionProvider,
        FoundryModelInfo,
        ModelRuntime,
    )
    from ladle.manager._sync import FoundryLocalManager

_HOMES = {
    "AsyncFoundryLocalManager": "ladle.manager._async",
    "DeviceType": "ladle.manager._models",
    "ExecutionProvider": "ladle.manager._models",
    "FoundryModelInfo": "ladle.manager._models",
    "ModelRuntime": "ladle.manager._models",
    "FoundryLocalManager": "ladle.manager._sync",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'ladle.manager' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AsyncFoundryLocalManager",
    "DeviceType",
    "ExecutionProvider",
    "FoundryLocalManager",
    "FoundryModelInfo",
    "ModelRuntime",
]
