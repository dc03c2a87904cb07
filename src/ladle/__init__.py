"""ladle: local AI models, run from Python.

from ladle import TextModelBuilder
model = TextModelBuilder("SmolLM2-135M-Instruct.Q4_1.gguf").build()
print(model.chat("Hello!"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ladle.builders import (
    EmbeddingModelBuilder,
    GgufModelBuilder,
    MultiModelBuilder,
    SpeechModelBuilder,
    TextModelBuilder,
    TranscriptionModelBuilder,
)
from ladle.cores.speech import SpeechOutput
from ladle.cores.text import ModelInfo
from ladle.errors import (
    ContextLengthError,
    DownloadError,
    EngineClosedError,
    InvalidRequestError,
    LadleError,
    ModelLoadError,
    ModelNotFoundError,
    NotFoundError,
    ServiceError,
    StructuredOutputError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)
from ladle.messages import (
    EmbeddingRequestBuilder,
    RequestBuilder,
    TextMessageRole,
    TextMessages,
)
from ladle.model import AsyncModel, Model
from ladle.protocol.audio import SpeechRequest, Transcription, VerboseTranscription
from ladle.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    Constraint,
    EmbeddingRequest,
    EmbeddingResponse,
)
from ladle.tools.callbacks import ServerTool, ToolFile, ToolOutput, tool
from ladle.tools.files import StoredFile
from ladle.tools.mcp import McpClientConfig, McpServerConfig, load_mcp_config
from ladle.tools.runtime import Toolbox

if TYPE_CHECKING:
    from ladle.manager import (
        AsyncFoundryLocalManager,
        DeviceType,
        ExecutionProvider,
        FoundryLocalManager,
        FoundryModelInfo,
        ModelRuntime,
    )

__version__ = "0.1.0"


# The service's client (the manager) is imported on first use: it is built on httpx, whose
# imports cost 6 MB of memory that the service itself, which imports this package, never needs.
def __getattr__(name: str) -> Any:
    if name in __all__:  # the only names of __all__ not imported above are the manager's
        return getattr(importlib.import_module("ladle.manager"), name)
    raise AttributeError(f"module 'ladle' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AsyncFoundryLocalManager",
    "AsyncModel",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionRequest",
    "CompletionResponse",
    "Constraint",
    "ContextLengthError",
    "DeviceType",
    "DownloadError",
    "EmbeddingModelBuilder",
    "EmbeddingRequest",
    "EmbeddingRequestBuilder",
    "EmbeddingResponse",
    "EngineClosedError",
    "ExecutionProvider",
    "FoundryLocalManager",
    "FoundryModelInfo",
    "GgufModelBuilder",
    "InvalidRequestError",
    "LadleError",
    "McpClientConfig",
    "McpServerConfig",
    "Model",
    "ModelInfo",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelRuntime",
    "MultiModelBuilder",
    "NotFoundError",
    "RequestBuilder",
    "ServerTool",
    "ServiceError",
    "SpeechModelBuilder",
    "SpeechOutput",
    "SpeechRequest",
    "StoredFile",
    "StructuredOutputError",
    "TextMessageRole",
    "TextMessages",
    "TextModelBuilder",
    "ToolFile",
    "ToolOutput",
    "Toolbox",
    "Transcription",
    "TranscriptionModelBuilder",
    "UnsupportedArchitectureError",
    "UnsupportedTensorTypeError",
    "VerboseTranscription",
    "load_mcp_config",
    "tool",
]
