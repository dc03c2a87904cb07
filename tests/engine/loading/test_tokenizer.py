"""Tokenizer checks against references.

The ground truth for a GGUF is llama.cpp's own tokenizer. For SmolLM2 (`tokenizer.ggml.pre` =
"smollm") that is the pre-tokenizer of SmolLM2's original tokenizer.json: digits isolated, then
GPT-2's byte-level split. transformers' GGUF converter drops the digit step (it splits as plain
GPT-2 does), which gives other ids for whitespace before a digit: "a  123" is a, Ġ, Ġ, 1, 2, 3
there and a, ĠĠ, 1, 2, 3 in llama.cpp. So the reference here is transformers' tokenizer from the
same GGUF with the original pre-tokenizer put back; the case where they differ is pinned to ids
llama.cpp (llama-cpp-python 0.3.16) produced for this file.

The SentencePiece-style case is a tiny model trained here with `sentencepiece` (the original
tokenizer of such models) and written to a GGUF as llama.cpp's converter writes one.
"""

from __future__ import annotations

import io
import json
import logging

import gguf
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2 as sp_model
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from ladle.engine.loading.gguf import read_gguf
from ladle.engine.loading.tokenizer import IncrementalDecoder, Tokenizer
from ladle.errors import ModelLoadError

CORPUS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\r\n\n\nmixed \t \n end",
    "Ünïcödé àccents: café, naïve, São Paulo, Ελληνικά, русский",
    "中文分词测试，日本語のテキスト、한국어 텍스트",
    "العربية: مرحبا بالعالم",
    "combining marks: e\u0301 a\u0308 n\u0303 \u0915\u093f",
    "def f(x):\n    if x > 10:\n        return x ** 2\n    return {'a': [1, 2, 3]}\n",
    "digits 1234567890 and 3.14159, 1,000,000 and x2 2x",
    "a  123 b\t456\n789",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇯🇵 ❤️",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>",
    "I'm sure they'll say it's fine, we've done what'd they've DON'T",
    "    \n\n   \t\t  ",
    "URL: https://example.com/path?q=1&r=two#frag",
    "multi\n\n\nblank\n\n\n\nlines",
]
STREAM_TEXTS = [
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 ❤️",
    "中文分词测试，日本語のテキスト",
    "naïve café",
]


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_path):
    return read_gguf(smollm2_path).metadata


@pytest.fixture(scope="module")
def smol(smollm2_metadata, smollm2_path):
    return Tokenizer.from_gguf(smollm2_metadata, smollm2_path)


@pytest.fixture(scope="module")
def reference(smollm2_path):
    ref = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return ref


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_ids_match_reference(smol, reference, text):
    assert smol.encode(text) == reference.encode(text)


@pytest.mark.real_model
def test_smollm2_splits_digits_from_spaces_as_llama_cpp_does(smol):
    assert smol.encode("a  123 b\t456\n789") == [
        81,
        256,
        33,
        34,
        35,
        278,
        197,
        36,
        37,
        38,
        198,
        39,
        40,
        41,
    ]


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_decode_round_trips(smol, text):
    assert smol.decode(smol.encode(text)) == text


