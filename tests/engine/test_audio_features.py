"""Whisper's log-mel front end against transformers' `WhisperFeatureExtractor`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from ladle.engine.audio_features import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    log_mel_spectrogram,
    mel_filters,
    pad_or_trim,
)

TOLERANCE = 1e-4  # features lie in about [-1.5, 1.5]


def _audio(seconds: float) -> np.ndarray:
    """A rising chirp under noise, loud then quiet: energy in every mel band."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    chirp = np.sin(2 * np.pi * (100 + 3900 * t / seconds) * t)
    envelope = np.where(t < seconds / 2, 0.5, 0.01)
    return (envelope * chirp + 0.003 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_transformers_slaney_bank(n_mels: int) -> None:
    want = WhisperFeatureExtractor(feature_size=n_mels).mel_filters.T  # [n_mels, 201]
    diff = np.abs(mel_filters(n_mels).numpy() - want).max()
    print(f"{n_mels} mel filters: max abs diff {diff:.2e} of max {want.max():.3f}")
    assert diff <= 1e-6


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_features_equal_transformers(n_mels: int) -> None:
    audio = _audio(12.5)
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    for name, extract in [
        ("torch", extractor._torch_extract_fbank_features),
        ("numpy", extractor._np_extract_fbank_features),
    ]:
        # transformers pads the samples to 30 s, then takes the features
        padded = np.pad(audio, (0, N_SAMPLES - audio.size))[None]
        want = torch.from_numpy(extract(padded, "cpu")[0])
        got = log_mel_spectrogram(torch.from_numpy(padded[0]), n_mels)
        assert got.shape == want.shape == (n_mels, N_FRAMES)
        diff = (got - want).abs().max().item()
        print(f"{n_mels} bins vs transformers' {name} path: max abs diff {diff:.2e}")
        assert diff <= TOLERANCE


def test_a_short_window_is_padded_with_zero_features() -> None:
    audio = torch.from_numpy(_audio(4.0))
    mel = log_mel_spectrogram(audio, 80, padding=N_SAMPLES)
    assert mel.shape[-1] == N_FRAMES + audio.numel() // 160  # a window of silence appended
    window = pad_or_trim(mel[:, :400])
    assert window.shape == (80, N_FRAMES) and not window[:, 400:].any()
    assert torch.equal(pad_or_trim(mel), mel[:, :N_FRAMES])
