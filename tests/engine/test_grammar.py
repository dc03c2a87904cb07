"""llguidance constraints on SmolLM2's real tokenizer: compiling, masking, and how a constrained
sequence picks its tokens and ends (with hand-made logits, no model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ladle.engine.grammar import CompiledGrammar, GrammarCompiler
from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.sampling import SamplingParams
from ladle.engine.sequence import Sequence, TokenEvent
from ladle.errors import InvalidRequestError

DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"  # \d would admit any Unicode digit


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(smollm2_path).metadata, smollm2_path)


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer)


class _Events:
    def __init__(self) -> None:
        self.events: list[TokenEvent] = []

    def put(self, event: TokenEvent) -> None:
        self.events.append(event)

    def fail(self, error: BaseException) -> None:
        raise error


def _run(
    tokenizer: Tokenizer, grammar: CompiledGrammar, favourite: int, max_tokens: int = 32
) -> tuple[str, str | None]:
    """Decode greedily from logits that always prefer `favourite` (then lower ids)."""
    sink = _Events()
    params = SamplingParams(max_tokens=max_tokens, grammar=grammar)
    seq = Sequence(0, [1], params, max_tokens, tokenizer, set(tokenizer.stop_token_ids), sink)
    logits = -torch.arange(tokenizer.vocab_size, dtype=torch.float32) / tokenizer.vocab_size
    logits[favourite] = 10.0
    while seq.finish_reason is None:
        sink.put(seq.append_from_logits(logits.clone()))  # sampling writes into its row
    return "".join(e.text for e in sink.events), seq.finish_reason


@pytest.mark.parametrize(
    ("kind", "value", "found"),
    [
        ("json_schema", {"type": "bogus"}, "bogus"),
        ("json_schema", "{not json", "invalid json_schema"),
        ("regex", "((", "unclosed group"),
        ("lark", "start: missing_rule", "missing_rule"),
        ("regex", 12, "string"),
        ("choice", "x", "unknown constraint type"),
    ],
)
def test_bad_constraints_raise_naming_the_field(
    compiler: GrammarCompiler, kind: str, value: object, found: str
) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(found)) as info:
        compiler.compile(kind, value, "grammar")
    assert info.value.param == "grammar"


def test_matcher_allows_only_what_the_grammar_admits(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    matcher = compiler.compile("regex", DATE, "grammar").matcher()
    digit, letter = tokenizer.encode("7", False)[0], tokenizer.encode("a", False)[0]
    assert matcher.allows(digit) and not matcher.allows(letter)
    assert not matcher.allows(tokenizer.vocab_size + 5)  # a padding row of the logits
    logits = torch.zeros(tokenizer.vocab_size + 64)
    matcher.mask(logits)
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    assert digit in allowed and letter not in allowed
    assert all(tokenizer.decode([i]).isdigit() for i in allowed)
    for token_id in tokenizer.encode("2024-01-15", False):
        matcher.consume(token_id)
    assert matcher.is_done


def test_a_forbidden_favourite_is_replaced_and_the_sequence_stops_when_complete(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    letter = tokenizer.encode("a", False)[0]
    text, reason = _run(tokenizer, compiler.compile("regex", DATE, "grammar"), letter)
    assert re.fullmatch(DATE, text) and reason == "stop"


def test_an_allowed_favourite_is_kept(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    seven = tokenizer.encode("7", False)[0]
    text, reason = _run(tokenizer, compiler.compile("regex", r"7+x", "grammar"), seven, 5)
    assert (text, reason) == ("77777", "length")  # max_tokens inside the constraint


def test_json_object_ends_at_its_closing_brace(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    brace = tokenizer.encode("}", False)[0]
    grammar = compiler.compile("json_schema", {"type": "object"}, "response_format")
    assert _run(tokenizer, grammar, brace) == ("{}", "stop")


def test_a_stop_string_cannot_cut_a_constraint_short(compiler: GrammarCompiler) -> None:
    grammar = compiler.compile("regex", DATE, "grammar")
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop=["-"], grammar=grammar)
    assert info.value.param == "stop"