@pytest.mark.real_model
def test_smollm2_special_tokens(smol):
    assert (smol.bos_token, smol.bos_token_id) == ("<|im_start|>", 1)
    assert (smol.eos_token, smol.eos_token_id) == ("<|im_end|>", 2)
    assert smol.stop_token_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert smol.encode("<|im_start|>hi", add_special_tokens=True)[0] == 1  # no BOS added
    assert smol.is_special(2) and not smol.is_special(smol.token_to_id("hi"))
    assert smol.decode(smol.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"
    assert smol.vocab_size == 49152
    assert smol.id_to_token(2) == "<|im_end|>"
    assert smol.chat_template.startswith("{% for message in messages %}")


@pytest.mark.real_model
def test_folder_saved_by_transformers_tokenizes_alike(smol, reference, tmp_path):
    reference.save_pretrained(tmp_path)
    folder = Tokenizer.from_folder(tmp_path)
    assert [folder.encode(t) for t in CORPUS] == [smol.encode(t) for t in CORPUS]
    assert folder.chat_template == smol.chat_template
    assert (folder.bos_token_id, folder.eos_token_id) == (1, 2)
    assert folder.stop_token_ids == smol.stop_token_ids


@pytest.mark.real_model
def test_folder_reads_named_templates_bos_rule_and_generation_eos(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": [
            {"name": "default", "template": "{{ messages[0].content }}"},
            {"name": "tool_use", "template": "{{ tools | length }}"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    folder = Tokenizer.from_folder(tmp_path)
    assert folder.chat_templates == {
        "default": "{{ messages[0].content }}",
        "tool_use": "{{ tools | length }}",
    }
    assert folder.encode("hi") == [1, *folder.encode("hi", add_special_tokens=False)]
    assert folder.stop_token_ids == {0, 2, 5}


@pytest.mark.real_model
@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=30))
def test_streamed_pieces_join_to_the_full_decode(smol, ids):
    _check_stream(smol, ids)


@pytest.mark.real_model
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streaming_never_splits_a_character(smol, text):
    decoder = IncrementalDecoder(smol)
    pieces = [decoder.push(i) for i in smol.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_streaming_can_skip_special_tokens(sentencepiece_gguf):
    tokenizer = sentencepiece_gguf[0]
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    ids = tokenizer.encode("<|im_start|>hello there<|im_end|>")
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "hello there"


# SentencePiece-style GGUF: a tiny model trained here, with byte fallback and control tokens.
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! How are you today?",
    "Tokenizers split text into pieces that a model can read.",
    "Numbers like 12345 and 2024 appear in text too.",
    "the theory of the thing is that there are three of them",
    "café naïve résumé",
]


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    """(ladle tokenizer, transformers tokenizer, sentencepiece processor) of one tiny GGUF."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 20),
        model_writer=model,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        control_symbols=["<|im_start|>", "<|im_end|>"],
        user_defined_symbols=["<tool>"],
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    proto = sp_model.ModelProto()
    proto.ParseFromString(model.getvalue())
    path = tmp_path_factory.mktemp("spm") / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(128)
    writer.add_block_count(1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([_gguf_token_type(p.type) for p in proto.pieces])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = Tokenizer.from_gguf(read_gguf(path).metadata, path)
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return ours, hf, spm.SentencePieceProcessor(model_proto=model.getvalue())


def _gguf_token_type(piece_type: int) -> int:
    kinds = sp_model.ModelProto.SentencePiece.Type
    return {
        kinds.NORMAL: gguf.TokenType.NORMAL,
        kinds.UNKNOWN: gguf.TokenType.UNKNOWN,
        kinds.CONTROL: gguf.TokenType.CONTROL,
        kinds.USER_DEFINED: gguf.TokenType.USER_DEFINED,
        kinds.UNUSED: gguf.TokenType.UNUSED,
        kinds.BYTE: gguf.TokenType.BYTE,
    }[piece_type]


PLAIN_CORPUS = [t for t in CORPUS if "<|" not in t]


@pytest.mark.parametrize("text", PLAIN_CORPUS)
def test_sentencepiece_ids_match_sentencepiece(sentencepiece_gguf, text):
    ours, _, processor = sentencepiece_gguf
    assert ours.encode(text) == [1, *processor.encode(text)]  # BOS by default, as llama.cpp


@pytest.mark.parametrize("text", [t for t in PLAIN_CORPUS if not t[:1].isspace()])
def test_sentencepiece_ids_match_transformers(sentencepiece_gguf, text):
    # transformers adds no "▁" before text that already starts with a space; llama.cpp and
    # sentencepiece do (checked above), so such texts are left out here
    ours, hf, _ = sentencepiece_gguf
    assert ours.encode(text) == hf.encode(text)


def test_sentencepiece_text_after_a_special_token_starts_a_word(sentencepiece_gguf):
    # llama.cpp prefixes every run of text with a space, the one after a special token too
    ours = sentencepiece_gguf[0]
    end, tool = ours.token_to_id("<|im_end|>"), ours.token_to_id("<tool>")
    pieces = [ours.encode(t, add_special_tokens=False) for t in ("a", "b", " now", "x")]
    assert ours.encode("a<|im_end|>b", add_special_tokens=False) == [*pieces[0], end, *pieces[1]]
    assert ours.encode("<tool> now<tool>x", add_special_tokens=False) == [
        tool, *pieces[2], tool, *pieces[3],
    ]  # fmt: skip
    assert ours.is_special(end) and not ours.is_special(tool)


@pytest.mark.parametrize("text", PLAIN_CORPUS)
def test_sentencepiece_decode_round_trips(sentencepiece_gguf, text):
    ours = sentencepiece_gguf[0]
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


def test_sentencepiece_decode_keeps_the_space_added_after_a_special_token(sentencepiece_gguf):
    # only a space at the very start is taken off, by llama.cpp and transformers alike
    ours = sentencepiece_gguf[0]
    assert ours.decode(ours.encode("a<|im_end|>b", add_special_tokens=False)) == "a<|im_end|> b"


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_sentencepiece_streamed_pieces_join_to_the_full_decode(sentencepiece_gguf, data):
    ours = sentencepiece_gguf[0]
    _check_stream(ours, data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=30)))


def test_streaming_after_a_prompt_keeps_the_leading_space(sentencepiece_gguf):
    ours = sentencepiece_gguf[0]
    ids = ours.encode("The theory of them", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if ours.id_to_token(ids[i]).startswith("▁"))
    prompt, generated = ids[:cut], ids[cut:]
    decoder = IncrementalDecoder(ours, prompt_ids=prompt)
    streamed = "".join(decoder.push(i) for i in generated) + decoder.flush()
    assert ours.decode(prompt) + streamed == "The theory of them"
    assert streamed.startswith(" ") and not ours.decode(generated).startswith(" ")


def _check_stream(tokenizer: Tokenizer, ids: list[int]) -> None:
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == tokenizer.decode(ids)


def _metadata(**overrides):
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<|im_end|>", "1"],
        "tokenizer.ggml.token_type": [1, 1, 1, 3, 1],
        "tokenizer.ggml.merges": ["a b"],
    }
    return {**metadata, **overrides}


def test_tiny_byte_level_gguf_with_a_known_pre_tokenizer():
    tokenizer = Tokenizer.from_gguf(_metadata(), "tiny.gguf")
    assert tokenizer.encode("ab<|im_end|>a11") == [2, 3, 0, 4, 4]
    assert tokenizer.stop_token_ids == {3}
    assert tokenizer.bos_token is None and tokenizer.chat_template is None


def test_llama3_gguf_adds_bos_and_takes_whole_words_from_the_vocabulary():
    metadata = _metadata(
        **{
            "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": ["a", "b", "ab", "<|eot_id|>", "c", "abc", "<|begin|>"],
            "tokenizer.ggml.token_type": [1, 1, 1, 3, 1, 1, 3],
            "tokenizer.ggml.bos_token_id": 6,
            "tokenizer.ggml.eot_token_id": 4,
            "tokenizer.chat_template": "{{ bos_token }}",
            "tokenizer.chat_template.tool_use": "{{ tools }}",
        }
    )
    tokenizer = Tokenizer.from_gguf(metadata, "llama3.gguf")
    assert tokenizer.encode("abc") == [6, 5]  # no merge makes "abc", but it is in the vocabulary
    assert tokenizer.stop_token_ids == {3, 4}
    assert tokenizer.chat_templates == {"default": "{{ bos_token }}", "tool_use": "{{ tools }}"}
    metadata["tokenizer.ggml.add_bos_token"] = False
    assert Tokenizer.from_gguf(metadata, "llama3.gguf").encode("abc") == [5]


def test_unknown_pre_tokenizer_falls_back_to_gpt2_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        tokenizer = Tokenizer.from_gguf(_metadata(**{"tokenizer.ggml.pre": "martian"}), "m.gguf")
    assert "martian" in caplog.text
    assert tokenizer.encode("ab") == [2]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"tokenizer.ggml.model": "t5"}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.token_type": [1]}, "tokenizer.ggml.token_type"),
    ],
)
def test_bad_gguf_metadata_names_the_file_and_field(overrides, named):
    with pytest.raises(ModelLoadError, match=named) as error:
        Tokenizer.from_gguf(_metadata(**overrides), "/models/bad.gguf")
    assert error.value.path == "/models/bad.gguf"


def test_folder_without_tokenizer_json_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_folder(tmp_path)
