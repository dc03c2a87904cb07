"""Transcribing with Whisper tiny.en: long-form audio across windows, and bad input."""

from __future__ import annotations

import io
import itertools
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch

from ladle.engine.transcriber import SAMPLE_RATE, LoadedWhisper, is_whisper, load_whisper
from ladle.errors import InvalidRequestError, ModelLoadError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "I would like a cup of coffee, please.",
    "The weather today is sunny with a light breeze from the west.",
    "Please remember to close the window before you leave the house.",
    "Our meeting has been moved to Thursday afternoon.",
    "The library opens at nine in the morning and closes at six.",
    "A journey of a thousand miles begins with a single step.",
    "My brother bought a new bicycle last summer.",
    "The children played football in the park until sunset.",
    "Fresh bread smells wonderful early in the morning.",
]
MAX_WORD_ERROR_RATE = 0.25  # tiny.en on espeak's voice: some words come out misheard


@pytest.fixture(scope="module")
def whisper(whisper_tiny_path: Path) -> LoadedWhisper:
    return load_whisper(whisper_tiny_path)


@pytest.fixture(scope="module")
def long_speech() -> np.ndarray:
    """The sentences read one after another with half a second between them (34 s)."""
    pause = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    return np.concatenate([part for s in SENTENCES for part in (_speech(s), pause)])


def _speech(text: str) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _word_error_rate(reference: list[str], hypothesis: list[str]) -> float:
    """Word-level edit distance over the reference's length."""
    row = list(range(len(hypothesis) + 1))
    for i, word in enumerate(reference, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(hypothesis, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1] / len(reference)


def test_long_audio_is_read_window_after_window_without_losing_a_word(
    whisper: LoadedWhisper, long_speech: np.ndarray
) -> None:
    duration = long_speech.size / SAMPLE_RATE
    transcript = whisper.transcribe(long_speech)
    for s in transcript.segments:
        print(f"[{s.start:6.2f} -> {s.end:6.2f}] t={s.temperature} {s.text}")
    spoken, heard = _words(" ".join(SENTENCES)), _words(transcript.text)
    wer = _word_error_rate(spoken, heard)
    print(f"{duration:.1f} s of speech, word error rate {wer:.3f}")
    assert transcript.language == "en" and transcript.duration == duration
    assert wer <= MAX_WORD_ERROR_RATE
    segments = transcript.segments
    assert [s.id for s in segments] == list(range(len(segments)))
    assert all(s.start < s.end for s in segments)
    assert all(a.end <= b.start for a, b in itertools.pairwise(segments))
    assert segments[-1].end > 30.0 and segments[-1].end <= duration  # a second window was read
    # each sentence's words once, in order: nothing dropped or read twice at the seam
    for sentence in SENTENCES[6:]:
        words = [w for w in _words(sentence) if len(w) > 4]
        assert sum(heard.count(w) for w in words) >= len(words) - 1, sentence
        assert all(heard.count(w) <= _words(" ".join(SENTENCES)).count(w) for w in words)
    assert transcript.text == "".join(s.text for s in segments).strip()


def test_without_timestamps_each_window_is_one_segment(
    whisper: LoadedWhisper, long_speech: np.ndarray
) -> None:
    short = long_speech[: 8 * SAMPLE_RATE]
    transcript = whisper.transcribe(short, timestamps=False, temperature=0.0)
    [segment] = transcript.segments
    assert (segment.start, segment.end) == (0.0, 8.0)
    assert all(t < whisper.tokenizer.vocab_size for t in segment.tokens)  # no timestamp token
    assert "lazy dog" in transcript.text


def test_silence_yields_no_segments(whisper: LoadedWhisper) -> None:
    transcript = whisper.transcribe(np.zeros(5 * SAMPLE_RATE, dtype=np.float32))
    assert transcript.text == "" and transcript.segments == []


def test_sampling_follows_its_generator(whisper: LoadedWhisper, long_speech: np.ndarray) -> None:
    short = long_speech[: 4 * SAMPLE_RATE]
    first, again = (
        whisper.transcribe(short, temperature=1.0, generator=torch.Generator().manual_seed(1))
        for _ in range(2)
    )
    assert first.segments and first == again
    assert all(s.temperature == 1.0 for s in first.segments)


def test_a_prompt_comes_before_the_audio(whisper: LoadedWhisper, long_speech: np.ndarray) -> None:
    short = long_speech[: 4 * SAMPLE_RATE]
    prompt = "Foxes and dogs."
    decoder = whisper.decoder
    prompt_ids = decoder.encode_prompt(prompt)
    initial = decoder.initial_ids(prompt_ids, "en", "transcribe", True)
    assert initial == [decoder.tokens.sot_prev, *prompt_ids, decoder.tokens.sot]
    transcript = whisper.transcribe(short, prompt=prompt)
    assert "Foxes and dogs" not in transcript.text and "lazy dog" in transcript.text


@pytest.mark.parametrize(
    ("audio", "kwargs", "param", "message"),
    [
        (np.zeros(0, dtype=np.float32), {}, "audio", "no samples"),
        (np.array([0.0, np.nan], dtype=np.float32), {}, "audio", "NaN"),
        (np.zeros((2, 100), dtype=np.float32), {}, "audio", "mono"),
        (np.zeros(100, dtype=np.int16), {}, "audio", "float samples"),
        (None, {"language": "xx"}, "language", "unknown language 'xx'"),
        (None, {"language": "de"}, "language", "known: en"),
        (None, {"task": "translate"}, "task", "English-only"),
        (None, {"task": "summarize"}, "task", "transcribe or translate"),
        (None, {"temperature": -0.5}, "temperature", ">= 0"),
        (None, {"temperature": ()}, "temperature", "non-empty"),
    ],
)
def test_bad_arguments_name_the_parameter(
    whisper: LoadedWhisper,
    audio: np.ndarray | None,
    kwargs: dict[str, object],
    param: str,
    message: str,
) -> None:
    samples = np.zeros(SAMPLE_RATE, dtype=np.float32) if audio is None else audio
    with pytest.raises(InvalidRequestError, match=re.escape(message)) as error:
        whisper.transcribe(samples, **kwargs)  # type: ignore[arg-type]
    assert error.value.param == param


def test_the_model_describes_itself(whisper: LoadedWhisper, whisper_tiny_path: Path) -> None:
    assert (whisper.architecture, whisper.is_multilingual, whisper.languages) == (
        "whisper",
        False,
        ["en"],
    )
    assert whisper.max_seq_len == 448 and whisper.dtype == torch.float32
    assert whisper.tokenizer.decode(whisper.tokenizer.encode(" Hello", False)) == " Hello"
    assert is_whisper(whisper_tiny_path)


def test_a_folder_without_whisper_is_refused(tmp_path: Path) -> None:
    assert not is_whisper(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot read") as error:
        load_whisper(tmp_path)
    assert error.value.path == str(tmp_path / "model.bin")
