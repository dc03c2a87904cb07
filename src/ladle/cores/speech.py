"""What `Model` and `AsyncModel` share for a voice: every rule of speech that does no waiting.

A request becomes a `SpeechPlan`: the text's sentences as phoneme ids, the speaker, the
length scale that `speed` asks for and a seeded noise generator. The API classes then run one
sentence at a time on the voice's worker and hand each waveform to a `SpeechEncoder`, which
turns it into bytes of the asked format as soon as that format allows: WAV and raw PCM stream
sentence by sentence; MP3, Opus, AAC and FLAC are written whole after the last sentence
(their encoders seek back into what they wrote).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from ladle.cores.audio_files import MEDIA_TYPES, PCM_RATE, encode_audio, pcm16, wav_header
from ladle.cores.text import ModelInfo, start_on_own_thread
from ladle.engine.worker import ModelWorker
from ladle.errors import InvalidRequestError
from ladle.protocol.audio import OPENAI_VOICES, SpeechRequest, SpeechUsage
from ladle.protocol.openai import parse_request

if TYPE_CHECKING:
    from ladle.engine.speech import LoadedVoice

SpeechInput = str | SpeechRequest | dict[str, Any]


class SpeechOutput(NamedTuple):
    """What `generate_speech` returns, in mistral.rs's order: `pcm, rate, channels = ...`."""

    pcm: np.ndarray  # float32 in [-1, 1]
    sample_rate: int
    channels: int

    def save(self, path: str | Path) -> Path:
        """Write the audio to `path`, in the format its suffix names (.wav, .flac, .mp3,
        .opus/.ogg, .pcm)."""
        target = Path(path).expanduser()
        suffix = target.suffix.lower().lstrip(".")
        fmt = {"ogg": "opus", "wave": "wav"}.get(suffix, suffix)
        target.write_bytes(encode_audio(self.pcm, self.sample_rate, fmt))
        return target


@dataclass(slots=True)
class SpeechPlan:
    """One request, ready to speak: what each sentence says and how."""

    request: SpeechRequest
    sentences: list[list[int]]
    speaker_id: int | None
    length_scale: float
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __iter__(self) -> Iterator[int]:
        """The sentences' indices, in speaking order."""
        return iter(range(len(self.sentences)))

    @property
    def num_phonemes(self) -> int:
        return sum(len(s) for s in self.sentences)


