"""Tokenizer pipelines built from a GGUF vocabulary, as llama.cpp tokenizes it.

A GGUF carries no `tokenizer.json`, only the vocabulary under llama.cpp's keys; these functions
assemble the equivalent `tokenizers` pipeline: byte-level BPE split by the regexes llama.cpp
uses for each `tokenizer.ggml.pre`, or SentencePiece-style BPE with merges ranked by score.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from ladle.errors import ModelLoadError

logger = logging.getLogger(__name__)

# Original `tokenizer.json` spellings; llama.cpp rewrites `(?i:...)` only for its own regex engine.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")


_LLAMA3_NAMES = "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano"


def _pre(names: str, *regexes: str, ignore_merges: bool = False) -> dict[str, Any]:
    return dict.fromkeys(names.split(), (regexes, ignore_merges))


# `tokenizer.ggml.pre` -> (regexes applied in turn, each isolating its matches; whether a whole
# word found in the vocabulary skips the merges), as llama.cpp's `llm_tokenizer_bpe` has them.
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **_pre("default", *_DEFAULT),
    **_pre("gpt-2 phi-2 mpt olmo jais trillion granite-docling exaone4 mellum", _GPT2),
    **_pre("jina-es jina-de jina-v2-es jina-v2-de jina-v1-en jina-v2-code roberta-bpe", _GPT2),
    **_pre("gigachat a.x-4.0 modern-bert", _GPT2),
    **_pre(_LLAMA3_NAMES, _LLAMA3, ignore_merges=True),
    **_pre("dbrx smaug-bpe glm4 chatglm-bpe", _LLAMA3),
    **_pre("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open", _QWEN2),
    **_pre("qwen35", _QWEN35),
    **_pre(
        "starcoder refact command-r smollm codeshell exaone minerva-7b mellum2", r"\p{N}", _GPT2
    ),
    **_pre("falcon", r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    **_pre("deepseek-coder", r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"),
    **_pre("gpt-4o llama4 kanana2 talkie minimax-m2", _GPT4O),
    **_pre("tekken", _TEKKEN, ignore_merges=True),
}
# llama.cpp adds BOS for these when the file does not say (`tokenizer.ggml.add_bos_token`).
PRE_ADDS_BOS = frozenset({*_LLAMA3_NAMES.split(), "tekken", "chameleon"})

# GGUF token types (gguf.TokenType).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def byte_level_bpe(
    metadata: dict[str, Any], tokens: list[str], token_types: list[int], path: str | Path
) -> Backend:
    """GPT-2 style BPE over bytes, split first by the regexes of `tokenizer.ggml.pre`."""
    required_key(metadata, "tokenizer.ggml.merges", path)
    merges = list_of(metadata, "tokenizer.ggml.merges", str, path)
    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab = {}
    for i, (token, token_type) in enumerate(zip(tokens, token_types, strict=True)):
        if token_type not in (_CONTROL, _USER_DEFINED) and not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode())  # stored as text, not bytes
        vocab[token] = i
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str):
        raise ModelLoadError(path, f"tokenizer.ggml.pre: {pre!r} is not a name")
    if pre not in _PRE_TOKENIZERS:
        logger.warning("%s: unknown tokenizer.ggml.pre %r, splitting text as GPT-2 does", path, pre)
    regexes, ignore_merges = _PRE_TOKENIZERS.get(pre, ((_GPT2,), False))
    model = models.BPE(vocab, [_split_merge(m) for m in merges], ignore_merges=ignore_merges)
    backend = Backend(model)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    backend.decoder = decoders.ByteLevel()
    return backend


def sentencepiece_bpe(metadata: dict[str, Any], tokens: list[str], path: str | Path) -> Backend:
    """SentencePiece BPE: `▁` for spaces, merges ranked by score, unknown bytes as `<0xNN>`.

    Like llama.cpp, a space is prepended to every run of text, the one after a special token too.
    """
    scores = list_of(metadata, "tokenizer.ggml.scores", int | float, path) or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise ModelLoadError(
            path, "tokenizer.ggml.scores and tokenizer.ggml.tokens differ in length"
        )
    if "tokenizer.ggml.merges" in metadata:
        merges = [_split_merge(m) for m in list_of(metadata, "tokenizer.ggml.merges", str, path)]
    else:
        merges = _merges_from_scores(tokens, scores)
    unk = token_at(tokens, metadata.get("tokenizer.ggml.unknown_token_id"))
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best merged score first (transformers' order)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    # Only cuts into two lengths some token has: splitting a long token at every point made
    # len(token)**2 bytes of strings (one 20 kB token in a file: 380 MB).
    lengths = {len(token) for token in vocab}
    ranked = []
    for token, score in dict(zip(tokens, scores, strict=True)).items():
        cuts = (k for k in range(1, len(token)) if k in lengths and len(token) - k in lengths)
        pairs = [(token[:k], token[k:]) for k in cuts]
        pairs = sorted(
            (p for p in pairs if p[0] in vocab and p[1] in vocab),
            key=lambda p: (vocab[p[0]], vocab[p[1]]),
        )
        ranked.extend((left, right, score) for left, right in pairs)
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def add_control_tokens(backend: Backend, tokens: list[str], token_types: list[int]) -> None:
    """Match control and user-defined tokens whole in text, as llama.cpp does."""
    special = [
        t for t, kind in zip(tokens, token_types, strict=True) if kind in (_CONTROL, _UNKNOWN)
    ]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _USER_DEFINED]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of each byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = (b for b in range(256) if b not in printable)
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(extra)}


def _split_merge(merge: str) -> tuple[str, str]:
    cut = merge.find(" ", 1)  # from 1, as llama.cpp: a merge's left part may be a space
    return merge[:cut], merge[cut + 1 :]


def list_of(metadata: dict[str, Any], key: str, kind: Any, path: str | Path) -> list[Any]:
    """`metadata[key]` ([] if absent), checked to be a list of `kind`: a GGUF file may hold
    any type under any key."""
    value = metadata.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise ModelLoadError(path, f"{key}: not a list of {getattr(kind, '__name__', kind)}")
    return value


def required_key(metadata: dict[str, Any], key: str, path: str | Path) -> Any:
    if not metadata.get(key):
        raise ModelLoadError(path, f"missing {key} in the tokenizer metadata")
    return metadata[key]


def token_at(tokens: list[str], token_id: Any) -> str | None:
    return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None


def wordpiece(tokens: list[str]) -> Backend:
    """BERT's WordPiece, from the vocabulary llama.cpp's converter stores.

    The converter marks a word-initial piece with a leading `▁` and strips `##` from the
    continuations; undoing that gives the original vocabulary back. Text is then split and
    normalized as the original uncased BERT tokenizer does (lowercase, accents stripped),
    so the ids are the ones the model was trained on.
    """
    vocab = {}
    for i, token in enumerate(tokens):
        if token.startswith("▁"):
            vocab[token[1:]] = i
        elif token.startswith("[") and token.endswith("]"):
            vocab[token] = i
        else:
            vocab[f"##{token}"] = i
    unk = "[UNK]" if "[UNK]" in vocab else None
    backend = Backend(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return backend
