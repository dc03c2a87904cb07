"""Structured output through llguidance: constraints compiled once, matched per sequence.

A request's constraint (JSON schema, regex, Lark grammar or a raw llguidance grammar) is
compiled and checked when the request is prepared, so a bad one is an `InvalidRequestError`
naming its field before anything reaches the engine. Each sequence then owns a
`GrammarMatcher`: the sampled token is checked against it, and only when the grammar forbids
it are the logits masked and the token drawn again. Most tokens of a well-prompted model are
already allowed, so the mask (a pass over the whole vocabulary) is rarely computed.

A JSON schema may use keywords llguidance cannot enforce (`uniqueItems`, `if`/`then`, `not`,
some formats; it reports them as warnings in its lenient mode). A `strict` schema that does is
refused naming them, as OpenAI refuses what its strict mode does not support; otherwise the
grammar enforces the rest, and the reply is checked against the whole schema after generation
(cores/structured.py). A valid schema llguidance cannot compile at all (too large, circular
references beside other keys, look-around in a pattern) is served likewise: by a grammar of
its top-level type alone, and the check.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ladle.engine.loading.tokenizer import Tokenizer
from ladle.errors import InvalidRequestError

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer

KINDS = ("json_schema", "regex", "lark", "llguidance")

# compact JSON by default: a small model left free to indent can loop on whitespace
_JSON_DEFAULTS = {"whitespace_flexible": False}
# unenforceable keywords are warnings, not errors: `strict` decides (GrammarCompiler.compile)
_JSON_OVERRIDES = {"lenient": True}
# compiled grammars kept per model, in characters of their source: a request's tools come back
# with every turn, and its schemas are read again for the check after generation
_CACHE_CHARS = 8_000_000
_REPEATS = re.compile(r"\s*\(\d+ times\)$")
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


@dataclass(frozen=True, slots=True)
class CompiledGrammar:
    """A checked llguidance grammar, ready to start one matcher per sequence."""

    grammar: str
    tokenizer: LLTokenizer
    # what of a JSON schema the grammar does not enforce, as llguidance names it
    unenforced: tuple[str, ...] = ()
    # the coarser schema followed instead of one llguidance could not compile
    fallback: dict[str, Any] | None = None

    def matcher(self) -> GrammarMatcher:
        from llguidance import LLMatcher  # on use: see GrammarCompiler

        matcher = LLMatcher(self.tokenizer, self.grammar, log_level=0)
        return GrammarMatcher(matcher, self.tokenizer.vocab_size)


class GrammarCompiler:
    """Turns constraints into grammars for one model's tokenizer.

    llguidance's view of the vocabulary takes about 0.3 s to build, so it is built on the first
    constrained request rather than with every model; llguidance itself is imported then too
    (2 MB of memory that a server whose requests are unconstrained never needs).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ll_tokenizer: LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cached_chars = 0

    @property
    def ll_tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                from llguidance import LLTokenizer

                tok = self._tokenizer
                self._ll_tokenizer = LLTokenizer(
                    tok.to_json(),
                    n_vocab=tok.vocab_size,
                    eos_token=sorted(tok.stop_token_ids),  # any end-of-turn token ends the text
                )
            return self._ll_tokenizer

    def compile(
        self, kind: str, value: Any, param: str, *, strict: bool = False
    ) -> CompiledGrammar:
        """Compile a `kind` constraint (one of `KINDS`); errors name `param`.

        A JSON schema with parts the grammar cannot enforce is refused under `strict`, and
        otherwise compiled with those parts listed in `unenforced`, for a check afterwards.
        """
        try:
            text = value if isinstance(value, str) else json.dumps(value)
        except (TypeError, ValueError) as e:  # a Python object only an SDK caller can pass
            raise InvalidRequestError(f"invalid {kind}: {e}", param=param) from e
        key = (kind, text)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
        if compiled is None:
            compiled = self._compile(kind, value, text, param)
            with self._lock:
                if key not in self._cache:
                    self._cache[key] = compiled
                    self._cached_chars += len(text)
                while len(self._cache) > 1 and self._cached_chars > _CACHE_CHARS:
                    (_, old), _ = self._cache.popitem(last=False)
                    self._cached_chars -= len(old)
        if strict and compiled.unenforced:
            raise InvalidRequestError(
                "strict: the grammar engine cannot enforce these parts of the schema: "
                f"{', '.join(compiled.unenforced)}; drop strict to have the reply checked "
                "against the schema after generation instead",
                param=param,
            )
        return compiled

    def _compile(self, kind: str, value: Any, text: str, param: str) -> CompiledGrammar:
        from llguidance import LLMatcher

        if kind == "json_schema":
            return self._json_schema(value, text, param)
        try:
            if kind in ("regex", "lark"):
                if not isinstance(value, str):
                    raise ValueError(f"a {kind} constraint is a string")
                grammar = (
                    LLMatcher.grammar_from_regex(value)
                    if kind == "regex"
                    else LLMatcher.grammar_from_lark(value)
                )
            elif kind == "llguidance":
                grammar = text
            else:
                raise ValueError(f"unknown constraint type {kind!r} (use {', '.join(KINDS)})")
        except ValueError as e:
            raise InvalidRequestError(f"invalid {kind}: {e}", param=param) from e
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise InvalidRequestError(f"invalid {kind}: {messages[0].strip()}", param=param)
        return CompiledGrammar(grammar, self.ll_tokenizer)

    def _json_schema(self, value: Any, text: str, param: str) -> CompiledGrammar:
        """Compiled leniently: what llguidance ignores is listed, and a valid schema it
        refuses falls back to its top-level type; an invalid schema is a 400."""
        try:
            schema = json.loads(text) if isinstance(value, str) else value
            if schema is True:  # admits any value, as `{}` does
                schema, text = {}, "{}"
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema is an object (or true)")
            grammar, is_error, messages = self._lenient(text)
        except ValueError as e:  # bad JSON, here or in llguidance
            raise InvalidRequestError(f"invalid json_schema: {e}", param=param) from e
        if not is_error:
            unenforced = _unenforced(messages)
            if unenforced and (error := _schema_error(schema)) is not None:  # uncheckable
                raise InvalidRequestError(f"invalid json_schema: {error}", param=param)
            return CompiledGrammar(grammar, self.ll_tokenizer, unenforced)
        reason = messages[0].strip()
        if _schema_error(schema) is not None:  # llguidance's message is the more precise
            raise InvalidRequestError(f"invalid json_schema: {reason}", param=param)
        fallback = _top_level_type(schema)
        grammar, is_error, _ = self._lenient(json.dumps(fallback))
        if is_error:  # not expected: a bare type always compiles
            raise InvalidRequestError(f"invalid json_schema: {reason}", param=param)
        lines = reason.splitlines()  # a regex error draws the pattern: keep what it says
        said = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}"
        unenforced = (f"all of it (llguidance: {said})",)
        return CompiledGrammar(grammar, self.ll_tokenizer, unenforced, fallback)

    def _lenient(self, schema: str) -> tuple[str, bool, list[str]]:
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_json_schema(
            schema,
            defaults=_JSON_DEFAULTS,  # type: ignore[arg-type]
            overrides=_JSON_OVERRIDES,  # type: ignore[arg-type]
        )
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        return grammar, is_error, messages


