"""Whisper's log-mel front end: 16 kHz samples to the `[n_mels, 3000]` windows the encoder reads.

Exactly openai-whisper's recipe (`whisper/audio.py`), which the weights were trained on: a
400-point STFT (25 ms) every 160 samples (10 ms) with a periodic Hann window and reflected
edges, power spectrum without its last frame, Slaney-style mel filters (librosa's
`filters.mel(sr=16000, n_fft=400, n_mels=80 or 128)`: 80 bins up to large-v2, 128 for
large-v3), log10 clamped at 1e-10, floored at 8 below the maximum and scaled to about
[-1, 1]. The floor is taken over the whole recording, as openai's `transcribe()` does, so a
window's features do not depend on where the windows fall.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds of audio per window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> torch.Tensor:
    """Slaney mel filter bank `[n_mels, N_FFT // 2 + 1]` over 0-8 kHz, area-normalized.

    Computed in float64 as librosa does (the table openai ships in `mel_filters.npz` is this,
    rounded to float32), so no data file is needed for either bin count.
    """
    fft_freqs = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    widths = np.diff(hz_points)
    ramps = hz_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]  # each filter's area is 1
    return torch.from_numpy(weights.astype(np.float32))


# The Slaney scale: linear below 1 kHz (3 mels every 200 Hz), logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    if hz < _MIN_LOG_HZ:
        return hz / _F_SP
    return float(_MIN_LOG_MEL + np.log(hz / _MIN_LOG_HZ) / _LOG_STEP)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    linear = mels * _F_SP
    log = _MIN_LOG_HZ * np.exp(_LOG_STEP * (mels - _MIN_LOG_MEL))
    return np.where(mels >= _MIN_LOG_MEL, log, linear)


def log_mel_spectrogram(audio: torch.Tensor, n_mels: int, padding: int = 0) -> torch.Tensor:
    """The `[n_mels, frames]` log-mel features of float32 mono 16 kHz `audio` (one frame per
    10 ms), after appending `padding` zero samples (`transcribe` appends a whole window so
    the last one can be sliced as the others are)."""
    if padding:
        audio = torch.nn.functional.pad(audio, (0, padding))
    window = torch.hann_window(N_FFT)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = mel_filters(n_mels) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def pad_or_trim(mel: torch.Tensor, num_frames: int = N_FRAMES) -> torch.Tensor:
    """`mel` cut or zero-padded along its last (time) axis to `num_frames`."""
    length = mel.shape[-1]
    if length > num_frames:
        return mel[..., :num_frames]
    return torch.nn.functional.pad(mel, (0, num_frames - length))
