"""Text to token ids and back, for a GGUF file or a Hugging Face tokenizer folder.

A GGUF carries no `tokenizer.json`, only the vocabulary under llama.cpp's keys, so we assemble
the pipeline llama.cpp runs on it from `tokenizers` parts; llama.cpp is the reference for how a
GGUF tokenizes. A folder's `tokenizer.json` already is such a pipeline and is used as it is.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
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
_PRE_ADDS_BOS = frozenset({*_LLAMA3_NAMES.split(), "tekken", "chameleon"})

# GGUF token types (gguf.TokenType).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Tokens that end a turn wherever they are in a vocabulary (llama.cpp's end-of-generation list).
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """A model's tokenizer: `encode`/`decode`, its special tokens and its chat template(s)."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_templates: dict[str, str] | None = None,
        stop_token_ids: Iterable[int | None] = (),
    ) -> None:
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self._add_bos = add_bos and self.bos_token_id is not None
        self._add_eos = add_eos and self.eos_token_id is not None
        self.chat_templates = dict(chat_templates or {})
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        stops = {*stop_token_ids, self.eos_token_id, *map(backend.token_to_id, _END_OF_TURN_TOKENS)}
        self.stop_token_ids: frozenset[int] = frozenset(i for i in stops if i is not None)
        model = backend.model
        self._byte_fallback_ids = (
            frozenset(i for t, i in backend.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))
            if isinstance(model, models.BPE) and model.byte_fallback
            else frozenset()
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], path: str | Path) -> Tokenizer:
        """The tokenizer a GGUF's `tokenizer.*` metadata describes; `path` is named in errors."""
        kind = metadata.get("tokenizer.ggml.model")
        tokens = _required(metadata, "tokenizer.ggml.tokens", path)
        token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(token_types) != len(tokens):
            raise ModelLoadError(
                path, "tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length"
            )
        if kind == "gpt2":
            backend = _byte_level_bpe(metadata, tokens, token_types, path)
        elif kind == "llama":
            backend = _sentencepiece_bpe(metadata, tokens, path)
        else:
            raise ModelLoadError(
                path, f"tokenizer.ggml.model {kind!r} is not supported (gpt2 or llama)"
            )
        _add_control_tokens(backend, tokens, token_types)
        pre = metadata.get("tokenizer.ggml.pre", "default")
        default_bos = kind == "llama" or pre in _PRE_ADDS_BOS
        templates = {
            key.removeprefix("tokenizer.chat_template").lstrip(".") or "default": value
            for key, value in metadata.items()
            if key.startswith("tokenizer.chat_template") and isinstance(value, str)
        }
        ids = (metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("eot", "eom"))
        return cls(
            backend,
            bos_token=_token_at(tokens, metadata.get("tokenizer.ggml.bos_token_id")),
            eos_token=_token_at(tokens, metadata.get("tokenizer.ggml.eos_token_id")),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_templates=templates,
            stop_token_ids=[i for i in ids if _token_at(tokens, i) is not None],
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json`, chat templates and generation config."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(path, "no tokenizer.json in the folder")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ModelLoadError(file, f"cannot parse tokenizer.json ({e})") from e
        config = _read_json(path / "tokenizer_config.json")
        if "add_bos_token" in config or "add_eos_token" in config:
            backend.post_processor = None  # the config's rule wins, as in transformers
        generation_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            add_bos=bool(config.get("add_bos_token", False)),
            add_eos=bool(config.get("add_eos_token", False)),
            chat_templates=_folder_chat_templates(path, config),
            stop_token_ids=generation_eos if isinstance(generation_eos, list) else [generation_eos],
        )

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The default chat template (Jinja source), if the model has one."""
        return self.chat_templates.get("default")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their single ids.

        With `add_special_tokens`, BOS/EOS are added where the model's own rule says so. A rendered
        chat template usually writes BOS itself, so encode one with `add_special_tokens=False`.
        """
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos:
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self._add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces that never split a character.

    Each piece is the difference between decoding a short window of recent ids with and without
    the newest one (as vLLM and TGI do), held back while it ends in an incomplete UTF-8 sequence
    (U+FFFD) or in a byte-fallback token, whose run decodes as a whole. Without `prompt_ids`, the
    pieces joined equal `decode(all_ids)`; with them, text continues the prompt (its leading
    space kept where a decoder would strip it at the start of a text).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = False,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids[-5:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (maybe "", maybe several chars)."""
        self._ids.append(token_id)
        if token_id in self._tokenizer._byte_fallback_ids:
            return ""
        prefix_text, text = self._window()
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text, text = self._window()
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix_text) :]

    def _window(self) -> tuple[str, str]:
        decode, skip = self._tokenizer.decode, self._skip_special_tokens
        start = self._prefix_offset
        return decode(self._ids[start : self._read_offset], skip), decode(self._ids[start:], skip)


def _byte_level_bpe(
    metadata: dict[str, Any], tokens: list[str], token_types: list[int], path: str | Path
) -> Backend:
    """GPT-2 style BPE over bytes, split first by the regexes of `tokenizer.ggml.pre`."""
    merges = _required(metadata, "tokenizer.ggml.merges", path)
    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab = {}
    for i, (token, token_type) in enumerate(zip(tokens, token_types, strict=True)):
        if token_type not in (_CONTROL, _USER_DEFINED) and not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode())  # stored as text, not bytes
        vocab[token] = i
    pre = metadata.get("tokenizer.ggml.pre", "default")
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


def _sentencepiece_bpe(metadata: dict[str, Any], tokens: list[str], path: str | Path) -> Backend:
    """SentencePiece BPE: `▁` for spaces, merges ranked by score, unknown bytes as `<0xNN>`.

    Like llama.cpp, a space is prepended to every run of text, the one after a special token too.
    """
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise ModelLoadError(
            path, "tokenizer.ggml.scores and tokenizer.ggml.tokens differ in length"
        )
    if "tokenizer.ggml.merges" in metadata:
        merges = [_split_merge(m) for m in metadata["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, scores)
    unk = _token_at(tokens, metadata.get("tokenizer.ggml.unknown_token_id"))
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
    ranked = []
    for token, score in dict(zip(tokens, scores, strict=True)).items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))]
        pairs = sorted(
            (p for p in pairs if p[0] in vocab and p[1] in vocab),
            key=lambda p: (vocab[p[0]], vocab[p[1]]),
        )
        ranked.extend((left, right, score) for left, right in pairs)
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _add_control_tokens(backend: Backend, tokens: list[str], token_types: list[int]) -> None:
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


def _required(metadata: dict[str, Any], key: str, path: str | Path) -> Any:
    if not metadata.get(key):
        raise ModelLoadError(path, f"missing {key} in the tokenizer metadata")
    return metadata[key]


def _token_at(tokens: list[str], token_id: Any) -> str | None:
    return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None


def _token_content(token: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or a serialized AddedToken."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(file, f"cannot read JSON ({e})") from e


def _folder_chat_templates(path: Path, config: dict[str, Any]) -> dict[str, str]:
    """Named templates, as transformers finds them: `chat_template.jinja` wins over the JSONs."""
    found = config.get("chat_template") or _read_json(path / "chat_template.json").get(
        "chat_template"
    )
    if isinstance(found, list):
        templates = {t["name"]: t["template"] for t in found}
    else:
        templates = {"default": found} if found else {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    for file in sorted((path / "additional_chat_templates").glob("*.jinja")):
        templates[file.stem] = file.read_text(encoding="utf-8")
    return templates
