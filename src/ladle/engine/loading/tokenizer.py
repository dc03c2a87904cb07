"""Text to token ids and back, for a GGUF file or a Hugging Face tokenizer folder.

A GGUF carries no `tokenizer.json`, only the vocabulary under llama.cpp's keys, so we assemble
the pipeline llama.cpp runs on it from `tokenizers` parts; llama.cpp is the reference for how a
GGUF tokenizes. A folder's `tokenizer.json` already is such a pipeline and is used as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import models

from ladle.engine.loading.gguf_vocab import (
    PRE_ADDS_BOS,
    add_control_tokens,
    byte_level_bpe,
    list_of,
    required_key,
    sentencepiece_bpe,
    token_at,
    wordpiece,
)
from ladle.errors import ModelLoadError

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
        required_key(metadata, "tokenizer.ggml.tokens", path)
        tokens = list_of(metadata, "tokenizer.ggml.tokens", str, path)
        token_types = list_of(metadata, "tokenizer.ggml.token_type", int, path) or [1] * len(tokens)
        if len(token_types) != len(tokens):
            raise ModelLoadError(
                path, "tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length"
            )
        try:
            if kind == "gpt2":
                backend = byte_level_bpe(metadata, tokens, token_types, path)
            elif kind == "llama":
                backend = sentencepiece_bpe(metadata, tokens, path)
            elif kind == "bert":
                backend = wordpiece(tokens)
            else:
                raise ModelLoadError(
                    path, f"tokenizer.ggml.model {kind!r} is not supported (gpt2, llama or bert)"
                )
            add_control_tokens(backend, tokens, token_types)
        except ModelLoadError:
            raise
        except Exception as e:  # tokenizers raises a bare Exception on a vocabulary it rejects
            raise ModelLoadError(path, f"cannot build the tokenizer ({e})") from e
        pre = metadata.get("tokenizer.ggml.pre", "default")
        default_bos = kind in ("llama", "bert") or pre in PRE_ADDS_BOS
        templates = {
            key.removeprefix("tokenizer.chat_template").lstrip(".") or "default": value
            for key, value in metadata.items()
            if key.startswith("tokenizer.chat_template") and isinstance(value, str)
        }
        ids = (metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("eot", "eom"))
        return cls(
            backend,
            bos_token=token_at(tokens, _special_id(metadata, "bos", "cls")),
            eos_token=token_at(tokens, _special_id(metadata, "eos", "seperator")),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", kind == "bert")),
            chat_templates=templates,
            stop_token_ids=[i for i in ids if token_at(tokens, i) is not None],
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
        # tokenizer.json may pin the padding and truncation it was trained with (all-MiniLM-L6-v2
        # pads every input to 128): callers choose their own, as transformers lets them.
        backend.no_padding()
        backend.no_truncation()
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

    def encode_truncated(self, text: str, max_length: int) -> list[int]:
        """`encode(text)` cut to `max_length` ids as transformers cuts it: the text's own tokens
        lose their end, the special tokens around them stay."""
        encoding = self._backend.encode(text, add_special_tokens=False)
        num_special = self._backend.num_special_tokens_to_add(False) + self._add_bos + self._add_eos
        encoding.truncate(max(max_length - num_special, 0))
        ids = self._backend.post_process(encoding).ids
        if self._add_bos:
            ids.insert(0, self.bos_token_id)
        if self._add_eos:
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

    def to_json(self) -> str:
        """The pipeline as `tokenizer.json` text, for libraries that rebuild it (llguidance)."""
        return self._backend.to_str()


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


def _special_id(metadata: dict[str, Any], name: str, bert_name: str) -> Any:
    """`tokenizer.ggml.<name>_token_id`, else BERT's own key (`seperator` is gguf's spelling)."""
    found = metadata.get(f"tokenizer.ggml.{name}_token_id")
    return found if found is not None else metadata.get(f"tokenizer.ggml.{bert_name}_token_id")