class SpeechEncoder:
    """Waveforms in, bytes of `response_format` out, as early as the format allows."""

    def __init__(self, response_format: str, rate: int) -> None:
        self.format = response_format
        self.rate = rate
        self._held: list[np.ndarray] = []  # formats written whole: the audio so far
        self._started = False
        self._resampler: Any = None
        if response_format == "pcm" and rate != PCM_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(rate, PCM_RATE, 1, dtype="float32")

    def feed(self, audio: np.ndarray) -> bytes:
        if self.format == "wav":
            head = b"" if self._started else wav_header(self.rate)
            self._started = True
            return head + pcm16(audio)
        if self.format == "pcm":
            if self._resampler is not None:
                audio = self._resampler.resample_chunk(audio)
            return pcm16(audio)
        self._held.append(audio)
        return b""

    def finish(self) -> bytes:
        if self.format == "wav":
            return b"" if self._started else wav_header(self.rate)
        if self.format == "pcm":
            if self._resampler is None:
                return b""
            return pcm16(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        whole = np.concatenate(self._held) if self._held else np.zeros(0, np.float32)
        return encode_audio(whole, self.rate, self.format)


def media_type(req: SpeechRequest) -> str:
    """What the answer to `req` is: its audio format's media type, or an event stream."""
    return "text/event-stream" if req.stream_format == "sse" else MEDIA_TYPES[req.response_format]


def sse_event(kind: str, **fields: Any) -> bytes:
    """One of OpenAI's speech stream events (`speech.audio.delta` / `speech.audio.done`)."""
    return f"data: {json.dumps({'type': kind, **fields})}\n\n".encode()


def audio_delta(chunk: bytes) -> bytes:
    return sse_event("speech.audio.delta", audio=base64.b64encode(chunk).decode("ascii"))


def audio_done(plan: SpeechPlan) -> bytes:
    n = plan.num_phonemes
    usage = SpeechUsage(input_tokens=n, output_tokens=0, total_tokens=n)
    return sse_event("speech.audio.done", usage=usage.model_dump())


class SpeechCore:
    """Request rules of a text-to-speech voice (no waiting here)."""

    def __init__(self, voice: LoadedVoice, model_id: str) -> None:
        self.voice = voice
        self.model_id = model_id
        self.max_seq_len = 0  # no context: a voice speaks each sentence on its own
        self.engine = ModelWorker(model_id)

    @classmethod
    def start(cls, load: Callable[[], LoadedVoice], model_id: str) -> SpeechCore:
        """Load the voice on a new thread, which then runs its worker; wait until loaded."""
        return start_on_own_thread(
            lambda: cls(load(), model_id),
            lambda core: core.engine.serve(),
            f"ladle-speech[{model_id}]",
        )

    def request(self, request: SpeechInput, **fields: Any) -> SpeechRequest:
        """A validated request from text (with `fields` such as `voice`, `speed`), a dict or
        a `SpeechRequest`."""
        if isinstance(request, SpeechRequest):
            return request
        if isinstance(request, str):
            request = {"input": request, **fields}
        if isinstance(request, dict):
            return parse_request(SpeechRequest, {"model": self.model_id, **request})
        raise InvalidRequestError(f"cannot speak a {type(request).__name__}", param="input")

    def plan(self, req: SpeechRequest) -> SpeechPlan:
        """Phonemes, speaker and pace of `req`; raises for an unknown voice or empty text."""
        speaker_id = self.speaker_id(req.voice)
        sentences = self.voice.sentences(req.input)
        length_scale = self.voice.length_scale / req.speed
        plan = SpeechPlan(req, sentences, speaker_id, length_scale)
        if req.seed is not None:
            plan.generator.manual_seed(req.seed)
        else:
            plan.generator.seed()
        return plan

    def speaker_id(self, voice: str) -> int | None:
        """A single-speaker voice answers to `default` and to OpenAI's voice names, so that
        clients written for OpenAI work unchanged; a multi-speaker voice to its speakers'
        names and numbers (`default`: its first speaker)."""
        speakers = self.voice.speakers
        if not speakers:
            if voice == "default" or voice in OPENAI_VOICES:
                return None
            raise InvalidRequestError(
                f"model {self.model_id!r} has one voice: use 'default' or an OpenAI voice name "
                f"({', '.join(OPENAI_VOICES)}), not {voice!r}",
                param="voice",
            )
        if voice == "default":
            return min(speakers.values())
        if voice in speakers:
            return speakers[voice]
        if voice.isdigit() and int(voice) in speakers.values():
            return int(voice)
        names = ", ".join(sorted(speakers)[:20])
        raise InvalidRequestError(
            f"model {self.model_id!r} has no speaker {voice!r}; its speakers: {names}"
            + (" ..." if len(speakers) > 20 else ""),
            param="voice",
        )

    def speak(self, plan: SpeechPlan, index: int) -> np.ndarray:
        """Sentence `index` of `plan` as a waveform (on the worker's thread), brought to full
        scale as Piper's own runners do (`audio / max(0.01, peak)`): the raw VITS output
        peaks near 0.5, quieter than users of Piper voices hear them."""
        audio = self.voice.synthesize(
            plan.sentences[index],
            speaker_id=plan.speaker_id,
            length_scale=plan.length_scale,
            generator=plan.generator,
        )
        peak = float(np.abs(audio).max()) if audio.size else 0.0
        return audio * np.float32(1.0 / max(0.01, peak))

    def encoder(self, req: SpeechRequest) -> SpeechEncoder:
        return SpeechEncoder(req.response_format, self.voice.sample_rate)

    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id=self.model_id,
            architecture=self.voice.architecture,
            modalities={"input": ["text"], "output": ["audio"]},
            device="cpu",
            dtype=str(self.voice.dtype).removeprefix("torch."),
            max_seq_len=0,
            file_format="onnx",
            path=str(self.voice.path),
        )
