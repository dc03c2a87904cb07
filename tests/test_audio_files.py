"""Audio in and out (cores/audio_files.py), and the byte streams of speech (cores/speech.py):
real files through libsndfile and libsoxr, read back by an independent decoder where one is at
hand (Python's `wave` for WAV)."""

from __future__ import annotations

import io
import shutil
import wave
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile

from ladle.cores.audio_files import PCM_RATE, encode_audio, load_audio, resample, wav_header
from ladle.cores.speech import SpeechCore, SpeechEncoder
from ladle.errors import InvalidRequestError

RATE = 22_050


def tone(seconds: float, rate: int = RATE, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_freq(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
def test_each_format_round_trips_through_the_decoder(fmt: str) -> None:
    audio = tone(1.0)
    data = encode_audio(audio, RATE, fmt)
    back = load_audio(data, 16_000)
    # lossy codecs add their delay and padding; the pitch and the length must survive
    assert abs(len(back) - 16_000) < 0.1 * 16_000, (fmt, len(back))
    assert abs(dominant_freq(back, 16_000) - 440.0) < 5.0
    if fmt in ("wav", "flac"):  # lossless but 16-bit: within one quantization step
        exact = load_audio(data, RATE)
        assert np.abs(exact - audio).max() < 1.0 / 32767 + 1e-6


def test_wav_is_16_bit_mono_as_openai_sends_it() -> None:
    data = encode_audio(tone(0.5), RATE, "wav")
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        assert w.getnframes() == int(0.5 * RATE)


def test_pcm_is_24_khz_16_bit_little_endian() -> None:
    data = encode_audio(tone(1.0), RATE, "pcm")
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767
    assert abs(len(samples) - PCM_RATE) <= 2
    assert abs(dominant_freq(samples, PCM_RATE) - 440.0) < 2.0


def test_stereo_is_mixed_down_and_arrays_need_their_rate() -> None:
    left, right = tone(0.5), np.zeros(int(0.5 * RATE), np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([left, right], axis=1), RATE, format="WAV")
    mono = load_audio(buffer.getvalue(), RATE)
    assert np.allclose(mono, left / 2, atol=1e-4)
    with pytest.raises(InvalidRequestError, match="sample rate"):
        load_audio(left, 16_000)
    assert len(load_audio(left, 16_000, source_rate=RATE)) == pytest.approx(8000, abs=2)


def test_resampling_keeps_the_pitch() -> None:
    out = resample(tone(1.0, 44_100, 1000.0), 44_100, 16_000)
    assert len(out) == 16_000
    assert abs(dominant_freq(out, 16_000) - 1000.0) < 2.0


def test_bad_audio_is_refused_by_name() -> None:
    with pytest.raises(InvalidRequestError, match="empty") as e:
        load_audio(b"", 16_000)
    assert e.value.param == "file"
    with pytest.raises(InvalidRequestError, match="not audio ladle can read"):
        load_audio(b"hello, this is not a sound file at all" * 10, 16_000)
    m4a = b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + bytes(64)
    if shutil.which("ffmpeg") is None:
        with pytest.raises(InvalidRequestError, match="MP4/M4A audio without ffmpeg"):
            load_audio(m4a, 16_000)
    nan = tone(0.1)
    nan[5] = np.nan
    with pytest.raises(InvalidRequestError, match="NaN"):
        load_audio(nan, 16_000, source_rate=RATE)
    with pytest.raises(InvalidRequestError, match=r"lasts 2 s, more than .* limit of 1 s"):
        load_audio(encode_audio(tone(2.0), RATE, "flac"), 16_000, max_seconds=1.0)


def test_a_streamed_wav_plays_to_its_end() -> None:
    """The sizes of a streamed WAV are unknown when its header goes: 0xFFFFFFFF, as OpenAI's;
    libsndfile reads such a file to the end of its data."""
    encoder = SpeechEncoder("wav", RATE)
    parts = [encoder.feed(tone(0.3)), encoder.feed(tone(0.2, freq=880.0)), encoder.finish()]
    assert parts[0][:4] == b"RIFF" and len(parts[0]) == 44 + 2 * int(0.3 * RATE)
    assert parts[1] and not parts[2]  # the second sentence went out at once, no header again
    audio, rate = soundfile.read(io.BytesIO(b"".join(parts)), dtype="float32")
    assert rate == RATE and len(audio) == int(0.5 * RATE)
    assert wav_header(RATE, 10)[40:44] == (20).to_bytes(4, "little")


def test_streamed_pcm_equals_pcm_resampled_whole() -> None:
    """Resampled chunk by chunk (libsoxr's stream keeps its filter state), the 24 kHz PCM is
    the whole file's, up to the filter's rounding."""
    a, b = tone(0.4), tone(0.3, freq=660.0)
    encoder = SpeechEncoder("pcm", RATE)
    streamed = encoder.feed(a) + encoder.feed(b) + encoder.finish()
    whole = encode_audio(np.concatenate([a, b]), RATE, "pcm")
    s = np.frombuffer(streamed, "<i2").astype(np.int32)
    w = np.frombuffer(whole, "<i2").astype(np.int32)
    assert abs(len(s) - len(w)) <= 2
    n = min(len(s), len(w))
    assert np.abs(s[:n] - w[:n]).max() <= 2  # 16-bit steps


def test_compressed_formats_are_written_whole_at_the_end() -> None:
    encoder = SpeechEncoder("mp3", RATE)
    assert encoder.feed(tone(0.5)) == b"" and encoder.feed(tone(0.5)) == b""
    data = encoder.finish()
    assert len(load_audio(data, RATE)) == pytest.approx(RATE, rel=0.1)


def test_voices_answer_to_openai_names_or_their_speakers() -> None:
    """A single-speaker voice takes `default` and OpenAI's names; a multi-speaker one its
    speakers' names and numbers, `default` its first; anything else names the choices."""
    single = SpeechCore(SimpleNamespace(speakers={}), "joe")  # type: ignore[arg-type]
    assert single.speaker_id("default") is None and single.speaker_id("alloy") is None
    with pytest.raises(InvalidRequestError, match="has one voice") as e:
        single.speaker_id("bob")
    assert e.value.param == "voice"
    many = SpeechCore(SimpleNamespace(speakers={"bob": 3, "alice": 1}), "vctk")  # type: ignore[arg-type]
    assert [many.speaker_id(v) for v in ("default", "bob", "alice", "3")] == [1, 3, 1, 3]
    with pytest.raises(InvalidRequestError, match="no speaker 'alloy'; its speakers: alice, bob"):
        many.speaker_id("alloy")
    for core in (single, many):
        core.engine.close()
