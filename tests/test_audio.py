"""Speech and transcription through the SDK, on the real Piper voice en_US-joe-medium and
Whisper tiny.en: the round trip (ladle speaks ten sentences, ladle writes down what it hears),
the stream shapes, the answer formats and the errors. One `Model` holds both, as a voice
assistant would (`MultiModelBuilder`), loaded once for the module."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from ladle import (
    InvalidRequestError,
    Model,
    MultiModelBuilder,
    SpeechModelBuilder,
    TranscriptionModelBuilder,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "Please call me back when you get home tonight.",
    "The weather today is sunny with a light breeze.",
    "We need to buy milk, bread and eggs.",
    "My favorite color is green.",
    "The train leaves the station at noon.",
    "Reading books is a good way to learn.",
    "Turn left at the next corner and walk straight ahead.",
    "Thank you very much for your help.",
]


@pytest.fixture(scope="module")
def model(piper_voice_path: Path, whisper_tiny_path: Path) -> Iterator[Model]:
    builder = (
        MultiModelBuilder()
        .add_model(SpeechModelBuilder(piper_voice_path).with_num_threads(2), "voice")
        .add_model(TranscriptionModelBuilder(whisper_tiny_path).with_num_threads(2), "ears")
    )
    with builder.build() as model:
        yield model


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def word_error_rate(reference: list[str], heard: list[str]) -> float:
    """Levenshtein distance over words, divided by the reference's length."""
    row = list(range(len(heard) + 1))
    for i, ref in enumerate(reference, start=1):
        prev, row[0] = row[0], i
        for j, hyp in enumerate(heard, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ref != hyp))
    return row[-1] / len(reference)


@pytest.fixture(scope="module")
def spoken(model: Model) -> tuple[np.ndarray, int]:
    pcm, rate, channels = model.generate_speech(" ".join(SENTENCES), seed=7, model_id="voice")
    assert channels == 1 and rate == 22_050 and pcm.dtype == np.float32
    return pcm, rate


def test_ten_sentences_spoken_then_transcribed_within_10_percent_wer(
    model: Model, spoken: tuple[np.ndarray, int]
) -> None:
    pcm, rate = spoken
    seconds = len(pcm) / rate
    assert 15 < seconds < 60  # about 2.5 s a sentence
    heard = model.transcribe(pcm, sample_rate=rate, timestamps=True, model_id="ears")
    reference = words(" ".join(SENTENCES))
    wer = word_error_rate(reference, words(heard.text))
    print(f"\nround trip: {seconds:.1f} s of speech, WER {wer:.1%}\nheard: {heard.text}")
    assert wer <= 0.10
    starts = [s.start for s in heard.segments]
    assert starts == sorted(starts) and heard.segments[-1].end <= seconds + 0.5
    assert heard.language == "en" and heard.duration == pytest.approx(seconds, abs=0.01)


def test_the_same_seed_speaks_the_same_waveform_and_speed_shortens_it(model: Model) -> None:
    a = model.generate_speech("Hello there.", seed=3, model_id="voice").pcm
    b = model.generate_speech("Hello there.", seed=3, model_id="voice").pcm
    fast = model.generate_speech("Hello there.", seed=3, speed=2.0, model_id="voice").pcm
    assert np.array_equal(a, b)
    assert 0.35 < len(fast) / len(a) < 0.65


def test_wav_streams_one_chunk_per_sentence_and_decodes_whole(model: Model) -> None:
    request = {"input": "One sentence here. And a second one.", "response_format": "wav"}
    chunks = list(model.stream_speech_request(request, model_id="voice"))
    assert len(chunks) == 2 and chunks[0][:4] == b"RIFF" and chunks[1][:4] != b"RIFF"
    audio, rate = soundfile.read(io.BytesIO(b"".join(chunks)), dtype="float32")
    assert rate == 22_050 and len(audio) > rate  # two sentences: over a second


