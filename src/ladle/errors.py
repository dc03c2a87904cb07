"""Every error ladle raises on purpose, in one tree.

    LadleError
    ├── ModelLoadError              a model file or folder cannot be read (names the file)
    │   ├── UnsupportedArchitectureError   the weights are a family ladle does not run
    │   └── UnsupportedTensorTypeError     a tensor is stored in a type ladle cannot decode
    ├── InvalidRequestError         a request field is out of range or malformed (names the field)
    │   ├── ContextLengthError          the prompt does not fit in the model's context
    │   └── ConflictError               valid, but not in the model's present state (calibration)
    ├── ModelNotFoundError          no catalog entry, cached model or file has that name
    ├── NotFoundError               no session or tool file has that id (names it)
    ├── StructuredOutputError       a constrained reply was cut short (max_tokens) or does not parse
    ├── DownloadError               fetching a model failed (names the model and the source)
    ├── ServiceError                the local service cannot be reached, started or stopped
    ├── UnsupportedIsaError         LADLE_CPU_ISA names a set this CPU cannot run
    └── EngineClosedError           the model was shut down while a request waited on it

Input is checked where it enters (request models, builders, file readers) and raises one of
these; the HTTP service maps this tree onto OpenAI error bodies in a single place.
"""

from __future__ import annotations


class LadleError(Exception):
    """Base class of every error ladle raises on purpose."""


class UnsupportedIsaError(LadleError):
    """`LADLE_CPU_ISA` names an instruction set that is unknown or this CPU cannot execute."""


class ModelLoadError(LadleError):
    """A model file or folder cannot be loaded; the message names the file."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsupportedArchitectureError(ModelLoadError):
    """The weights belong to an architecture family ladle does not implement."""


class UnsupportedTensorTypeError(ModelLoadError):
    """A tensor is stored in a quantization type ladle cannot decode."""


class InvalidRequestError(LadleError):
    """A request is malformed; `param` names the offending field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None) -> None:
        self.message = message
        self.param = param
        super().__init__(f"{param}: {message}" if param else message)


class ContextLengthError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit in the model's context window."""


class ConflictError(InvalidRequestError):
    """A well-formed request that the model's present state refuses: applying a calibration
    that was never started, starting a second re-quantization. Retry after the state changes
    (HTTP 409)."""


class ModelNotFoundError(LadleError):
    """No catalog entry, cached model or local file answers to `name`."""

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        super().__init__(f"model {name!r} not found" + (f": {detail}" if detail else ""))


class NotFoundError(LadleError):
    """No session or stored file answers to an id; `kind` says which ("session", "file")."""

    def __init__(self, kind: str, item_id: str) -> None:
        self.kind, self.item_id = kind, item_id
        super().__init__(f"{kind} {item_id!r} not found")


class StructuredOutputError(LadleError):
    """`generate_structured` got no complete value: the reply hit `max_tokens` inside its
    constraint (finish_reason "length"), or does not parse as the schema asked."""


class DownloadError(LadleError):
    """A download failed; the message names the model and the source it came from."""

    def __init__(self, model: str, source: str, reason: str) -> None:
        self.model, self.source, self.reason = model, source, reason
        super().__init__(f"downloading {model} from {source} failed: {reason}")


class ServiceError(LadleError):
    """The local model service cannot be reached, started or stopped."""


class EngineClosedError(LadleError):
    """The model's engine stopped before the request finished."""
