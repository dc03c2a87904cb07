"""A BERT WordPiece vocabulary stored the way llama.cpp's converter stores it in GGUF.

The converter writes word-initial pieces with a leading `▁` and strips `##` from continuations;
ladle rebuilds the original tokenizer from that, checked against the model's own
`tokenizer.json` (all-MiniLM-L6-v2, real) on text that exercises lowercasing, accents,
punctuation, CJK, unknown characters and long words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer

from ladle.engine.loading.tokenizer import Tokenizer

CORPUS = [
    "A man is playing a guitar.",
    "Héllo WORLD, naïve café façade — déjà vu!",
    "東京タワーは高い。北京欢迎你",
    "email me: someone@example.com (or +1-555-0100)",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "tabs\tand\nnewlines   and    spaces",
    "emoji 🙂 and symbols © ™ ∑ are rare",
    "[CLS] written in the text stays a special token [SEP]",
    "",
]


@pytest.fixture(scope="module")
def reference(minilm_path: Path) -> HFTokenizer:
    tokenizer = HFTokenizer.from_file(str(minilm_path / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@pytest.mark.parametrize("text", CORPUS)
def test_wordpiece_from_gguf_matches_the_models_tokenizer(
    reference: HFTokenizer, minilm_gguf_vocab: dict[str, Any], text: str
) -> None:
    ours = Tokenizer.from_gguf(minilm_gguf_vocab, "minilm.gguf")
    assert ours.encode(text) == reference.encode(text).ids  # [CLS] ... [SEP] included
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == reference.decode(
        reference.encode(text).ids
    )
