"""Text-to-speech voices, as the rest of ladle uses them: load, split text, synthesize.

A voice is a Piper VITS voice (`ladle.engine.loading.piper`). Callers phonemize first
(`LoadedVoice.sentences`) and synthesize sentence by sentence, as Piper does: each call is
independent, so audio can stream a sentence at a time. Randomness (the duration and latent
noise) comes from the caller's `torch.Generator`, so a seed reproduces a waveform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ladle.engine.loading.piper import PiperConfig, config_path, read_piper_voice
from ladle.engine.models.vits import VitsModel
from ladle.engine.phonemes import (
    LIBRARY,
    codepoints,
    espeak,
    is_speech,
    map_phonemes,
    phoneme_ids,
)
from ladle.errors import InvalidRequestError, ModelLoadError

VOICE_SUFFIX = ".onnx"


@dataclass
class LoadedVoice:
    """A voice ready to speak: its model, its Piper config and what callers need to know."""

    path: Path  # the .onnx file
    sample_rate: int
    speakers: dict[str, int]  # name -> id; empty for a single-speaker voice
    architecture: str  # "vits"
    dtype: torch.dtype
    model: VitsModel = field(repr=False)
    config: PiperConfig = field(repr=False)

    @property
    def length_scale(self) -> float:
        """The voice's own pace (`speed` 1.0); `length_scale / speed` gives another speed."""
        return self.config.length_scale

    @property
    def noise_scale(self) -> float:
        return self.config.noise_scale

    @property
    def noise_w(self) -> float:
        return self.config.noise_w

    def sentences(self, text: str) -> list[list[int]]:
        """Phoneme ids of each sentence of `text` (BOS/pad/EOS included), leaving out
        sentences with nothing to say (only punctuation). Raises `InvalidRequestError`
        (param "input") when no sentence is left."""
        c = self.config
        if c.phoneme_type == "espeak":
            phonemes = espeak().phonemize(text, c.espeak_voice)
        else:
            phonemes = codepoints(text)
        phonemes = map_phonemes(phonemes, c.phoneme_map, c.espeak_voice)
        ids = [phoneme_ids(s, c.phoneme_id_map) for s in phonemes if is_speech(s, c.phoneme_id_map)]
        if not ids:
            raise InvalidRequestError("the text has nothing to speak", param="input")
        return ids

    @torch.inference_mode()
    def synthesize(
        self,
        phoneme_ids: list[int],
        *,
        speaker_id: int | None = None,
        length_scale: float | None = None,
        noise_scale: float | None = None,
        noise_w: float | None = None,
        generator: torch.Generator | None = None,
    ) -> np.ndarray:
        """The float32 mono waveform of one sentence, in [-1, 1] at `sample_rate`.

        Scales left `None` take the voice's config values: `length_scale` stretches time
        (2.0 is half speed), `noise_scale` varies the voice, `noise_w` the rhythm. A
        multi-speaker voice speaks as speaker 0 unless told otherwise. Draws its noise from
        `generator` (torch's default one when `None`).
        """
        c = self.config
        length_scale = _scale("length_scale", length_scale, c.length_scale, positive=True)
        noise_scale = _scale("noise_scale", noise_scale, c.noise_scale)
        noise_w = _scale("noise_w", noise_w, c.noise_w)
        num_symbols = self.model.config.num_symbols
        if not phoneme_ids or not all(0 <= i < num_symbols for i in phoneme_ids):
            message = f"phoneme ids must be a non-empty list of ids below {num_symbols}"
            raise InvalidRequestError(message, param="input")
        num_speakers = self.model.config.num_speakers
        if speaker_id is not None and not 0 <= speaker_id < num_speakers:
            message = f"speaker id {speaker_id} is out of range: the voice has {num_speakers}"
            raise InvalidRequestError(message, param="voice")

        def noise(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.randn(shape, generator=generator)

        audio = self.model(
            torch.tensor(phoneme_ids),
            noise=noise,
            noise_scale=noise_scale,
            length_scale=length_scale,
            noise_w=noise_w,
            speaker_id=speaker_id or 0,
        )
        return audio.float().numpy()


def _scale(name: str, value: float | None, default: float, positive: bool = False) -> float:
    """`value`, or the voice's `default` for None; checked finite and not negative (or, with
    `positive`, above zero)."""
    scale = default if value is None else float(value)
    if not math.isfinite(scale) or scale < 0 or (positive and scale == 0):
        limit = "above zero" if positive else "zero or more"
        raise InvalidRequestError(f"must be a finite number {limit}, got {value}", param=name)
    return scale


def load_voice(path: Path, dtype: torch.dtype = torch.float32) -> LoadedVoice:
    """Load the voice at `path`: a `.onnx` file with its `.onnx.json` beside it, or a folder
    holding exactly one. Raises `ModelLoadError` naming the file at fault, or espeak-ng's
    library when it is missing or lacks the voice's language.

    Voices run in float32 only: in bfloat16 the duration predictor's spline breaks down
    (negative durations), and CPUs have no fast half-precision convolutions to win back.
    """
    if dtype != torch.float32:
        raise InvalidRequestError(f"voices run in float32, not {dtype}", param="dtype")
    onnx_path = _voice_file(Path(path))
    model, config = read_piper_voice(onnx_path)
    if config.phoneme_type == "espeak" and not espeak().has_voice(config.espeak_voice):
        reason = f"espeak-ng has no voice {config.espeak_voice!r}, which {onnx_path.name} speaks"
        raise ModelLoadError(LIBRARY, reason)
    return LoadedVoice(
        path=onnx_path,
        sample_rate=config.sample_rate,
        speakers=dict(config.speaker_id_map or {}),
        architecture="vits",
        dtype=dtype,
        model=model,
        config=config,
    )


def is_voice(path: Path) -> bool:
    """Whether `path` looks like a voice (cheap: names only, nothing read): a `.onnx` file
    with its `.onnx.json`, or a folder holding exactly one such pair."""
    path = Path(path)
    if path.is_dir():
        files = list(path.glob(f"*{VOICE_SUFFIX}"))
        return len(files) == 1 and config_path(files[0]).is_file()
    return path.suffix == VOICE_SUFFIX and path.is_file() and config_path(path).is_file()


def _voice_file(path: Path) -> Path:
    if not path.is_dir():
        return path  # a missing file is reported by the reader, which names it
    files = sorted(path.glob(f"*{VOICE_SUFFIX}"))
    if len(files) != 1:
        raise ModelLoadError(path, f"holds {len(files)} .onnx files; a voice folder holds one")
    return files[0]
