"""Speech to text with a Whisper model: loading one, and openai-whisper's long-form `transcribe()`.

A model is a CTranslate2 Whisper folder (`model.bin`, `config.json` with the suppressed
token ids, `tokenizer.json`), run on ladle's own PyTorch model (models/whisper.py).

Long audio is read as openai's `transcribe()` reads it: 30-s window after window, each
decoded (whisper_decoding.py) at the temperatures in turn until its text is neither too
repetitive nor too unlikely; a window that is silence is skipped. With timestamps, a window
ends at its last complete timestamp pair and the next one starts there, so no word is cut in
two at a seam; without, windows follow each other end to end. The tokens of the windows so
far prompt the next one (`<|startofprev|>`), until a window needs a temperature above 0.5.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ladle.engine.audio_features import (
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    log_mel_spectrogram,
    pad_or_trim,
)
from ladle.engine.loader import load_checkpoint
from ladle.engine.loading.ctranslate2 import read_ctranslate2, read_spec_name
from ladle.engine.loading.tokenizer import Tokenizer
from ladle.engine.models.whisper import (
    WhisperConfig,
    WhisperForConditionalGeneration,
    ctranslate2_weights,
)
from ladle.engine.whisper_decoding import Decoded, WhisperTokens, WindowDecoder
from ladle.errors import InvalidRequestError, ModelLoadError

__all__ = [
    "SAMPLE_RATE",
    "LoadedWhisper",
    "Segment",
    "Transcript",
    "is_whisper",
    "load_whisper",
]

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # openai-whisper's fallback ladder
PROMPT_RESET_TEMPERATURE = 0.5  # a window decoded hotter than this does not prompt the next
_WHISPER_SPEC_REVISION = 3  # the newest WhisperSpec layout (CTranslate2 4.x)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Segment:
    """A stretch of speech between two timestamps (a whole window without timestamps)."""

    id: int
    start: float  # seconds from the start of the audio
    end: float
    text: str
    tokens: list[int]  # its text and timestamp tokens
    avg_logprob: float  # of its window's accepted decode
    compression_ratio: float
    no_speech_prob: float
    temperature: float  # the one its window's decode was accepted at


@dataclass
class Transcript:
    text: str
    language: str  # the code given, or detected from the first window
    duration: float  # seconds of audio
    segments: list[Segment]


@dataclass
class LoadedWhisper:
    """A Whisper model ready to transcribe. `tokenizer` is ladle's `Tokenizer` over the
    folder's `tokenizer.json`: `encode(text)` adds `<|startoftranscript|><|notimestamps|>`
    and `<|endoftext|>` as that file's post-processor says (`add_special_tokens=False` for
    the text's tokens alone); `decode(ids)`. Timestamp ids are past its vocabulary."""

    path: Path
    architecture: str  # "whisper"
    dtype: torch.dtype
    is_multilingual: bool
    languages: list[str]  # the language codes the model knows ("en" alone if English-only)
    tokenizer: Tokenizer
    max_seq_len: int  # decoder positions (448)
    decoder: WindowDecoder

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None = None,
        task: str = "transcribe",
        temperature: float | tuple[float, ...] = DEFAULT_TEMPERATURES,
        timestamps: bool = True,
        prompt: str | None = None,
        generator: torch.Generator | None = None,
    ) -> Transcript:
        """Transcribe (or translate to English) float32 mono 16-kHz `audio` of any length.

        Args:
            language: an ISO-639-1 code from `languages`; None detects it from the first
                30 s (multilingual models) or is "en".
            task: "transcribe", or "translate" into English (multilingual models).
            temperature: 0 for greedy decoding, or the ladder a window climbs while its text
                fails openai's compression-ratio and log-probability checks.
            timestamps: segment the text at Whisper's timestamps; without them, each 30-s
                window is one segment.
            prompt: text that comes before the audio (spelling, names, style).
            generator: the random source of decodes at temperatures above 0.

        Raises `InvalidRequestError` naming the parameter that is out of range.
        """
        samples = _samples(audio)
        if task not in ("transcribe", "translate"):
            raise InvalidRequestError(f"must be transcribe or translate, got {task!r}", "task")
        if task == "translate" and not self.is_multilingual:
            raise InvalidRequestError("an English-only model cannot translate", "task")
        return transcribe_windows(
            self.decoder,
            samples,
            language=self._language(language),
            task=task,
            temperatures=_temperatures(temperature),
            timestamps=timestamps,
            prompt_ids=self.decoder.encode_prompt(prompt) if prompt else [],
            generator=generator,
        )

    def _language(self, language: str | None) -> str | None:
        if language is None:
            return None if self.is_multilingual else "en"
        code = language.lower()
        if code not in self.languages:
            known = ", ".join(self.languages)
            raise InvalidRequestError(f"unknown language {language!r} (known: {known})", "language")
        return code


