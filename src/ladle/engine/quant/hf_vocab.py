"""A Hugging Face tokenizer folder as llama.cpp's GGUF tokenizer metadata.

What `convert_hf_to_gguf.py` writes (`get_vocab_base`, `_set_vocab_gpt2`, and BERT's
`set_vocab`): `tokenizer.ggml.model` (`gpt2` for byte-level BPE, `bert` for WordPiece), every
token by id with its type (added tokens are CONTROL when special or shaped like `<|...|>`,
else USER_DEFINED; ids the tokenizer lacks up to the model's `vocab_size` are UNUSED
`[PAD<id>]`), and through `gguf.SpecialVocab` the merges, the bos/eos/unk/pad ids, whether
BOS/EOS are added, and the chat template(s). WordPiece tokens get llama.cpp's phantom space:
a word-initial piece starts with `▁`, a `##` continuation loses its `##`.

`tokenizer.ggml.pre` (how byte-level BPE splits text before merging) is where ladle differs
in method: llama.cpp hashes the ids of a probe text and looks the hash up in a table of known
tokenizers. ladle splits a probe text with the folder's own pre-tokenizer and with each
pre-tokenizer its GGUF reader knows (`loading/gguf_vocab.py`), and writes the first name that
splits it the same way (and agrees on `ignore_merges`): any tokenizer that splits like a
known one is written, including ones the hash table has never seen.
SentencePiece-style BPE (`byte_fallback`, Llama 2 / Mistral v0.1) and Unigram tokenizers are
refused with a clear error: llama.cpp builds those from `tokenizer.model` scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, SpecialVocab, TokenType
from tokenizers import Tokenizer as Backend

from ladle.engine.loading.gguf_vocab import byte_level_bpe
from ladle.errors import ModelLoadError

# SpecialVocab's default less `cls`, which GGUF has no key for (BERT's CLS is its BOS)
_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask")
# `tokenizer.ggml.pre` names in the order tried; the first of names that split alike wins,
# so each is the one convert_hf_to_gguf.py writes for its family.
_PRE_NAMES = (
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "smollm",
    "tekken",
    "gpt-4o",
    "qwen35",
    "deepseek-coder",
    "falcon",
    "dbrx",
    "default",
)
# Text that every pre-tokenizer above splits differently: digit runs, contractions in both
# cases, runs of spaces / newlines / tabs, punctuation, marks, CJK and emoji.
_PROBE = (
    "Hello world! I'm sure SHE'LL say we'VE 'RE done. 3 33 333 4444 55555 1234567 3.14 "
    "x1y22z333\n\n \n\t\t tabs\r\n   spaces   ---==== ...!!!??? naïve café ÉCOLE "
    "我想在apple工作1314151天 Привет мир 🦙🚀 (x) a/b/c <|x|> end  "
)


def write_tokenizer(writer: GGUFWriter, folder: Path, vocab_size: int) -> None:
    """Add the folder's tokenizer (`tokenizer.json`, `tokenizer_config.json`, chat
    templates) to `writer` as llama.cpp's `tokenizer.*` keys, padded to `vocab_size` ids."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ModelLoadError(folder, "no tokenizer.json in the folder")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        backend = Backend.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ModelLoadError(file, f"cannot parse tokenizer.json ({e})") from e
    model = spec.get("model") or {}
    tokens, types = _tokens(backend, vocab_size, file)
    if model.get("type") == "WordPiece":
        writer.add_tokenizer_model("bert")
        writer.add_tokenizer_pre("default")
        tokens = [_phantom(t, kind) for t, kind in zip(tokens, types, strict=True)]
    elif model.get("type") == "BPE" and not model.get("byte_fallback"):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_name(backend, bool(model.get("ignore_merges")), file))
    else:
        kind = "BPE with byte fallback" if model.get("type") == "BPE" else model.get("type")
        raise ModelLoadError(
            file,
            f"a {kind} tokenizer cannot be written to GGUF (byte-level BPE and WordPiece can: "
            "llama.cpp builds SentencePiece vocabularies from tokenizer.model scores)",
        )
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    is_bpe = model.get("type") == "BPE"  # then SpecialVocab also reads the merges
    special = SpecialVocab(folder, is_bpe, _SPECIAL_TYPES, len(tokens))
    special.add_to_gguf(writer, quiet=True)


def _tokens(backend: Backend, vocab_size: int, file: Path) -> tuple[list[str], list[int]]:
    """Every id's token and GGUF token type, as `get_vocab_base` lists them."""
    by_id = {i: token for token, i in backend.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= vocab_size:
        raise ModelLoadError(file, f"token id {max(by_id)} is past the model's {vocab_size}")
    added = backend.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i not in added:
            tokens.append(token)
            types.append(TokenType.NORMAL)
        elif added[i].special or _looks_special(token):
            tokens.append(token)
            types.append(TokenType.CONTROL)
        else:
            tokens.append(token.replace("▁", " "))  # llama.cpp matches these pre-normalized
            types.append(TokenType.USER_DEFINED)
    return tokens, types


def _looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (llama.cpp's `does_token_look_special`)."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _phantom(token: str, kind: int) -> str:
    if kind == TokenType.CONTROL:
        return token
    return token[2:] if token.startswith("##") else "▁" + token


def _pre_name(backend: Backend, ignore_merges: bool, file: Path) -> str:
    """The `tokenizer.ggml.pre` that splits text as this tokenizer's pre-tokenizer does."""
    if backend.pre_tokenizer is None:
        raise ModelLoadError(file, "a byte-level BPE tokenizer without a pre-tokenizer")
    want = _pieces(backend.pre_tokenizer)
    for name in _PRE_NAMES:
        candidate = byte_level_bpe(_TINY | {"tokenizer.ggml.pre": name}, *_TINY_VOCAB, file)
        same_merging = getattr(candidate.model, "ignore_merges", False) == ignore_merges
        if same_merging and _pieces(candidate.pre_tokenizer) == want:
            return name
    raise ModelLoadError(
        file,
        "its pre-tokenizer splits text like none that llama.cpp knows "
        f"(compared: {', '.join(_PRE_NAMES)})",
    )


# a vocabulary only to split text with
_TINY: dict[str, Any] = {"tokenizer.ggml.merges": ["a b"]}
_TINY_VOCAB = (["a", "b", "ab"], [1, 1, 1])


def _pieces(pre_tokenizer: Any) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(_PROBE)]
