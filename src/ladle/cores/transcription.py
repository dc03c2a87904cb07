"""What `Model` and `AsyncModel` share for a speech recognizer: every rule that does no waiting.

Audio of any format, rate and length becomes 16 kHz mono (audio_files.py); the worker runs
Whisper over it (engine/transcriber.py: 30-s windows, Whisper's own long-form rules); the
result becomes one of OpenAI's answers: `{"text"}`, `verbose_json` with segments, plain
text, SubRip or WebVTT.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ladle.cores.audio_files import load_audio
from ladle.cores.text import ModelInfo, start_on_own_thread
from ladle.engine.worker import ModelWorker
from ladle.errors import InvalidRequestError
from ladle.protocol.audio import (
    DurationUsage,
    Transcription,
    TranscriptionForm,
    TranscriptSegment,
    VerboseTranscription,
)
from ladle.protocol.openai import parse_request

if TYPE_CHECKING:
    from ladle.engine.transcriber import LoadedWhisper, Transcript

AudioInput = str | os.PathLike[str] | bytes | np.ndarray
SAMPLE_RATE = 16_000  # what Whisper hears
DEFAULT_MAX_AUDIO_SECONDS = 4 * 3600.0
FALLBACK_STEP = 0.2  # openai-whisper's temperature increment when a window fails its checks


def temperatures(temperature: float) -> tuple[float, ...]:
    """OpenAI's `temperature`: 0 lets Whisper raise it window by window while its output fails
    the compression and log-probability checks; a higher value starts there."""
    steps = round((1.0 - temperature) / FALLBACK_STEP)
    return tuple(round(temperature + i * FALLBACK_STEP, 6) for i in range(steps + 1))


class TranscriptionCore:
    """Request and response rules of a Whisper model (no waiting here)."""

    def __init__(
        self, whisper: LoadedWhisper, model_id: str, max_audio_seconds: float | None
    ) -> None:
        self.whisper = whisper
        self.model_id = model_id
        self.tokenizer = whisper.tokenizer
        self.max_seq_len = whisper.max_seq_len
        self.max_audio_seconds = max_audio_seconds
        self.engine = ModelWorker(model_id)

    @classmethod
    def start(
        cls,
        load: Callable[[], LoadedWhisper],
        model_id: str,
        max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS,
    ) -> TranscriptionCore:
        """Load the model on a new thread, which then runs its worker; wait until loaded."""
        return start_on_own_thread(
            lambda: cls(load(), model_id, max_audio_seconds),
            lambda core: core.engine.serve(),
            f"ladle-transcribe[{model_id}]",
        )

    # ---- requests

    def form(self, fields: TranscriptionForm | dict[str, Any]) -> TranscriptionForm:
        """The request's fields, checked (form values arrive as text: `"0.2"` converts)."""
        if isinstance(fields, TranscriptionForm):
            return fields
        return parse_request(TranscriptionForm, {"model": self.model_id, **fields})

    def audio(self, source: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        """16 kHz mono from a path, a file's bytes, or an array at `sample_rate`."""
        audio = load_audio(
            source, SAMPLE_RATE, source_rate=sample_rate, max_seconds=self.max_audio_seconds
        )
        if audio.size == 0:
            raise InvalidRequestError("the audio has no samples", param="file")
        return audio

    def check_task(self, form: TranscriptionForm, task: str) -> None:
        """Refuse what this model cannot do before any audio is decoded."""
        if task == "translate" and not self.whisper.is_multilingual:
            raise InvalidRequestError(
                f"model {self.model_id!r} is English-only: it transcribes but cannot translate",
                param="model",
            )
        if form.language is not None and form.language not in self.whisper.languages:
            known = ", ".join(self.whisper.languages[:30])
            raise InvalidRequestError(
                f"model {self.model_id!r} does not know language {form.language!r} "
                f"(ISO-639-1 codes: {known}{' ...' if len(self.whisper.languages) > 30 else ''})",
                param="language",
            )

    def run(
        self, audio: np.ndarray, form: TranscriptionForm, task: str, timestamps: bool = True
    ) -> Transcript:
        """Transcribe on the worker's thread (the caller submits this)."""
        return self.whisper.transcribe(
            audio,
            language=form.language,
            task=task,
            temperature=temperatures(form.temperature),
            timestamps=timestamps,
            prompt=form.prompt,
        )

    # ---- responses

    def verbose(self, transcript: Transcript, task: str) -> VerboseTranscription:
        return VerboseTranscription(
            task="translate" if task == "translate" else "transcribe",
            language=transcript.language,
            duration=round(transcript.duration, 3),
            text=transcript.text,
            segments=[
                TranscriptSegment(
                    id=s.id,
                    seek=round(s.start * 100),
                    start=round(s.start, 3),
                    end=round(s.end, 3),
                    text=s.text,
                    tokens=s.tokens,
                    temperature=s.temperature,
                    avg_logprob=s.avg_logprob,
                    compression_ratio=s.compression_ratio,
                    no_speech_prob=s.no_speech_prob,
                )
                for s in transcript.segments
            ],
        )

    def response(
        self, transcript: Transcript, form: TranscriptionForm, task: str
    ) -> tuple[str, str]:
        """The answer's body and media type, in `form.response_format`."""
        fmt = form.response_format
        if fmt == "text":
            return transcript.text + "\n", "text/plain; charset=utf-8"
        if fmt == "srt":
            return subrip(transcript), "application/x-subrip; charset=utf-8"
        if fmt == "vtt":
            return webvtt(transcript), "text/vtt; charset=utf-8"
        if fmt == "verbose_json":
            return self.verbose(transcript, task).model_dump_json(), "application/json"
        usage = DurationUsage(seconds=round(transcript.duration, 3))
        body = Transcription(text=transcript.text, usage=usage)
        return body.model_dump_json(), "application/json"

    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id=self.model_id,
            architecture=self.whisper.architecture,
            modalities={"input": ["audio"], "output": ["text"]},
            device="cpu",
            dtype=str(self.whisper.dtype).removeprefix("torch."),
            max_seq_len=self.max_seq_len,
            file_format="ctranslate2",
            path=str(self.whisper.path),
        )


def _clock(seconds: float, decimal: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def subrip(transcript: Transcript) -> str:
    """The segments as SubRip (.srt) subtitles."""
    blocks = [
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(transcript.segments, start=1)
    ]
    return "\n".join(blocks)


def webvtt(transcript: Transcript) -> str:
    """The segments as WebVTT (.vtt) captions."""
    cues = [
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n"
        for s in transcript.segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)
