"""Foundry Local's management wire types: `/foundry/list`, `/openai/download`, `/openai/status`.

Foundry Local's v1 service speaks camelCase on `/foundry/list` and `/openai/status`, and
PascalCase inside the `/openai/download` body. Fields are snake_case here; aliases give the
wire names, so dump these with `by_alias=True`. Clients send either spelling.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel, to_pascal

from ladle.protocol.openai import Wire


class _CamelWire(Wire):
    model_config = ConfigDict(
        extra="ignore", alias_generator=to_camel, populate_by_name=True, protected_namespaces=()
    )


class _PascalWire(Wire):
    model_config = ConfigDict(
        extra="ignore", alias_generator=to_pascal, populate_by_name=True, protected_namespaces=()
    )


class FoundryRuntime(_CamelWire):
    device_type: str  # "CPU", "GPU", "NPU"
    execution_provider: str  # "CPUExecutionProvider", "CUDAExecutionProvider", ...


class FoundryModelSettings(_CamelWire):
    parameters: list[dict[str, Any]] = Field(default_factory=list)


class FoundryListEntry(_CamelWire):
    """One catalog variant in `GET /foundry/list`, as `FoundryModelInfo.from_list_response`
    reads it. Foundry's SDK requires every string present, so absent facts are empty strings."""

    name: str  # the model id, e.g. "smollm2-135m-instruct-q4_1-generic-cpu:1"
    display_name: str
    alias: str
    version: str
    uri: str
    provider_type: str
    model_type: str  # the file format, e.g. "GGUF"
    prompt_template: dict[str, Any] | None
    publisher: str
    task: str
    license: str
    license_description: str
    parent_model_uri: str
    runtime: FoundryRuntime
    file_size_mb: int
    model_settings: FoundryModelSettings
    supports_tool_calling: bool
    max_output_tokens: int | None
    min_fl_version: str | None = Field(default=None, alias="minFLVersion")


class FoundryDownloadModel(_PascalWire):
    """The `model` object of a download request, as `FoundryModelInfo.to_download_body` sends it."""

    name: str = Field(min_length=1)  # the model id
    uri: str = ""
    publisher: str = ""
    provider_type: str = ""
    prompt_template: dict[str, Any] | None = None


class FoundryDownloadRequest(Wire):
    """Body of `POST /openai/download`. `model` is an object, or a bare id as Foundry's REST
    reference shows it."""

    model: FoundryDownloadModel
    token: str | None = None
    ignore_pipe_report: bool = Field(
        default=True, validation_alias=AliasChoices("IgnorePipeReport", "ignorePipeReport")
    )

    @field_validator("model", mode="before")
    @classmethod
    def _bare_id(cls, v: Any) -> Any:
        return {"Name": v} if isinstance(v, str) else v


class FoundryDownloadResult(_CamelWire):
    """The last line of a download's progress stream."""

    success: bool
    error_message: str | None = None


class FoundryStatus(_CamelWire):
    """Body of `GET /openai/status`."""

    endpoints: list[str]
    model_dir_path: str
    pipe_name: str | None = None
    is_auto_registration_resolved: bool = True