def _unenforced(warnings: list[str]) -> tuple[str, ...]:
    """The keywords llguidance's lenient mode ignored, from its warnings (each once)."""
    names: dict[str, None] = {}
    for warning in warnings:
        text = _REPEATS.sub("", warning.strip())
        if text.startswith("Unimplemented keys: "):
            try:
                names.update(dict.fromkeys(json.loads(text.removeprefix("Unimplemented keys: "))))
                continue
            except ValueError:
                pass
        elif text.startswith("Unknown format: "):
            text = f"format {text.removeprefix('Unknown format: ')!r}"
        elif match := re.match(r"(\w+) not fully supported", text):
            text = match[1]  # oneOf: followed as anyOf, so not exclusive
        names[text] = None
    return tuple(names)


def _schema_error(schema: dict[str, Any]) -> str | None:
    """What makes `schema` invalid against its own metaschema (`$schema`, else 2020-12), or
    None. Format assertions are off: `pattern` is an ECMA regex that Python's may reject."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match
    from jsonschema.validators import validator_for

    if not isinstance(schema.get("$schema", ""), str):
        return "$schema is not a string"
    cls = validator_for(schema, default=Draft202012Validator)
    error = best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    return None if error is None else f"{error.message} at {error.json_path}"


def _top_level_type(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    kinds = [kind] if isinstance(kind, str) else kind
    if isinstance(kinds, list) and kinds and all(k in _TYPES for k in kinds):
        return {"type": kind}
    return {}  # any JSON value


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size  # the model's logits may have padding rows beyond it

    def allows(self, token_id: int) -> bool:
        return 0 <= token_id < self._vocab_size and self._matcher.validate_tokens([token_id]) == 1

    def mask(self, logits: torch.Tensor) -> None:
        """Set every token the grammar forbids now to -inf, in place (`[vocab]` row)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little").astype(np.bool_))
        n = min(len(allowed), logits.shape[-1])
        blocked = torch.ones(logits.shape[-1], dtype=torch.bool)
        blocked[:n] = ~allowed[:n]
        logits.masked_fill_(blocked, float("-inf"))

    def consume(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"grammar rejected token {token_id}: {self._matcher.get_error()}")

    @property
    def is_done(self) -> bool:
        """The grammar is complete and admits nothing more (only an end token)."""
        return self._matcher.is_stopped()