def test_speech_events_carry_base64_audio_then_usage(model: Model) -> None:
    request = {"input": "Events, please.", "response_format": "pcm", "stream_format": "sse"}
    events = b"".join(model.stream_speech_request(request, model_id="voice")).decode()
    kinds = re.findall(r'"type": "([a-z.]+)"', events)
    assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"}
    assert '"input_tokens": ' in events


def test_saved_files_have_the_format_their_suffix_names(model: Model, tmp_path: Path) -> None:
    speech = model.generate_speech("Saved.", seed=1, model_id="voice")
    for suffix, container in (("wav", "WAV"), ("flac", "FLAC"), ("mp3", "MP3"), ("ogg", "OGG")):
        info = soundfile.info(str(speech.save(tmp_path / f"out.{suffix}")))
        assert info.format == container and info.channels == 1


def test_transcripts_in_openai_formats(model: Model, spoken: tuple[np.ndarray, int]) -> None:
    pcm, rate = spoken
    clip = soundfile_bytes(pcm[: 6 * rate], rate)  # the first sentences, as an uploaded file
    srt, media = model.send_transcription_request(clip, {"response_format": "srt"}, model_id="ears")
    assert media.startswith("application/x-subrip")
    assert re.match(r"1\n00:00:0\d,\d{3} --> 00:00:\d\d,\d{3}\n\S", srt)
    vtt, _ = model.send_transcription_request(clip, {"response_format": "vtt"}, model_id="ears")
    assert vtt.startswith("WEBVTT\n\n00:00:0")
    text, media = model.send_transcription_request(
        clip, {"response_format": "text"}, model_id="ears"
    )
    assert media.startswith("text/plain") and "fox" in text.lower()


def soundfile_bytes(pcm: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, rate, format="FLAC")
    return buffer.getvalue()


def test_bad_requests_name_what_is_wrong(model: Model) -> None:
    cases = [
        (lambda: model.generate_speech("   ", model_id="voice"), "input"),
        (lambda: model.generate_speech("Hi.", voice="nobody", model_id="voice"), "voice"),
        (lambda: model.generate_speech("Hi.", speed=9.0, model_id="voice"), "speed"),
        (lambda: model.chat("Hi", model_id="voice"), "model"),
        (lambda: model.generate_speech("Hi.", model_id="ears"), "model"),
        (lambda: model.transcribe(b"not audio", model_id="ears"), "file"),
        (lambda: model.transcribe(np.zeros(10), model_id="ears"), "sample_rate"),
        (lambda: model.transcribe(np.zeros(0), sample_rate=16_000, model_id="ears"), "file"),
        (lambda: model.transcribe(np.zeros(1600), sample_rate=16_000, language="xx",
                                  model_id="ears"), "language"),
        (lambda: model.transcribe(np.zeros(1600), sample_rate=16_000, task="translate",
                                  model_id="ears"), "model"),
    ]  # fmt: skip
    for call, param in cases:
        with pytest.raises(InvalidRequestError) as e:
            call()
        assert e.value.param == param, (param, e.value)
    assert model.generate_speech("Still fine.", model_id="voice").pcm.size > 0  # nothing broke


def test_async_twins(piper_voice_path: Path, whisper_tiny_path: Path) -> None:
    async def main() -> str:
        voice = await SpeechModelBuilder(piper_voice_path).with_num_threads(1).build_async()
        ears = await TranscriptionModelBuilder(whisper_tiny_path).with_num_threads(1).build_async()
        try:
            pcm, rate, _ = await voice.generate_speech("Good morning.", seed=2)
            stream = await voice.stream_speech_request(
                {"input": "Hi. Bye.", "response_format": "wav"}
            )
            assert len([c async for c in stream]) == 2
            return (await ears.transcribe(pcm, sample_rate=rate)).text
        finally:
            await voice.aclose()
            await ears.aclose()

    assert "morning" in asyncio.run(main()).lower()
