"""espeak-ng phonemes and Piper's phoneme ids, checked against the espeak-ng command line
(same library, same voice data) and against Piper's id rules."""

from __future__ import annotations

import logging
import subprocess
import unicodedata

import pytest

from ladle.engine import phonemes
from ladle.engine.phonemes import BOS, EOS, PAD, espeak, phoneme_ids
from ladle.errors import ModelLoadError

# Piper's id map as voices ship it (the first ids of every `.onnx.json`)
ID_MAP = {PAD: [0], BOS: [1], EOS: [2], " ": [3], "!": [4], ",": [8], ".": [10], "?": [13]}


def cli_clauses(text: str) -> list[str]:
    """The IPA clauses `espeak-ng -q --ipa` prints for `text` (punctuation dropped), NFD."""
    out = subprocess.run(
        ["espeak-ng", "-q", "--ipa", "-v", "en-us", text],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [unicodedata.normalize("NFD", line.strip()) for line in out.splitlines() if line]


def test_sentences_are_the_cli_clauses_with_their_punctuation_put_back() -> None:
    text = "Hello world. How are you? I'm fine, thanks!"
    hello, how, fine, thanks = cli_clauses(text)
    got = ["".join(s) for s in espeak().phonemize(text, "en-us")]
    assert got == [f"{hello}.", f"{how}?", f"{fine}, {thanks}!"]


def test_clause_punctuation_is_kept_inside_a_sentence() -> None:
    text = "First, second: third; fourth."
    first, second, third, fourth = cli_clauses(text)
    [sentence] = espeak().phonemize(text, "en-us")
    assert "".join(sentence) == f"{first}, {second}: {third}; {fourth}."


def test_a_period_before_a_newline_or_a_non_ascii_letter_still_ends_the_sentence() -> None:
    # piper-phonemize reads the byte two before espeak's position, which lands on the newline
    # or inside "É" here, and runs the sentences together
    for text in ("Hello.\nWorld.", "Hello. École."):
        first, second = cli_clauses(text)
        got = ["".join(s) for s in espeak().phonemize(text, "en-us")]
        assert got == [f"{first}.", f"{second}."]


def test_clauses_split_without_punctuation_stay_apart() -> None:
    text = "Good morning \u2014 see you soon"  # espeak ends a clause at the dash
    morning, soon = cli_clauses(text)
    [sentence] = espeak().phonemize(text, "en-us")
    assert "".join(sentence) == f"{morning} {soon}"


def test_phonemes_are_decomposed_codepoints() -> None:
    [sentence] = espeak().phonemize("Ich sprach.", "de")  # German "ç" is c + cedilla
    assert "ç" not in sentence and "\u0327" in sentence
    assert all(len(p) == 1 for p in sentence)


def test_language_switch_flags_are_dropped() -> None:
    # espeak marks a foreign word as "(fr)word(en)": the word stays, the flags go
    assert phonemes._without_language_flags("a (fr)bɔ̃(en) d") == list("a bɔ̃ d")


def test_ids_are_bos_pad_then_each_phoneme_and_a_pad_then_eos() -> None:
    id_map = {**ID_MAP, "h": [20], "a": [14, 15]}  # a phoneme may map to several ids
    assert phoneme_ids(["h", "a", "."], id_map) == [1, 0, 20, 0, 14, 15, 0, 10, 0, 2]


def test_unknown_phonemes_are_skipped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ladle.engine.phonemes"):
        ids = phoneme_ids(["h", "\u03a9", "\u03a9", "."], {**ID_MAP, "h": [20]})
    assert ids == [1, 0, 20, 0, 10, 0, 2]
    assert "'\u03a9': 2" in caplog.text


def test_speech_is_more_than_punctuation() -> None:
    id_map = {**ID_MAP, "h": [20]}
    assert not phonemes.is_speech(list(". , "), id_map)
    assert not phonemes.is_speech(["\u03a9"], id_map)  # nothing the voice can say
    assert phonemes.is_speech(["h", "."], id_map)


def test_phoneme_map_replaces_phonemes_and_defaults_per_voice() -> None:
    sentences = [["c", "a"]]
    assert phonemes.map_phonemes(sentences, {"a": ["e", "i"]}, "en-us") == [["c", "e", "i"]]
    assert phonemes.map_phonemes(sentences, None, "pt-br") == [["k", "a"]]  # piper's default
    assert phonemes.map_phonemes(sentences, None, "en-us") == sentences


def test_text_voices_use_casefolded_codepoints_as_one_sentence() -> None:
    assert phonemes.codepoints("Ça va. Oui!") == [list(unicodedata.normalize("NFD", "ça va. oui!"))]


def test_unknown_espeak_voice_is_an_error_naming_espeak() -> None:
    assert not espeak().has_voice("xx-nowhere")
    with pytest.raises(ModelLoadError, match="no voice 'xx-nowhere'") as e:
        espeak().phonemize("Hello.", "xx-nowhere")
    assert e.value.path == phonemes.LIBRARY
    assert espeak().phonemize("Hi.", "en-us")  # the voice before is still usable


def test_missing_library_says_how_to_install_espeak_ng() -> None:
    with pytest.raises(ModelLoadError, match=r"apt-get install espeak-ng") as e:
        phonemes._library("libespeak-ng-not-here.so.1")
    assert "libespeak-ng-not-here.so.1" in str(e.value)
