"""OpenAI's audio wire types: `/v1/audio/speech` and `/v1/audio/transcriptions|translations`.

The speech request is JSON, as OpenAI's; a transcription request is a multipart form whose
fields arrive as text, so `TranscriptionForm` converts them (`"0.2"` is a temperature there)
and names the field that does not. Answers follow OpenAI's shapes: `{"text"}`, the
`verbose_json` body with segments, or SRT / WebVTT text.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ladle.protocol.openai import Wire

SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
TranscriptFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
MAX_SPEECH_INPUT = 4096  # characters, as OpenAI's limit
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx",
    "sage", "shimmer", "verse",
)  # fmt: skip


class SpeechRequest(Wire):
    """`POST /v1/audio/speech`. `voice` is `default`, one of OpenAI's voice names (a
    single-speaker model answers to all of them) or a speaker of a multi-speaker model;
    `stream_format: "sse"` sends base64 chunks as events instead of the audio bytes."""

    model: str = Field(min_length=1)
    input: str = Field(max_length=MAX_SPEECH_INPUT)
    voice: str = "default"
    response_format: SpeechFormat = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    instructions: str | None = None  # OpenAI's style prompt: a VITS voice has no such control
    stream_format: Literal["audio", "sse"] = "audio"
    seed: int | None = None  # ladle's: the same seed speaks the same waveform

    @field_validator("input")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the input has no text to speak")
        return value


class SpeechUsage(Wire):
    input_tokens: int  # phonemes spoken
    output_tokens: int = 0
    total_tokens: int


class TranscriptionForm(Wire):
    """The form fields of `POST /v1/audio/transcriptions` (the file travels beside them).

    `timestamp_granularities[]` may ask for `segment`; `word` is refused by name, since
    ladle's Whisper gives segment times only."""

    model: str = Field(min_length=1)
    language: str | None = None
    prompt: str | None = None
    response_format: TranscriptFormat = "json"
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    timestamp_granularities: list[Literal["segment"]] = Field(
        default_factory=list, alias="timestamp_granularities[]"
    )


class TranscriptSegment(Wire):
    id: int
    seek: int  # the window's start, in 10 ms frames (openai-whisper's unit)
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class DurationUsage(Wire):
    """What a transcription used, as OpenAI bills whisper-1: seconds of audio."""

    type: Literal["duration"] = "duration"
    seconds: float


class Transcription(Wire):
    text: str
    usage: DurationUsage | None = None


class VerboseTranscription(Wire):
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[TranscriptSegment]
