"""ladle's VITS against onnxruntime running the same Piper voice, and the voice's interface.

The Piper graph draws its own noise (two RandomNormalLike nodes). With `noise_scale` and
`noise_w` at 0 the output is deterministic and the two are compared directly; with noise, a
copy of the graph takes the noise as inputs instead, fed with the draws ladle made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from ladle.engine.speech import LoadedVoice, load_voice
from ladle.errors import InvalidRequestError

HOP = 256  # samples per frame of Piper's medium voices (8 * 8 * 4)
TOLERANCE = 1e-3  # of the waveform's peak


@pytest.fixture(scope="module")
def voice(piper_voice_path: Path) -> LoadedVoice:
    return load_voice(piper_voice_path)


@pytest.fixture(scope="module")
def sentences(voice: LoadedVoice) -> list[list[int]]:
    return voice.sentences("Hello there, friend. Is it raining?")


def onnx_session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def onnx_inputs(ids: list[int], scales: tuple[float, float, float]) -> dict[str, np.ndarray]:
    return {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array(scales, dtype=np.float32),  # noise_scale, length_scale, noise_w
    }


def assert_same_waveform(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape  # same number of frames, so of samples
    peak = float(np.abs(reference).max())
    diff = float(np.abs(ours - reference).max())
    print(
        f"{len(ours)} samples, peak {peak:.3f}, max abs diff {diff:.2e} ({diff / peak:.1e} of peak)"
    )
    assert diff < TOLERANCE * peak


def test_waveform_matches_onnxruntime_without_noise(
    voice: LoadedVoice, sentences: list[list[int]]
) -> None:
    session = onnx_session(voice.path)
    for ids in sentences:
        reference = session.run(None, onnx_inputs(ids, (0.0, 1.0, 0.0)))[0].reshape(-1)
        ours = voice.synthesize(ids, noise_scale=0.0, length_scale=1.0, noise_w=0.0)
        assert ours.dtype == np.float32
        assert_same_waveform(ours, reference)


def test_waveform_matches_onnxruntime_fed_the_same_noise(
    voice: LoadedVoice, sentences: list[list[int]]
) -> None:
    model = onnx.load(str(voice.path))
    random = [n for n in model.graph.node if n.op_type == "RandomNormalLike"]
    assert [n.name for n in random] == ["/dp/RandomNormalLike", "/RandomNormalLike"]
    for node in random:  # its output becomes an input of the graph
        model.graph.node.remove(node)
        model.graph.input.append(
            helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)
        )
    session = onnx_session(model)

    draws: list[torch.Tensor] = []
    generator = torch.Generator().manual_seed(7)

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        draws.append(torch.randn(shape, generator=generator))
        return draws[-1]

    ids = sentences[0]
    with torch.inference_mode():
        ours = voice.model(
            torch.tensor(ids), noise=noise, noise_scale=0.667, length_scale=1.0, noise_w=0.8
        )
    feed = onnx_inputs(ids, (0.667, 1.0, 0.8))
    feed |= {node.output[0]: d.numpy() for node, d in zip(random, draws, strict=True)}
    reference = session.run(None, feed)[0].reshape(-1)
    assert_same_waveform(ours.numpy(), reference)


def test_length_scale_stretches_every_phoneme(
    voice: LoadedVoice, sentences: list[list[int]]
) -> None:
    ids = sentences[0]
    frames = len(voice.synthesize(ids, noise_scale=0.0, noise_w=0.0)) // HOP
    slow = len(voice.synthesize(ids, noise_scale=0.0, noise_w=0.0, length_scale=2.0)) // HOP
    # each phoneme's ceil(2w) frames lie in [2 ceil(w) - 1, 2 ceil(w)]
    assert 2 * frames - len(ids) <= slow <= 2 * frames


def test_a_seed_reproduces_the_waveform(voice: LoadedVoice, sentences: list[list[int]]) -> None:
    ids = sentences[1]

    def speak(seed: int) -> np.ndarray:
        return voice.synthesize(ids, generator=torch.Generator().manual_seed(seed))

    first = speak(1)
    assert np.array_equal(first, speak(1))
    other = speak(2)
    assert len(first) != len(other) or not np.array_equal(first, other)
    assert np.abs(first).max() <= 1.0


def test_sentences_keep_only_what_can_be_said(voice: LoadedVoice) -> None:
    said = voice.sentences("Hello. ... World!")
    assert len(said) == 2 and all(s[:2] == [1, 0] and s[-1] == 2 for s in said)
    for text in ("", "   ", "..."):
        with pytest.raises(InvalidRequestError, match="nothing to speak") as e:
            voice.sentences(text)
        assert e.value.param == "input"


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"phoneme_ids": []}, "input"),
        ({"phoneme_ids": [1, 999, 2]}, "input"),
        ({"speaker_id": 1}, "voice"),
        ({"length_scale": 0.0}, "length_scale"),
        ({"noise_w": float("nan")}, "noise_w"),
    ],
)
def test_bad_arguments_name_the_field(
    voice: LoadedVoice, sentences: list[list[int]], arguments: dict[str, object], param: str
) -> None:
    call: dict[str, object] = {"phoneme_ids": sentences[0], **arguments}
    with pytest.raises(InvalidRequestError) as e:
        voice.synthesize(**call)  # type: ignore[arg-type]
    assert e.value.param == param
