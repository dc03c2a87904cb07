"""The manager's model types, named as in Foundry Local's Python SDK (`foundry_local.models`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from ladle.errors import ServiceError
from ladle.protocol.foundry import FoundryDownloadModel, FoundryListEntry


class DeviceType(StrEnum):
    """The kind of device a model variant runs on."""

    CPU = "CPU"
    GPU = "GPU"
    NPU = "NPU"


class ExecutionProvider(StrEnum):
    """The execution provider a model variant is built for, as ONNX Runtime names them."""

    CPU = "CPUExecutionProvider"
    WEBGPU = "WebGpuExecutionProvider"
    CUDA = "CUDAExecutionProvider"
    QNN = "QNNExecutionProvider"

    def get_alias(self) -> str:
        """The short name the service takes as `ep=` ("cpu", "webgpu", "cuda", "qnn")."""
        return self.value.removesuffix("ExecutionProvider").lower()


@dataclass(frozen=True, slots=True)
class ModelRuntime:
    """Where a model variant runs: a device type and an execution provider."""

    device_type: DeviceType
    execution_provider: ExecutionProvider


@dataclass(frozen=True, slots=True, repr=False)
class FoundryModelInfo:
    """One catalog variant as the manager sees it; `id` is what the OpenAI API takes as `model`."""

    alias: str
    id: str
    version: str
    runtime: ExecutionProvider
    uri: str
    file_size_mb: int
    prompt_template: dict[str, str] = field(hash=False)
    provider: str
    publisher: str
    license: str
    task: str
    supports_tool_calling: bool = False

    def __repr__(self) -> str:
        return (
            f"FoundryModelInfo(alias={self.alias}, id={self.id},"
            f" runtime={self.runtime.get_alias()}, file_size={self.file_size_mb} MB,"
            f" license={self.license})"
        )

    @classmethod
    def from_list_response(cls, response: dict[str, Any] | FoundryListEntry) -> FoundryModelInfo:
        """Build from one entry of `GET /foundry/list` (camelCase fields)."""
        try:
            entry = FoundryListEntry.model_validate(response)
            runtime = ExecutionProvider(entry.runtime.execution_provider)
        except (ValidationError, ValueError) as e:
            raise ServiceError(f"malformed /foundry/list entry: {e}") from e
        return cls(
            alias=entry.alias,
            id=entry.name,
            version=entry.version,
            runtime=runtime,
            uri=entry.uri,
            file_size_mb=entry.file_size_mb,
            prompt_template=dict(entry.prompt_template or {}),
            provider=entry.provider_type,
            publisher=entry.publisher,
            license=entry.license,
            task=entry.task,
            supports_tool_calling=entry.supports_tool_calling,
        )

    def to_download_body(self) -> dict[str, Any]:
        """The `model` object of a `POST /openai/download` request (PascalCase fields)."""
        provider = f"{self.provider}Local" if self.provider == "AzureFoundry" else self.provider
        model = FoundryDownloadModel(
            name=self.id,
            uri=self.uri,
            publisher=self.publisher,
            provider_type=provider,
            prompt_template=self.prompt_template,
        )
        return model.model_dump(by_alias=True)
