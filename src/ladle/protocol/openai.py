"""OpenAI wire types, shared by the SDK, the HTTP service and its clients.

Requests are validated here, where they enter: `parse_request` turns pydantic's errors into
one `InvalidRequestError` naming the field (`messages[1].role`, `top_p`), so the SDK and the
server report bad input the same way. Extensions that mistral.rs and vLLM accept (`top_k`,
`min_p`, `repetition_penalty`, `truncate_sequence`) sit beside OpenAI's own fields.
Foundry Local's management shapes live beside it, in `foundry.py`.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ladle.errors import InvalidRequestError

# a session's id: what `session_id` and the session routes accept
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls"]


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- requests


class ContentPart(Wire):
    type: Literal["text"]
    text: str


class ChatMessage(Wire):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text, with content parts joined (text-only models see one string)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def to_template_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_call_id", "tool_calls"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class StreamOptions(Wire):
    include_usage: bool = False


SchemaSource = type[BaseModel] | dict[str, Any]  # a pydantic model class or a JSON schema


class Constraint(Wire):
    """mistral.rs's `grammar` field: the output must match `value`, read as `type` says.

    `json_schema` takes a schema object; `regex` and `lark` a pattern or grammar text;
    `llguidance` an llguidance grammar (its JSON object). The constructors build each kind;
    `json_schema` also takes a pydantic model class, whose objects are closed to keys it does
    not declare (as OpenAI's `parse` does): a model may otherwise add keys without end.
    """

    type: Literal["json_schema", "regex", "lark", "llguidance"]
    value: Any

    @classmethod
    def json_schema(cls, schema: SchemaSource) -> Constraint:
        if isinstance(schema, type):
            return cls(type="json_schema", value=closed_schema(schema.model_json_schema()))
        return cls(type="json_schema", value=schema)

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object, as OpenAI's `response_format` `json_object`."""
        return cls(type="json_schema", value={"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls(type="regex", value=pattern)

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        return cls(type="lark", value=grammar)


def closed_schema(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that lists its properties."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v) for k, v in schema.items()}
    if "properties" in out and isinstance(out["properties"], dict):
        out.setdefault("additionalProperties", False)
    return out


class JsonSchemaFormat(Wire):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {} is any JSON
    # true: a schema with keywords the grammar cannot enforce is a 400 naming them; otherwise
    # they are checked after generation (`schema_violation` on the choice)
    strict: bool | None = None


class ResponseFormat(Wire):
    """OpenAI's `response_format`: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


Stops = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)]  # OpenAI's rule


class SamplingFields(Wire):
    """Fields that chat and text completion requests share."""

    model: str = "default"
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | Stops | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    logit_bias: dict[int, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    truncate_sequence: bool = False
    user: str | None = None
    grammar: Constraint | None = None
    timeout: float | None = Field(default=None, gt=0)  # ladle: seconds this request may take

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v and any(not -100.0 <= b <= 100.0 for b in v.values()):
            raise ValueError("logit_bias values must be between -100 and 100")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class FunctionDefinition(Wire):
    """A function the model may call; `parameters` is a JSON schema of its arguments object
    (none means it takes no arguments)."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # as `JsonSchemaFormat.strict`, for `parameters`

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "object") != "object":
            raise ValueError(f"must be a JSON schema of type 'object', got {v['type']!r}")
        return v

    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else _NO_ARGUMENTS


_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


class Tool(Wire):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Wire):
    name: str


class NamedToolChoice(Wire):
    """`tool_choice` naming one function: the reply is a call to it."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    # ladle: continue (or start) this stored conversation; the store checks the id itself
    session_id: str | None = Field(default=None, json_schema_extra={"pattern": SESSION_ID_PATTERN})
    max_tool_rounds: int | None = Field(default=None, ge=0)  # ladle: server-side tool rounds

    @model_validator(mode="after")
    def _unique_tool_names(self) -> ChatCompletionRequest:
        # InvalidRequestError passes through pydantic unwrapped, keeping `param`
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidRequestError("tool names must be unique", param="tools")
        return self

    def check_tool_choice(self) -> None:
        """A named `tool_choice` must name an offered tool, and `required` needs one. Checked
        when the request is prepared, not parsed: server-side tools (callbacks, MCP) join
        `tools` only then."""
        names = [t.function.name for t in self.tools or []]
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            known = ", ".join(names) or "none: tools is empty"
            raise InvalidRequestError(
                f"tool_choice names {choice.function.name!r}, which is not in tools ({known})",
                param="tool_choice.function.name",
            )
        if choice == "required" and not names:
            raise InvalidRequestError(
                "tool_choice 'required' needs at least one tool in tools", param="tool_choice"
            )

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def effective_tool_choice(self) -> Literal["none", "auto", "required"] | NamedToolChoice:
        """OpenAI's default: `auto` when tools are given, `none` otherwise."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = Field(default=16, ge=1)

    def token_limit(self) -> int | None:
        return self.max_tokens


EmbeddingInput = (
    str
    | Annotated[list[int], Field(min_length=1)]
    | Annotated[list[str | Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
)


class EmbeddingRequest(Wire):
    """Body of `POST /v1/embeddings`. `input` is a string, a list of strings, a list of token
    ids or a list of such lists (one vector each); `truncate_sequence` is ladle's extension
    (as for chat): cut an over-long input to the model's length instead of refusing it."""

    input: EmbeddingInput
    model: str = "default"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    truncate_sequence: bool = False
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("must be a string or a non-empty list")
        if all(_is_token_id(t) for t in v):
            return v
        for i, item in enumerate(v):
            is_tokens = isinstance(item, list) and item and all(_is_token_id(t) for t in item)
            if not (isinstance(item, str) or is_tokens):
                raise ValueError(
                    f"input[{i}] must be a string or a non-empty list of token ids (integers)"
                )
        return v

    def inputs(self) -> list[str | list[int]]:
        """One entry per vector to return."""
        if isinstance(self.input, str):
            return [self.input]
        if all(_is_token_id(t) for t in self.input):
            return [cast(list[int], list(self.input))]
        return cast(list[str | list[int]], list(self.input))


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Request = TypeVar("Request", bound=BaseModel)


def parse_body(cls: type[Request], raw: bytes) -> Request:
    """Decode an HTTP request's JSON body and validate it into `cls`.

    Bad JSON, a body that is not an object and a bad field all raise `InvalidRequestError`.
    The wire is strict, as the OpenAPI document says: `"5"` is not an integer nor `"true"` a
    boolean there (JSON object keys are strings, so `logit_bias`'s token ids still parse).
    """
    try:
        data = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise InvalidRequestError(f"the request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return parse_request(cls, raw, strict=True)


def parse_request(cls: type[Request], data: Any, *, strict: bool = False) -> Request:
    """Validate `data` into `cls`, raising `InvalidRequestError` that names the bad field.

    `strict` takes `data` as JSON text and refuses values of the wrong JSON type; otherwise
    (the SDK's Python dicts) pydantic's lax mode converts what it can.
    """
    try:
        if strict:
            return cls.model_validate_json(data, strict=True)
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [p for p in err["loc"] if isinstance(p, int) or not _is_type_tag(p)]
        param = "".join(
            f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
            for i, p in enumerate(loc)
        )
        raise InvalidRequestError(err["msg"], param=param or None) from e


def _is_type_tag(part: str) -> bool:
    """Union members appear in pydantic's error paths (`content.str`); they are not fields."""
    return "[" in part or part in {"str", "int", "float", "bool", "none"}


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(Wire):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(Wire):
    content: list[TokenLogprob] | None


class FunctionCall(Wire):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCall(Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(Wire):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Wire):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None
    # ladle: how the reply breaks a JSON schema whose grammar left parts of it unenforced
    # (checked after generation, with the JSON path); None when it follows it
    schema_violation: str | None = None


class FileRef(Wire):
    """A file a server-side tool produced: fetch it at `/v1/files/{id}/content`."""

    id: str
    filename: str
    media_type: str
    bytes: int


class AgentEvent(Wire):
    """ladle's progress report on one server-side tool call (or a file it made), carried by
    stream chunks with no choices and listed on the final response; OpenAI clients ignore
    it. `output` is what the model was shown of the result."""

    type: Literal["tool_call.started", "tool_call.finished", "tool_call.failed", "file.created"]
    round: int
    call_id: str
    name: str
    arguments: str | None = None
    output: str | None = None
    file: FileRef | None = None


class ChatCompletionResponse(Wire):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    session_id: str | None = None  # ladle: the session this turn was stored in
    agent_events: list[AgentEvent] | None = None  # ladle: the server-side tool calls it ran


class FunctionCallDelta(Wire):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Wire):
    """A piece of the `index`-th call of a streamed reply: id, type and name come first,
    then arguments, which the client concatenates."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(Wire):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(Wire):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None
    schema_violation: str | None = None  # ladle: as `ChatChoice`'s, on the finishing chunk


class ChatCompletionChunk(Wire):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    agent_event: AgentEvent | None = None  # ladle: a server-side tool call's progress


class CompletionLogprobs(Wire):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Wire):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(Wire):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Embedding(Wire):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string of little-endian float32 for "base64"

    def vector(self) -> list[float]:
        """The floats, whichever encoding the response carries."""
        if isinstance(self.embedding, str):
            raw = base64.b64decode(self.embedding)
            return list(struct.unpack(f"<{len(raw) // 4}f", raw))
        return list(self.embedding)


class EmbeddingUsage(Wire):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Wire):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(Wire):
    """One entry of `GET /v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(Wire):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Wire):
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail
