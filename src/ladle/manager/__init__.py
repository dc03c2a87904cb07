"""The manager SDK: find or start the local model service and drive it, as Foundry Local's
Python SDK (`foundry_local`) does.

    from ladle.manager import FoundryLocalManager
    manager = FoundryLocalManager("smollm2-135m-instruct")
    client = openai.OpenAI(base_url=manager.endpoint, api_key=manager.api_key)
    model = manager.get_model_info("smollm2-135m-instruct").id
"""

from ladle.manager._async import AsyncFoundryLocalManager
from ladle.manager._models import DeviceType, ExecutionProvider, FoundryModelInfo, ModelRuntime
from ladle.manager._sync import FoundryLocalManager

__all__ = [
    "AsyncFoundryLocalManager",
    "DeviceType",
    "ExecutionProvider",
    "FoundryLocalManager",
    "FoundryModelInfo",
    "ModelRuntime",
]