def load_whisper(path: Path, dtype: torch.dtype = torch.float32) -> LoadedWhisper:
    """Load a CTranslate2 Whisper folder: `model.bin` (or its parts `model.bin.part1`, ...),
    `config.json`, `tokenizer.json`.

    Weights are computed in `dtype`; the decoder's per-token projections keep the file's
    float16 on the native kernels (`StepLinear`). Raises `ModelLoadError` naming the file
    that is missing, garbled or not Whisper's.
    """
    path = Path(path)
    if dtype not in _DTYPES:
        raise InvalidRequestError(f"must be one of {', '.join(map(str, _DTYPES))}", "dtype")
    model_file = path / "model.bin"
    ct2 = read_ctranslate2(model_file)
    ct2.require_spec("WhisperSpec", _WHISPER_SPEC_REVISION)
    config = WhisperConfig.from_ctranslate2(ct2)
    tokenizer = Tokenizer.from_folder(path)
    try:
        tokens = WhisperTokens.from_tokenizer(tokenizer)
    except KeyError as e:
        raise ModelLoadError(path / "tokenizer.json", f"no {e.args[0]} token") from e
    if config.vocab_size - tokens.timestamp_begin <= config.max_source_positions:
        raise ModelLoadError(path / "tokenizer.json", "does not match model.bin's vocabulary")
    settings = _read_settings(path / "config.json", config.vocab_size)
    model = WhisperForConditionalGeneration(config)
    load_checkpoint(model, ctranslate2_weights(ct2, model), dtype, model_file)
    decoder = WindowDecoder(
        model.eval(), tokenizer, tokens, settings["suppress_ids"], settings["suppress_ids_begin"]
    )
    return LoadedWhisper(
        path=path,
        architecture="whisper",
        dtype=dtype,
        is_multilingual=config.is_multilingual,
        languages=list(tokens.languages) if config.is_multilingual else ["en"],
        tokenizer=tokenizer,
        max_seq_len=config.max_target_positions,
        decoder=decoder,
    )


def is_whisper(path: Path) -> bool:
    """Whether `path` is a folder holding a CTranslate2 Whisper model (reads one header)."""
    path = Path(path)
    has_tokenizer = (path / "tokenizer.json").is_file()
    return has_tokenizer and read_spec_name(path / "model.bin") == "WhisperSpec"


def transcribe_windows(
    decoder: WindowDecoder,
    audio: torch.Tensor,
    *,
    language: str | None,
    task: str,
    temperatures: tuple[float, ...],
    timestamps: bool,
    prompt_ids: list[int],
    generator: torch.Generator | None,
) -> Transcript:
    """openai's `transcribe()` over checked arguments: `language=None` is detected (a
    multilingual model's); `prompt_ids` come before the first window."""
    model = decoder.model
    mel = log_mel_spectrogram(audio, model.config.num_mel_bins, padding=N_SAMPLES)
    content_frames = mel.shape[-1] - N_FRAMES
    rules = decoder.rules(timestamps)
    if language is None:  # from the first 30 s of the padded recording, as openai detects it
        with torch.inference_mode():
            first = model.cross_kv(model.encode(pad_or_trim(mel)[None]))
        probs = decoder.detect_language(first)
        language = max(probs, key=probs.__getitem__)
    all_ids = list(prompt_ids)  # the context later windows are prompted with
    prompt_reset_since = 0
    segments: list[Segment] = []
    seek = 0
    while seek < content_frames:
        segment_size = min(N_FRAMES, content_frames - seek)
        window = pad_or_trim(mel[:, seek : seek + segment_size])
        with torch.inference_mode():
            cross_kv = model.cross_kv(model.encode(window[None]))
        initial = decoder.initial_ids(all_ids[prompt_reset_since:], language, task, timestamps)
        decoded = decoder.decode_with_fallback(cross_kv, initial, rules, temperatures, generator)
        if decoded.is_silence():
            seek += segment_size
            continue
        spans, advance = _spans(decoder, decoded.tokens, segment_size)
        time_offset = seek * HOP_LENGTH / SAMPLE_RATE
        for start, end, ids in spans:
            text = decoder.tokenizer.decode([t for t in ids if t < decoder.tokens.eot])
            if start == end or not text.strip():
                continue  # instantaneous or empty: openai clears such segments
            start, end = round(time_offset + start, 3), round(time_offset + end, 3)
            segments.append(_segment(len(segments), start, end, text, ids, decoded))
            all_ids += ids
        seek += advance
        if decoded.temperature > PROMPT_RESET_TEMPERATURE:
            prompt_reset_since = len(all_ids)
    text = "".join(s.text for s in segments).strip()
    return Transcript(text, language, audio.shape[0] / SAMPLE_RATE, segments)


