"""ladle: local AI models, run from Python.

from ladle import TextModelBuilder
model = TextModelBuilder("SmolLM2-135M-Instruct.Q4_1.gguf").build()
print(model.chat("Hello!"))
"""

from ladle.builders import GgufModelBuilder, TextModelBuilder
from ladle.errors import (
    ContextLengthError,
    EngineClosedError,
    InvalidRequestError,
    LadleError,
    ModelLoadError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)
from ladle.messages import RequestBuilder, TextMessageRole, TextMessages
from ladle.model import AsyncModel, Model
from ladle.model_core import ModelInfo
from ladle.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncModel",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionRequest",
    "CompletionResponse",
    "ContextLengthError",
    "EngineClosedError",
    "GgufModelBuilder",
    "InvalidRequestError",
    "LadleError",
    "Model",
    "ModelInfo",
    "ModelLoadError",
    "RequestBuilder",
    "TextMessageRole",
    "TextMessages",
    "TextModelBuilder",
    "UnsupportedArchitectureError",
    "UnsupportedTensorTypeError",
]
