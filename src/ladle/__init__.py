"""ladle: local AI models, run from Python.

from ladle import TextModelBuilder
model = TextModelBuilder("SmolLM2-135M-Instruct.Q4_1.gguf").build()
print(model.chat("Hello!"))
"""

from ladle.builders import EmbeddingModelBuilder, GgufModelBuilder, TextModelBuilder
from ladle.errors import (
    ContextLengthError,
    DownloadError,
    EngineClosedError,
    InvalidRequestError,
    LadleError,
    ModelLoadError,
    ModelNotFoundError,
    ServiceError,
    StructuredOutputError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)
from ladle.manager import (
    AsyncFoundryLocalManager,
    DeviceType,
    ExecutionProvider,
    FoundryLocalManager,
    FoundryModelInfo,
    ModelRuntime,
)
from ladle.messages import (
    EmbeddingRequestBuilder,
    RequestBuilder,
    TextMessageRole,
    TextMessages,
)
from ladle.model import AsyncModel, Model
from ladle.model_core import ModelInfo
from ladle.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    Constraint,
    EmbeddingRequest,
    EmbeddingResponse,
)

__version__ = "0.1.0"

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
    "Model",
    "ModelInfo",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelRuntime",
    "RequestBuilder",
    "ServiceError",
    "StructuredOutputError",
    "TextMessageRole",
    "TextMessages",
    "TextModelBuilder",
    "UnsupportedArchitectureError",
    "UnsupportedTensorTypeError",
]
