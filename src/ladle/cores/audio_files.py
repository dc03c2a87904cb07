"""Audio in and out: decode what users upload, encode what voices speak, change sample rates.

Decoding and encoding go through libsndfile (`soundfile`, which bundles it: WAV, FLAC,
OGG Vorbis/Opus and MP3, both ways), resampling through libsoxr (`soxr`), both in the `audio`
extra. Formats libsndfile lacks (M4A/AAC, WebM) go through `ffmpeg` where it is installed,
and otherwise fail with an error that names the format. Every waveform inside ladle is float32
mono in [-1, 1]; the encoders write 16-bit samples, as OpenAI's audio does.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from ladle.errors import InvalidRequestError

PCM_RATE = 24_000  # OpenAI's `pcm` and `opus` speech: 24 kHz, 16-bit little-endian
# (libsndfile format, subtype) per response format; pcm is raw samples, aac needs ffmpeg
_SNDFILE = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
}
MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# magic bytes of containers libsndfile cannot open, to name them in the error
_CONTAINERS = ((b"ftyp", 4, "MP4/M4A"), (b"\x1aE\xdf\xa3", 0, "WebM/Matroska"))


def _soundfile() -> Any:
    try:
        import soundfile
    except ImportError as e:  # the `audio` extra is not installed
        raise InvalidRequestError(
            "audio needs the soundfile package: pip install 'ladle[audio]'", param="model"
        ) from e
    return soundfile


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """`audio` (float32 mono) at `to_rate`, through libsoxr's high-quality filter."""
    if from_rate == to_rate or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    import soxr

    return np.asarray(soxr.resample(audio, from_rate, to_rate, quality="HQ"), dtype=np.float32)


def load_audio(
    source: str | os.PathLike[str] | bytes | np.ndarray,
    rate: int,
    *,
    source_rate: int | None = None,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Float32 mono at `rate` from a path, a file's bytes or an array (`source_rate` then says
    its rate; a 2-D array is `[samples, channels]` and is mixed down).

    Raises `InvalidRequestError(param="file")` for bytes that are not audio, naming the format
    where it is known, and for audio longer than `max_seconds`.
    """
    if isinstance(source, np.ndarray):
        if source_rate is None:
            raise InvalidRequestError("an array of samples needs its sample rate", "sample_rate")
        audio, from_rate = np.asarray(source, dtype=np.float32), source_rate
    else:
        data = source if isinstance(source, bytes) else Path(source).expanduser().read_bytes()
        audio, from_rate = _decode(data)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise InvalidRequestError(f"audio must be 1-D or [samples, channels], not {audio.shape}")
    if not np.isfinite(audio).all():
        raise InvalidRequestError("the audio holds NaN or infinite samples", param="file")
    seconds = audio.size / from_rate
    if max_seconds is not None and seconds > max_seconds:
        raise InvalidRequestError(
            f"the audio lasts {seconds:.0f} s, more than this service's limit of "
            f"{max_seconds:.0f} s (max_audio_seconds)",
            param="file",
        )
    return resample(audio, from_rate, rate)


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    """Samples `[n, channels]` and their rate, by libsndfile, else by ffmpeg."""
    if not data:
        raise InvalidRequestError("the audio file is empty", param="file")
    soundfile = _soundfile()
    try:
        audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return audio, int(rate)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        reason = str(e)
    kind = next((name for magic, at, name in _CONTAINERS if data[at:].startswith(magic)), None)
    if kind is not None and shutil.which("ffmpeg"):
        return _ffmpeg_decode(data, kind), 48_000
    known = "WAV, FLAC, OGG (Vorbis, Opus) and MP3"
    if kind is not None:
        raise InvalidRequestError(
            f"cannot read {kind} audio without ffmpeg (ladle reads {known}; install ffmpeg "
            "for the others)",
            param="file",
        )
    raise InvalidRequestError(f"the file is not audio ladle can read ({known}): {reason}", "file")


def _ffmpeg_decode(data: bytes, kind: str) -> np.ndarray:
    command = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", "pipe:0"]
    command += ["-f", "f32le", "-ac", "1", "-ar", "48000", "pipe:1"]
    done = subprocess.run(command, input=data, capture_output=True, timeout=300, check=False)
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip()
        raise InvalidRequestError(f"ffmpeg cannot decode this {kind} file: {error}", "file")
    return np.frombuffer(done.stdout, dtype="<f4").reshape(-1, 1)


def encode_audio(audio: np.ndarray, rate: int, response_format: str) -> bytes:
    """A whole waveform as a file of `response_format` (wav, flac, mp3, opus, pcm, aac)."""
    if response_format == "pcm":
        return pcm16(resample(audio, rate, PCM_RATE))
    if response_format == "aac":
        return _ffmpeg_encode(audio, rate)
    if response_format not in _SNDFILE:
        raise InvalidRequestError(f"unknown audio format {response_format!r}", "response_format")
    if response_format == "opus":  # Opus runs at 8, 12, 16, 24 or 48 kHz only
        audio, rate = resample(audio, rate, PCM_RATE), PCM_RATE
    container, subtype = _SNDFILE[response_format]
    buffer = io.BytesIO()
    _soundfile().write(buffer, audio, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def _ffmpeg_encode(audio: np.ndarray, rate: int) -> bytes:
    if shutil.which("ffmpeg") is None:
        raise InvalidRequestError(
            "aac needs ffmpeg, which is not installed here; ask for mp3, opus, flac, wav or pcm",
            param="response_format",
        )
    command = ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "s16le", "-ar", str(rate)]
    command += ["-ac", "1", "-i", "pipe:0", "-f", "adts", "pipe:1"]
    done = subprocess.run(command, input=pcm16(audio), capture_output=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed to encode aac: {done.stderr.decode(errors='replace')}")
    return bytes(done.stdout)


def pcm16(audio: np.ndarray) -> bytes:
    """16-bit signed little-endian samples, clipped to the range."""
    samples: np.ndarray = np.clip(audio, -1.0, 1.0) * 32767.0
    return samples.round().astype("<i2").tobytes()


def wav_header(rate: int, num_samples: int | None = None) -> bytes:
    """A 16-bit mono WAV header; for a stream of unknown length the sizes are 0xFFFFFFFF, as
    OpenAI's streamed WAV has them (players read to the end of the data)."""
    data = 0xFFFFFFFF if num_samples is None else 2 * num_samples
    riff = 0xFFFFFFFF if num_samples is None else 36 + data
    fmt = struct.pack("<HHIIHH", 1, 1, rate, 2 * rate, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + (b"data" + struct.pack("<I", data))
    )