def _spans(
    decoder: WindowDecoder, ids: list[int], segment_size: int
) -> tuple[list[tuple[float, float, list[int]]], int]:
    """A window's `(start, end, tokens)` spans, in seconds into the window, and how many mel
    frames the next window starts after this one's start.

    Consecutive timestamps close one span and open the next. Text after the last closed span
    is dropped and read again by the next window, which starts at that span's end, unless
    the window ends in a lone timestamp (nothing spoken after it) or has no pair at all.
    """
    begin, precision = decoder.tokens.timestamp_begin, decoder.time_precision
    is_stamp = [t >= begin for t in ids]
    cuts = [i + 1 for i in range(len(ids) - 1) if is_stamp[i] and is_stamp[i + 1]]
    single_timestamp_ending = is_stamp[-2:] == [False, True]
    if not cuts:
        stamps = [t for t in ids if t >= begin]
        duration = segment_size * HOP_LENGTH / SAMPLE_RATE
        if stamps and stamps[-1] != begin:  # no pair, but a timestamp: the text ends there
            duration = (stamps[-1] - begin) * precision
        return [(0.0, duration, ids)], segment_size
    if single_timestamp_ending:
        cuts.append(len(ids))
    bounds = zip([0, *cuts[:-1]], cuts, strict=True)
    spans = [
        ((ids[a] - begin) * precision, (ids[b - 1] - begin) * precision, ids[a:b])
        for a, b in bounds
    ]
    if single_timestamp_ending:
        return spans, segment_size
    return spans, (ids[cuts[-1] - 1] - begin) * decoder.input_stride


def _segment(
    index: int, start: float, end: float, text: str, ids: list[int], decoded: Decoded
) -> Segment:
    return Segment(
        id=index,
        start=start,
        end=end,
        text=text,
        tokens=ids,
        avg_logprob=decoded.avg_logprob,
        compression_ratio=decoded.compression_ratio,
        no_speech_prob=decoded.no_speech_prob,
        temperature=decoded.temperature,
    )


def _samples(audio: np.ndarray) -> torch.Tensor:
    """`audio` as a float32 tensor, refused when it is not finite mono float samples."""
    array = np.asarray(audio)
    if array.dtype.kind != "f":
        raise InvalidRequestError(f"must be float samples in [-1, 1], got {array.dtype}", "audio")
    if array.ndim != 1:
        raise InvalidRequestError(f"must be mono (one dimension), got shape {array.shape}", "audio")
    if array.size == 0:
        raise InvalidRequestError("has no samples", "audio")
    if not np.isfinite(array).all():
        raise InvalidRequestError("has NaN or infinite samples", "audio")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _temperatures(temperature: float | tuple[float, ...]) -> tuple[float, ...]:
    ladder = (temperature,) if isinstance(temperature, int | float) else tuple(temperature)
    if not ladder or not all(math.isfinite(t) and t >= 0 for t in ladder):
        raise InvalidRequestError(
            f"must be a number >= 0 or a non-empty tuple of them, got {temperature!r}",
            "temperature",
        )
    return tuple(float(t) for t in ladder)


def _read_settings(file: Path, vocab_size: int) -> dict[str, list[int]]:
    """The suppressed token ids of a CTranslate2 Whisper `config.json`."""
    try:
        config: Any = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(file, f"cannot read JSON ({e})") from e
    settings = {}
    for key in ("suppress_ids", "suppress_ids_begin"):
        ids = config.get(key, []) if isinstance(config, dict) else None
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and 0 <= i < vocab_size for i in ids
        ):
            raise ModelLoadError(file, f"{key} must be a list of token ids below {vocab_size}")
        settings[key] = ids
    return settings
