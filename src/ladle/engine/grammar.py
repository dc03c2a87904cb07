"""Structured output through llguidance: constraints compiled once, matched per sequence.

A request's constraint (JSON schema, regex, Lark grammar or a raw llguidance grammar) is
compiled and checked when the request is prepared, so a bad one is an `InvalidRequestError`
naming its field before anything reaches the engine. Each sequence then owns a
`GrammarMatcher`: the sampled token is checked against it, and only when the grammar forbids
it are the logits masked and the token drawn again. Most tokens of a well-prompted model are
already allowed, so the mask (a pass over the whole vocabulary) is rarely computed.
"""

from __future__ import annotations

import json
import threading
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


@dataclass(frozen=True, slots=True)
class CompiledGrammar:
    """A checked llguidance grammar, ready to start one matcher per sequence."""

    grammar: str
    tokenizer: LLTokenizer

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

    def compile(self, kind: str, value: Any, param: str) -> CompiledGrammar:
        """Compile a `kind` constraint (one of `KINDS`); errors name `param`."""
        from llguidance import LLMatcher

        try:
            if kind == "json_schema":
                if not isinstance(value, (dict, bool, str)):
                    raise ValueError("a JSON schema is an object")
                grammar = LLMatcher.grammar_from_json_schema(
                    value if isinstance(value, str) else json.dumps(value),
                    defaults=_JSON_DEFAULTS,  # type: ignore[arg-type]
                )
            elif kind in ("regex", "lark"):
                if not isinstance(value, str):
                    raise ValueError(f"a {kind} constraint is a string")
                grammar = (
                    LLMatcher.grammar_from_regex(value)
                    if kind == "regex"
                    else LLMatcher.grammar_from_lark(value)
                )
            elif kind == "llguidance":
                grammar = value if isinstance(value, str) else json.dumps(value)
            else:
                raise ValueError(f"unknown constraint type {kind!r} (use {', '.join(KINDS)})")
        except (ValueError, TypeError) as e:  # llguidance raises ValueError on bad JSON
            raise InvalidRequestError(f"invalid {kind}: {e}", param=param) from e
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise InvalidRequestError(f"invalid {kind}: {messages[0].strip()}", param=param)
        return CompiledGrammar(grammar, self.ll_tokenizer)


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
